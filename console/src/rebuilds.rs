//! Rebuilds started from the projections page: each runs in a task of the console with
//! [`tally_projectors::rebuild::rebuild`] (what `tally projections rebuild` runs), and its
//! progress (events read of the log's count, rate, ETA) is kept here for the page to poll
//! until the switch. At most one rebuild per projection runs from one console; the rebuild's
//! own advisory lock refuses a second one anywhere else.
//!
//! A finished rebuild stays listed (with its report or error) until the next one of the same
//! projection, so the page can show how it ended.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tally_projectors::{catalog, rebuild};

/// One rebuild, running or finished.
#[derive(Debug, Clone)]
pub struct Job {
    pub projection: &'static str,
    pub started_at: DateTime<Utc>,
    started: Instant,
    /// Events read from the log so far, and the log's event count when it started.
    pub done: u64,
    pub total: u64,
    /// How it ended: the report line, or the error.
    pub outcome: Option<Result<String, String>>,
    pub elapsed: Duration,
}

impl Job {
    pub fn running(&self) -> bool {
        self.outcome.is_none()
    }

    /// Events read per second so far.
    pub fn rate(&self) -> f64 {
        self.done as f64 / self.elapsed.as_secs_f64().max(1e-3)
    }

    /// The time left at the current rate, when there is one.
    pub fn eta(&self) -> Option<Duration> {
        let rate = self.rate();
        (self.running() && rate > 0.0 && self.total > self.done)
            .then(|| Duration::from_secs_f64((self.total - self.done) as f64 / rate))
    }

    /// Per mille of the log read (a rebuild may read past the count it started with).
    pub fn per_mille(&self) -> u64 {
        if self.total == 0 {
            return if self.running() { 0 } else { 1000 };
        }
        (self.done.saturating_mul(1000) / self.total).min(1000)
    }
}

/// Every projection's latest rebuild from this console.
#[derive(Debug, Default)]
pub struct Rebuilds {
    jobs: Mutex<BTreeMap<&'static str, Job>>,
}

impl Rebuilds {
    /// The latest rebuild of each projection.
    pub fn jobs(&self) -> Vec<Job> {
        let mut jobs = self.lock();
        for job in jobs.values_mut().filter(|j| j.running()) {
            job.elapsed = job.started.elapsed();
        }
        jobs.values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, Job>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a rebuild of the projection owning `name` (a projection or a read model), or
    /// says why not.
    pub fn start(self: &Arc<Self>, pool: PgPool, name: &str, partitions: u32) -> Result<&'static str, String> {
        let projection = catalog::resolve(name).ok_or_else(|| {
            format!(
                "no projection or read model is called {name:?} (projections: {})",
                catalog::PROJECTIONS.join(", ")
            )
        })?;
        {
            let mut jobs = self.lock();
            if jobs.get(projection).is_some_and(Job::running) {
                return Err(format!("a rebuild of {projection} is already running"));
            }
            jobs.insert(
                projection,
                Job {
                    projection,
                    started_at: Utc::now(),
                    started: Instant::now(),
                    done: 0,
                    total: 0,
                    outcome: None,
                    elapsed: Duration::ZERO,
                },
            );
        }
        let this = self.clone();
        tokio::spawn(async move {
            let progress_to = this.clone();
            let result = rebuild::rebuild(&pool, projection, partitions, move |p| {
                if let Some(job) = progress_to.lock().get_mut(projection) {
                    job.done = p.done;
                    job.total = p.total;
                    job.elapsed = job.started.elapsed();
                }
            })
            .await;
            let outcome = match result {
                Ok(report) => {
                    tracing::info!(
                        projection,
                        generation = report.generation,
                        events = report.events,
                        "rebuild done"
                    );
                    Ok(format!(
                        "generation {} live (replaced {}), {} events read, {} applied in {:.1} s ({:.0} events/s)",
                        report.generation,
                        report.replaced.map_or("none".to_owned(), |g| g.to_string()),
                        report.events,
                        report.applied,
                        report.elapsed.as_secs_f64(),
                        report.events_per_second()
                    ))
                }
                Err(e) => {
                    tracing::warn!(projection, error = %e, "rebuild failed");
                    Err(e.to_string())
                }
            };
            if let Some(job) = this.lock().get_mut(projection) {
                job.elapsed = job.started.elapsed();
                if outcome.is_ok() {
                    job.done = job.done.max(job.total);
                }
                job.outcome = Some(outcome);
            }
        });
        Ok(projection)
    }
}
