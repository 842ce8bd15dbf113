//! What `tally load` records and reports.
//!
//! The JSON report's `ops`, `seconds`, `ops_per_s`, `latency_ms` and `errors` fields share
//! their names and meaning with `tally_bench::Measurement`: `cargo xtask bench` reads them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use tally_bench::LatencyMs;
use tally_bench::measurement::latency_summary;

/// Highest latency the histogram holds, in microseconds (one hour); longer ones saturate.
const LATENCY_MAX_US: u64 = 3_600_000_000;
/// Significant decimal digits kept by the histogram (0.1 % resolution).
const LATENCY_SIGNIFICANT_DIGITS: u8 = 3;

/// How one request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The server answered with this HTTP status.
    Status(u16),
    /// No answer within the request timeout.
    Timeout,
    /// The connection failed (refused, reset, closed mid-response).
    Transport,
}

impl Outcome {
    pub fn from_error(error: &reqwest::Error) -> Self {
        if error.is_timeout() {
            Self::Timeout
        } else {
            Self::Transport
        }
    }

    pub fn is_success(self) -> bool {
        matches!(self, Self::Status(s) if (200..300).contains(&s))
    }

    fn key(self) -> String {
        match self {
            Self::Status(status) => status.to_string(),
            Self::Timeout => "timeout".to_owned(),
            Self::Transport => "transport".to_owned(),
        }
    }
}

/// One worker's latencies and outcomes, merged into the others' when the run ends.
#[derive(Debug, Clone)]
pub struct Recorder {
    latencies_us: Histogram<u64>,
    outcomes: BTreeMap<String, u64>,
    ok: u64,
    /// Latest completion counted, measured from the start of the window.
    last_done: Duration,
}

impl Default for Recorder {
    fn default() -> Self {
        Self {
            latencies_us: Histogram::new_with_bounds(1, LATENCY_MAX_US, LATENCY_SIGNIFICANT_DIGITS)
                .expect("constant histogram bounds are valid"),
            outcomes: BTreeMap::new(),
            ok: 0,
            last_done: Duration::ZERO,
        }
    }
}

impl Recorder {
    /// Records a counted request: its latency (from when it was due), when it completed
    /// relative to the window's start, and what it did. A batch counts each item that took
    /// effect as one operation, and its refused items as `item-refused` errors.
    pub fn record(&mut self, latency: Duration, done_in_window: Duration, sent: super::Sent) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).max(1);
        self.latencies_us.saturating_record(us);
        *self.outcomes.entry(sent.outcome.key()).or_default() += 1;
        match sent.items {
            Some((ok, refused)) => {
                self.ok += ok;
                if refused > 0 {
                    *self.outcomes.entry("item-refused".to_owned()).or_default() += refused;
                }
            }
            None if sent.outcome.is_success() => self.ok += 1,
            None => {}
        }
        self.last_done = self.last_done.max(done_in_window);
    }

    pub fn merge(&mut self, other: &Recorder) {
        self.latencies_us
            .add(&other.latencies_us)
            .expect("histograms share their bounds");
        for (key, count) in &other.outcomes {
            *self.outcomes.entry(key.clone()).or_default() += count;
        }
        self.ok += other.ok;
        self.last_done = self.last_done.max(other.last_done);
    }
}

/// The result of one `tally load` run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadReport {
    pub scenario: &'static str,
    pub url: String,
    /// `closed` or `open`.
    pub mode: &'static str,
    pub connections: usize,
    /// Open loop: the scheduled requests per second.
    pub rate_per_s: Option<f64>,
    pub warmup_s: f64,
    /// The measured time: the window, or longer in open loop while its backlog drained.
    pub seconds: f64,
    /// 2xx answers counted (a batch: its items that took effect).
    pub ops: u64,
    /// Throughput: `ops` per second.
    pub ops_per_s: f64,
    /// Every answer counted, whatever its status.
    pub requests: u64,
    pub requests_per_s: f64,
    /// Counted answers by status (`"201"`, `"409"`) or failure (`"timeout"`, `"transport"`).
    pub statuses: BTreeMap<String, u64>,
    /// `statuses` without the 2xx ones, plus `"not-sent"` (open loop requests due in the
    /// window that were never sent because the server fell too far behind).
    pub errors: BTreeMap<String, u64>,
    /// Latency of every counted request, from when it was due (open loop) or sent (closed).
    pub latency_ms: Option<LatencyMs>,
    /// CPU time this process used while it generated the load (user + system).
    pub cpu_s: f64,
    /// `cpu_s` per second of load: how many cores the generator itself kept busy.
    pub cpu_cores: f64,
}

/// What was asked for, copied into the report.
#[derive(Debug, Clone)]
pub struct RunShape {
    pub scenario: &'static str,
    pub url: String,
    pub connections: usize,
    /// Open loop: the scheduled requests per second.
    pub rate: Option<f64>,
    pub warmup: Duration,
    pub window: Duration,
}

/// What the run measured.
#[derive(Debug, Clone, Copy)]
pub struct Measured<'a> {
    /// Every worker's recorder, merged.
    pub total: &'a Recorder,
    /// Open loop: requests due in the window that were never sent.
    pub not_sent: u64,
    /// CPU time the generator used while the load ran.
    pub cpu: Duration,
    /// Wall time the load ran, warm-up included.
    pub wall: Duration,
}

impl LoadReport {
    pub fn new(shape: &RunShape, measured: Measured<'_>) -> Self {
        let total = measured.total;
        // In open loop the backlog of the window may complete after it; the rate is over the
        // time it really took.
        let seconds = shape.window.max(total.last_done).as_secs_f64();
        let requests: u64 = total.outcomes.values().sum();
        let mut errors: BTreeMap<String, u64> = total
            .outcomes
            .iter()
            .filter(|(key, _)| !key.starts_with('2'))
            .map(|(key, count)| (key.clone(), *count))
            .collect();
        if measured.not_sent > 0 {
            errors.insert("not-sent".to_owned(), measured.not_sent);
        }
        let cpu_s = measured.cpu.as_secs_f64();
        Self {
            scenario: shape.scenario,
            url: shape.url.clone(),
            mode: if shape.rate.is_some() { "open" } else { "closed" },
            connections: shape.connections,
            rate_per_s: shape.rate,
            warmup_s: shape.warmup.as_secs_f64(),
            seconds,
            ops: total.ok,
            ops_per_s: per_second(total.ok, seconds),
            requests,
            requests_per_s: per_second(requests, seconds),
            statuses: total.outcomes.clone(),
            errors,
            latency_ms: (!total.latencies_us.is_empty()).then(|| latency_summary(&total.latencies_us)),
            cpu_s,
            cpu_cores: cpu_s / measured.wall.as_secs_f64().max(f64::EPSILON),
        }
    }

    /// The report for a person.
    pub fn human(&self) -> String {
        let mut out = String::new();
        let mode = match self.rate_per_s {
            Some(rate) => format!("open loop at {rate} requests/s"),
            None => "closed loop".to_owned(),
        };
        let _ = writeln!(
            out,
            "{} against {}: {mode}, {} connections, {:.1} s measured after {:.1} s warm-up",
            self.scenario, self.url, self.connections, self.seconds, self.warmup_s
        );
        let _ = writeln!(
            out,
            "  throughput   {:.1} ok/s ({} ok of {} requests, {:.1} requests/s)",
            self.ops_per_s, self.ops, self.requests, self.requests_per_s
        );
        let errors: Vec<String> = self.errors.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        let _ = writeln!(
            out,
            "  errors       {}",
            if errors.is_empty() {
                "none".to_owned()
            } else {
                errors.join(", ")
            }
        );
        if let Some(l) = self.latency_ms {
            let _ = writeln!(
                out,
                "  latency ms   p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
                l.p50, l.p90, l.p99, l.p99_9, l.max
            );
        }
        let _ = writeln!(
            out,
            "  generator    {:.2} CPU-s ({:.2} cores)",
            self.cpu_s, self.cpu_cores
        );
        out
    }
}

fn per_second(count: u64, seconds: f64) -> f64 {
    if seconds > 0.0 { count as f64 / seconds } else { 0.0 }
}

/// CPU time (user + system) this process has used so far, from getrusage(2).
#[allow(unsafe_code)]
pub fn cpu_time() -> std::io::Result<Duration> {
    // SAFETY: an all-zero `rusage` is a valid value, and getrusage only writes into the
    // struct we pass, which outlives the call.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut usage) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        usage
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, (t.tv_usec as u32) * 1000);
    Ok(time(usage.ru_utime) + time(usage.ru_stime))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn single(outcome: Outcome) -> super::super::Sent {
        super::super::Sent { outcome, items: None }
    }

    #[test]
    fn a_batch_counts_each_item_that_took_effect_and_its_refusals_as_errors() {
        let mut r = Recorder::default();
        let batch = super::super::Sent {
            outcome: Outcome::Status(200),
            items: Some((98, 2)),
        };
        r.record(Duration::from_millis(5), Duration::from_secs(1), batch);
        assert_eq!(r.ok, 98);
        assert_eq!(r.outcomes.get("item-refused"), Some(&2));
        assert_eq!(r.outcomes.get("200"), Some(&1));
    }

    fn shape(rate: Option<f64>) -> RunShape {
        RunShape {
            scenario: "deposits",
            url: "http://127.0.0.1:8080".into(),
            connections: 4,
            rate,
            warmup: Duration::ZERO,
            window: Duration::from_secs(10),
        }
    }

    #[test]
    fn the_report_counts_2xx_as_throughput_and_everything_else_as_errors() {
        let mut a = Recorder::default();
        for _ in 0..90 {
            a.record(
                Duration::from_millis(2),
                Duration::from_secs(1),
                single(Outcome::Status(201)),
            );
        }
        let mut b = Recorder::default();
        for _ in 0..10 {
            b.record(
                Duration::from_millis(40),
                Duration::from_secs(2),
                single(Outcome::Status(409)),
            );
        }
        b.record(
            Duration::from_secs(30),
            Duration::from_secs(2),
            single(Outcome::Timeout),
        );
        a.merge(&b);

        let report = LoadReport::new(
            &shape(None),
            Measured {
                total: &a,
                not_sent: 0,
                cpu: Duration::from_secs(1),
                wall: Duration::from_secs(10),
            },
        );

        assert_eq!(report.ops, 90);
        assert!((report.ops_per_s - 9.0).abs() < 1e-9);
        assert_eq!(report.requests, 101);
        assert_eq!(report.errors.get("409"), Some(&10));
        assert_eq!(report.errors.get("timeout"), Some(&1));
        assert!(!report.errors.contains_key("201"));
        assert_eq!(report.statuses.get("201"), Some(&90));
        assert!((report.cpu_cores - 0.1).abs() < 1e-9);
        let latency = report.latency_ms.unwrap();
        assert!((latency.p50 - 2.0).abs() < 0.01, "{latency:?}");
        assert!(latency.max >= 30_000.0);
    }

    #[test]
    fn open_loop_throughput_is_over_the_time_the_backlog_took() {
        let mut r = Recorder::default();
        r.record(
            Duration::from_secs(5),
            Duration::from_secs(20),
            single(Outcome::Status(201)),
        );
        let report = LoadReport::new(
            &shape(Some(1.0)),
            Measured {
                total: &r,
                not_sent: 3,
                cpu: Duration::ZERO,
                wall: Duration::from_secs(20),
            },
        );
        assert_eq!(report.seconds, 20.0);
        assert_eq!(report.errors.get("not-sent"), Some(&3));
        assert_eq!(report.mode, "open");
    }

    #[test]
    fn cpu_time_is_readable_and_grows() {
        let before = cpu_time().unwrap();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(cpu_time().unwrap() >= before);
    }
}
