//! The benchmark report: `target/bench/report.json`, the table printed on stdout (Markdown,
//! so BENCHMARKS.md can quote it as printed) and the description of the machine.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use chrono::{SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use crate::measurement::Measurement;

/// One scenario's row. A value is `None` (JSON `null`) where it does not apply or was not
/// measured in this run (`baseline` where the stock cqrs-es + postgres-es baseline has no
/// counterpart: the in-process appends and the relay).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScenarioResult {
    pub name: String,
    /// Unit of `limit`, `baseline` and `tally`, e.g. `appends/s`.
    pub unit: String,
    pub limit: Option<f64>,
    pub baseline: Option<f64>,
    pub tally: Option<f64>,
    /// `tally / limit`: the share of the limit Tally reaches.
    pub ratio_limit: Option<f64>,
    /// `tally / baseline`.
    pub ratio_baseline: Option<f64>,
    /// Tally's latency percentiles, where measured per operation.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Tally's failed operations by kind (HTTP status or error kind), where counted.
    pub errors: Option<BTreeMap<String, u64>>,
    /// The baseline's median latency, where it was measured per operation.
    #[serde(default)]
    pub baseline_p50_ms: Option<f64>,
    /// The baseline's failed operations by kind, where it was measured (e.g. `"409"` for the
    /// optimistic-concurrency conflicts stock cqrs-es answers a hot account with).
    pub baseline_errors: Option<BTreeMap<String, u64>>,
}

impl ScenarioResult {
    /// A row comparing Tally's measurement with the limit measured next to it.
    pub fn compare(name: &str, unit: &str, limit: &Measurement, tally: &Measurement) -> Self {
        let ratio_limit = (limit.ops_per_s > 0.0).then(|| round(tally.ops_per_s / limit.ops_per_s, 3));
        Self {
            name: name.to_owned(),
            unit: unit.to_owned(),
            limit: Some(round(limit.ops_per_s, 1)),
            baseline: None,
            tally: Some(round(tally.ops_per_s, 1)),
            ratio_limit,
            ratio_baseline: None,
            p50_ms: tally.latency_ms.map(|l| round(l.p50, 3)),
            p99_ms: tally.latency_ms.map(|l| round(l.p99, 3)),
            errors: Some(tally.errors.clone()),
            baseline_p50_ms: None,
            baseline_errors: None,
        }
    }

    /// A row with only its limit: Tally's side could not be measured in this run (e.g. the
    /// feature it needs has not landed), so its columns are null.
    pub fn limit_only(name: &str, unit: &str, limit: &Measurement) -> Self {
        Self {
            name: name.to_owned(),
            unit: unit.to_owned(),
            limit: Some(round(limit.ops_per_s, 1)),
            baseline: None,
            tally: None,
            ratio_limit: None,
            ratio_baseline: None,
            p50_ms: None,
            p99_ms: None,
            errors: None,
            baseline_p50_ms: None,
            baseline_errors: None,
        }
    }

    /// The row with the baseline measured next to Tally: its throughput, `tally / baseline`,
    /// and its failures.
    pub fn with_baseline(self, baseline: &Measurement) -> Self {
        let ratio_baseline = match self.tally {
            Some(tally) if baseline.ops_per_s > 0.0 => Some(round(tally / baseline.ops_per_s, 3)),
            _ => None,
        };
        Self {
            baseline: Some(round(baseline.ops_per_s, 1)),
            ratio_baseline,
            baseline_p50_ms: baseline.latency_ms.map(|l| round(l.p50, 3)),
            baseline_errors: Some(baseline.errors.clone()),
            ..self
        }
    }
}

/// `target/bench/report.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// CPU, cores, memory, kernel and server versions: what the numbers were measured on.
    pub machine: String,
    /// When the run started (RFC 3339, UTC).
    pub started_at: String,
    pub scenarios: Vec<ScenarioResult>,
}

impl Report {
    pub fn new(machine: String, started_at: String) -> Self {
        Self {
            machine,
            started_at,
            scenarios: Vec::new(),
        }
    }

    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        let mut json = serde_json::to_string_pretty(self)?;
        json.push('\n');
        std::fs::write(path, json)?;
        Ok(())
    }

    /// The scenarios as a Markdown table.
    pub fn markdown_table(&self) -> String {
        let mut table = String::from(
            "| scenario | unit | limit | baseline | tally | tally/limit | tally/baseline | p50 ms | p99 ms | baseline p50 ms | errors | baseline errors |\n\
             |---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|---|\n",
        );
        for s in &self.scenarios {
            let _ = writeln!(
                table,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                s.name,
                s.unit,
                cell(s.limit, 0),
                cell(s.baseline, 0),
                cell(s.tally, 0),
                cell(s.ratio_limit, 2),
                cell(s.ratio_baseline, 2),
                cell(s.p50_ms, 2),
                cell(s.p99_ms, 1),
                cell(s.baseline_p50_ms, 2),
                errors_cell(s.errors.as_ref()),
                errors_cell(s.baseline_errors.as_ref()),
            );
        }
        table
    }
}

/// Now, as RFC 3339 in UTC to the second.
pub fn timestamp_now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

fn cell(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
}

fn errors_cell(errors: Option<&BTreeMap<String, u64>>) -> String {
    match errors {
        None => "-".to_owned(),
        Some(errors) if errors.is_empty() => "0".to_owned(),
        Some(errors) => errors
            .iter()
            .map(|(kind, count)| format!("{kind}: {count}"))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// A one-line description of this machine and the servers' versions.
pub fn describe_machine(postgres_version: &str, nats_version: &str) -> String {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let cpu = cpu_model(&read("/proc/cpuinfo")).unwrap_or_else(|| std::env::consts::ARCH.to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = memory_gib(&read("/proc/meminfo")).map_or_else(|| "? GiB".to_owned(), |g| format!("{g:.0} GiB"));
    let kernel = read("/proc/sys/kernel/osrelease");
    format!(
        "{cpu}, {cores} cores, {memory} RAM, Linux {}; PostgreSQL {postgres_version} (fsync on), NATS {nats_version}",
        kernel.trim()
    )
}

/// The first `model name` of /proc/cpuinfo.
fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .find(|line| line.starts_with("model name"))
        .and_then(|line| line.split_once(':'))
        .map(|(_, model)| model.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// `MemTotal` of /proc/meminfo, in GiB.
fn memory_gib(meminfo: &str) -> Option<f64> {
    let line = meminfo.lines().find(|line| line.starts_with("MemTotal:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(ops_per_s: f64) -> Measurement {
        Measurement::throughput((ops_per_s * 10.0) as u64, 10.0, BTreeMap::new())
    }

    #[test]
    fn a_row_reports_tally_as_a_share_of_the_limit_and_leaves_the_baseline_null() {
        let row = ScenarioResult::compare("append-1", "appends/s", &measured(3000.0), &measured(1500.0));
        assert_eq!(row.ratio_limit, Some(0.5));
        let json = serde_json::to_value(&row).unwrap();
        assert!(json["baseline"].is_null());
        assert!(json["ratio_baseline"].is_null());
        assert!(json["baseline_errors"].is_null());
        assert!(json["p99_ms"].is_null());
        assert_eq!(json["errors"], serde_json::json!({}));
    }

    #[test]
    fn a_row_with_a_baseline_reports_tally_as_a_multiple_of_it_and_its_failures() {
        let mut baseline = measured(500.0);
        baseline.errors.insert("409".into(), 42);
        let row = ScenarioResult::compare("hot-account", "commands/s", &measured(3000.0), &measured(1500.0))
            .with_baseline(&baseline);
        assert_eq!(row.baseline, Some(500.0));
        assert_eq!(row.ratio_baseline, Some(3.0));
        assert_eq!(row.ratio_limit, Some(0.5));
        assert_eq!(row.baseline_errors, Some(BTreeMap::from([("409".to_owned(), 42)])));
        let idle = ScenarioResult::compare("x", "ops/s", &measured(1.0), &measured(1.0)).with_baseline(&measured(0.0));
        assert_eq!(idle.ratio_baseline, None);
    }

    #[test]
    fn the_table_shows_errors_by_kind_and_dashes_for_missing_values() {
        let mut report = Report::new("test machine".into(), timestamp_now());
        let mut tally = measured(100.0);
        tally.errors.insert("409".into(), 7);
        report.scenarios.push(ScenarioResult::compare(
            "hot-account",
            "commands/s",
            &measured(2900.0),
            &tally,
        ));
        let table = report.markdown_table();
        assert!(
            table.contains("| hot-account | commands/s | 2900 | - | 100 | 0.03 | - | - | - | - | 409: 7 | - |"),
            "{table}"
        );
    }

    #[test]
    fn the_machine_description_reads_cpu_model_and_memory() {
        let cpuinfo = "processor\t: 0\nmodel name\t: AMD EPYC   7B13\nprocessor\t: 1\nmodel name\t: AMD EPYC 7B13\n";
        assert_eq!(cpu_model(cpuinfo).as_deref(), Some("AMD EPYC 7B13"));
        let gib = memory_gib("MemTotal:       25165824 kB\nMemFree: 1 kB\n").unwrap();
        assert!((gib - 24.0).abs() < 1e-9);
    }
}
