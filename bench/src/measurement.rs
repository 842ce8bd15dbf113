//! What one measurement reports, and the per-worker recorder it is built from.
//!
//! [`Measurement`] is a JSON contract: `tally-bench` prints it, `tally load --json` prints a
//! superset of it under the same field names, and `cargo xtask bench` reads both.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest latency the histograms hold, in microseconds (one hour); longer ones saturate.
const LATENCY_MAX_US: u64 = 3_600_000_000;
/// Significant decimal digits kept by the histograms (0.1 % resolution).
const LATENCY_SIGNIFICANT_DIGITS: u8 = 3;

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LatencyMs {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
}

/// One measured run of one workload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    /// Successful operations counted inside the measured window.
    pub ops: u64,
    /// Length of the measured window in seconds (warm-up excluded).
    pub seconds: f64,
    /// `ops / seconds`.
    pub ops_per_s: f64,
    /// Latency of every operation counted, successful or not; `None` when not measured per
    /// operation (a backlog drained as a whole).
    pub latency_ms: Option<LatencyMs>,
    /// Failed operations by kind: an HTTP status (`"409"`) or an error kind (`"conflict"`).
    pub errors: BTreeMap<String, u64>,
}

impl Measurement {
    /// A measurement of `ops` operations over `seconds` without per-operation latencies.
    pub fn throughput(ops: u64, seconds: f64, errors: BTreeMap<String, u64>) -> Self {
        Self {
            ops,
            seconds,
            ops_per_s: per_second(ops, seconds),
            latency_ms: None,
            errors,
        }
    }
}

/// A limit measured just before and just after Tally's measurement, so that a machine whose
/// speed drifts during the run (a shared disk, other work) does not favour either side.
#[derive(Debug, Clone, PartialEq)]
pub struct Bracket {
    pub before: Measurement,
    pub after: Measurement,
}

impl Bracket {
    /// Both measurements as one: their operations over their combined time (latencies are
    /// not kept; a limit reports throughput only).
    pub fn combined(&self) -> Measurement {
        let ops = self.before.ops + self.after.ops;
        let seconds = self.before.seconds + self.after.seconds;
        let mut errors = self.before.errors.clone();
        for (kind, count) in &self.after.errors {
            *errors.entry(kind.clone()).or_default() += count;
        }
        Measurement::throughput(ops, seconds, errors)
    }

    /// How far the two measurements lie apart, relative to the smaller one (0.25: 25 %).
    pub fn drift(&self) -> f64 {
        let (a, b) = (self.before.ops_per_s, self.after.ops_per_s);
        let smaller = a.min(b);
        if smaller > 0.0 {
            (a - b).abs() / smaller
        } else {
            f64::INFINITY
        }
    }
}

/// `count / seconds`, 0 for an empty window rather than infinity or NaN.
pub fn per_second(count: u64, seconds: f64) -> f64 {
    if seconds > 0.0 { count as f64 / seconds } else { 0.0 }
}

/// Outcomes and latencies seen by one worker. Each worker owns one, so recording never
/// contends; they are merged once the run is over.
#[derive(Debug, Clone)]
pub struct Recorder {
    latencies_us: Histogram<u64>,
    ok: u64,
    errors: BTreeMap<&'static str, u64>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    pub fn new() -> Self {
        let latencies_us = Histogram::new_with_bounds(1, LATENCY_MAX_US, LATENCY_SIGNIFICANT_DIGITS)
            .expect("constant histogram bounds are valid");
        Self {
            latencies_us,
            ok: 0,
            errors: BTreeMap::new(),
        }
    }

    /// Records one finished operation: its latency and whether it succeeded.
    pub fn record(&mut self, latency: Duration, outcome: Result<(), &'static str>) {
        self.record_ops(latency, outcome, 1);
    }

    /// [`Self::record`] for an operation that does `ops` of the measured unit at once (a
    /// transaction of many rows): each counts, the latency is recorded once.
    pub fn record_ops(&mut self, latency: Duration, outcome: Result<(), &'static str>, ops: u64) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).max(1);
        self.latencies_us.saturating_record(us);
        match outcome {
            Ok(()) => self.ok += ops,
            Err(kind) => *self.errors.entry(kind).or_default() += 1,
        }
    }

    pub fn merge(&mut self, other: &Recorder) {
        // Same bounds on both sides: adding cannot fail.
        self.latencies_us
            .add(&other.latencies_us)
            .expect("histograms share their bounds");
        self.ok += other.ok;
        for (kind, count) in &other.errors {
            *self.errors.entry(kind).or_default() += count;
        }
    }

    /// The measurement over a window of `window` (throughput counts successes only).
    pub fn measurement(&self, window: Duration) -> Measurement {
        let seconds = window.as_secs_f64();
        let latency_ms = (!self.latencies_us.is_empty()).then(|| latency_summary(&self.latencies_us));
        Measurement {
            ops: self.ok,
            seconds,
            ops_per_s: per_second(self.ok, seconds),
            latency_ms,
            errors: self.errors.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
        }
    }
}

/// The percentiles of a histogram of microseconds, in milliseconds (also used by `tally load`).
pub fn latency_summary(us: &Histogram<u64>) -> LatencyMs {
    let ms = |q: f64| us.value_at_quantile(q) as f64 / 1000.0;
    LatencyMs {
        p50: ms(0.5),
        p90: ms(0.9),
        p99: ms(0.99),
        p99_9: ms(0.999),
        max: us.max() as f64 / 1000.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorder_counts_successes_as_throughput_and_failures_by_kind() {
        let mut a = Recorder::new();
        for ms in 1..=100 {
            a.record(Duration::from_millis(ms), Ok(()));
        }
        let mut b = Recorder::new();
        b.record(Duration::from_millis(500), Err("conflict"));
        a.merge(&b);

        let m = a.measurement(Duration::from_secs(2));

        assert_eq!(m.ops, 100);
        assert!((m.ops_per_s - 50.0).abs() < 1e-9);
        assert_eq!(m.errors.get("conflict"), Some(&1));
        let latency = m.latency_ms.unwrap();
        // 101 latencies: 1 to 100 ms and 500 ms; the median is the 51st.
        assert!((latency.p50 - 51.0).abs() < 0.1, "{latency:?}");
        assert!((latency.max - 500.0).abs() < 0.5, "{latency:?}");
    }

    #[test]
    fn a_bracketed_limit_averages_its_two_measurements_and_reports_their_drift() {
        let bracket = Bracket {
            before: Measurement::throughput(1_000, 10.0, BTreeMap::new()),
            after: Measurement::throughput(1_500, 10.0, BTreeMap::from([("database".to_owned(), 2)])),
        };

        let limit = bracket.combined();

        assert!((limit.ops_per_s - 125.0).abs() < 1e-9);
        assert_eq!(limit.errors.get("database"), Some(&2));
        assert!((bracket.drift() - 0.5).abs() < 1e-9);
    }

    #[test]
    fn an_empty_window_reports_zero_throughput_and_no_latencies() {
        let m = Recorder::new().measurement(Duration::ZERO);
        assert_eq!(m.ops_per_s, 0.0);
        assert!(m.latency_ms.is_none());
    }
}
