//! The one-line progress of a running load: a redrawn line on a terminal, a log line every
//! few seconds otherwise (redraws would fill a log file with control characters).

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::stats::Outcome;

/// How often the terminal line is redrawn.
const BAR_REFRESH: Duration = Duration::from_millis(250);
/// How often a progress line is logged when stderr is not a terminal.
const LOG_INTERVAL: Duration = Duration::from_secs(2);

/// Counters every worker bumps as answers arrive, warm-up included; only the display reads
/// them (the report comes from the workers' own recorders).
#[derive(Debug, Default)]
pub struct Live {
    requests: AtomicU64,
    failed: AtomicU64,
}

impl Live {
    pub fn count(&self, outcome: Outcome) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if !outcome.is_success() {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The running display; [`Progress::finish`] removes it.
#[derive(Debug)]
pub struct Progress {
    task: JoinHandle<()>,
    bar: Option<ProgressBar>,
}

impl Progress {
    pub fn start(live: Arc<Live>, warmup: Duration, window: Duration) -> Self {
        let total = warmup + window;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(Some(total.as_millis() as u64), ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template("{bar:30} {msg}") {
                bar.set_style(style.progress_chars("=> "));
            }
            bar
        });
        let task = tokio::spawn(show(live, warmup, total, bar.clone()));
        Self { task, bar }
    }

    pub fn finish(self) {
        self.task.abort();
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}

async fn show(live: Arc<Live>, warmup: Duration, total: Duration, bar: Option<ProgressBar>) {
    let started = Instant::now();
    let mut tick = tokio::time::interval(if bar.is_some() { BAR_REFRESH } else { LOG_INTERVAL });
    tick.tick().await;
    let mut previous = (started, 0);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let requests = live.requests.load(Ordering::Relaxed);
        let failed = live.failed.load(Ordering::Relaxed);
        let rate = (requests - previous.1) as f64 / (now - previous.0).as_secs_f64().max(f64::EPSILON);
        previous = (now, requests);
        let elapsed = now - started;
        let phase = if elapsed < warmup { "warm-up" } else { "measuring" };
        let line = format!(
            "{phase} {:.1}/{:.1} s, {requests} requests, {rate:.0}/s now, {failed} non-2xx",
            elapsed.as_secs_f64(),
            total.as_secs_f64()
        );
        match &bar {
            Some(bar) => {
                bar.set_position(elapsed.as_millis() as u64);
                bar.set_message(line);
            }
            None => tracing::info!("{line}"),
        }
    }
}
