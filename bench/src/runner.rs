//! Closed-loop workers: each sends its next operation as soon as the previous one is answered,
//! which is how a fixed pool of database connections or writers behaves.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::measurement::{Measurement, Recorder};

/// A warm-up, not recorded (connections open, caches fill), then the measured window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub warmup: Duration,
    pub measure: Duration,
}

/// One worker's operation, run again and again. An error is a short kind (`"conflict"`) that
/// the measurement counts; the run goes on.
pub trait Operation: Send + 'static {
    fn run(&mut self) -> impl Future<Output = Result<(), &'static str>> + Send;

    /// How many of the measured unit one successful run does (rows of a multi-row insert).
    fn ops(&self) -> u64 {
        1
    }
}

/// Runs every worker concurrently in a closed loop for `window` and measures them together.
///
/// An operation is counted when it *completes* inside the measured window, so throughput is
/// completions per second of window; one still in flight at the end is not counted.
pub async fn closed_loop<O: Operation>(workers: Vec<O>, window: Window) -> anyhow::Result<Measurement> {
    let measure_from = Instant::now() + window.warmup;
    let until = measure_from + window.measure;
    let tasks: Vec<_> = workers
        .into_iter()
        .map(|worker| tokio::spawn(work(worker, measure_from, until)))
        .collect();
    let mut total = Recorder::new();
    for task in tasks {
        total.merge(&task.await?);
    }
    Ok(total.measurement(window.measure))
}

async fn work<O: Operation>(mut worker: O, measure_from: Instant, until: Instant) -> Recorder {
    let mut recorder = Recorder::new();
    loop {
        let sent = Instant::now();
        if sent >= until {
            return recorder;
        }
        let outcome = worker.run().await;
        let done = Instant::now();
        if done >= measure_from && done <= until {
            recorder.record_ops(done - sent, outcome, worker.ops());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Sleeper;

    impl Operation for Sleeper {
        async fn run(&mut self) -> Result<(), &'static str> {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn closed_loop_workers_each_complete_one_operation_per_latency_inside_the_window() {
        let window = Window {
            warmup: Duration::from_millis(100),
            measure: Duration::from_secs(1),
        };

        let m = closed_loop(vec![Sleeper, Sleeper], window).await.unwrap();

        // Two workers, 10 ms per operation, one second: 200 operations (± one at each edge).
        assert!((198..=202).contains(&m.ops), "{m:?}");
        assert!(m.errors.is_empty());
        assert!((m.latency_ms.unwrap().p50 - 10.0).abs() < 0.1);
    }
}
