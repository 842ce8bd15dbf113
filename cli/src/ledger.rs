//! `tally ledger reconcile`: every read model compared with a fold of the log
//! (`tally_projectors::reconcile`), the differences printed, exit 1 on any.
//!
//! Exit codes: 0 when the read models equal the log, 1 when they differ, 2 when the log or the
//! read models could not be read. With `--pushgateway URL` the outcome is also pushed to a
//! Prometheus Pushgateway (the way Prometheus documents for batch jobs), as
//! `tally_reconcile_differences{model}` and `tally_reconcile_last_run_timestamp_seconds`, so an
//! alert can fire on a difference found by a scheduled run.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use tally_projectors::reconcile::{self, MODELS, Report};

use crate::progress::ProgressReporter;

/// Exit code: the read models differ from the log.
const EXIT_DIFFERENT: u8 = 1;
/// Exit code: the log or the read models could not be read.
const EXIT_UNREADABLE: u8 = 2;

#[derive(Debug, clap::Subcommand)]
pub enum LedgerCommand {
    /// Fold the log and compare it with every read model (balances, statements, transfers,
    /// totals); print the differences and exit 1 on any.
    Reconcile(ReconcileArgs),
}

#[derive(Debug, clap::Args)]
pub struct ReconcileArgs {
    /// How long to wait for projectors that have not yet written a row for a stream of the log
    /// before reporting it missing (`30s`, `2m`).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_wait)]
    wait: Duration,
    /// Differences printed at most (all are counted).
    #[arg(long, value_name = "N", default_value_t = 50)]
    max_shown: usize,
    /// Push the outcome to this Prometheus Pushgateway (`http://host:9091`), job
    /// `tally_reconcile`.
    #[arg(long, value_name = "URL", env = "TALLY_PUSHGATEWAY_URL")]
    pushgateway: Option<String>,
}

fn parse_wait(text: &str) -> Result<Duration, String> {
    crate::checkpoints::parse_duration(text, Duration::ZERO, Duration::from_secs(3600))
}

pub async fn run(database_url: &str, command: LedgerCommand) -> ExitCode {
    let LedgerCommand::Reconcile(args) = command;
    let pool = match tally_event_store::connect(database_url, 2) {
        Ok(pool) => pool,
        Err(e) => {
            eprintln!("error: cannot connect to the database: {e}");
            return ExitCode::from(EXIT_UNREADABLE);
        }
    };
    let mut reporter = ProgressReporter::new("folded");
    let outcome = reconcile::reconcile(&pool, args.wait, |p| reporter.update(p)).await;
    reporter.finish();
    let report = match outcome {
        Ok(report) => report,
        Err(e) => {
            eprintln!("error: cannot reconcile: {e}");
            return ExitCode::from(EXIT_UNREADABLE);
        }
    };
    print_report(&report, args.max_shown);
    if let Some(url) = &args.pushgateway
        && let Err(e) = push(url, &report).await
    {
        eprintln!("error: cannot push the outcome to {url}: {e:#}");
        return ExitCode::from(EXIT_UNREADABLE);
    }
    if report.differences.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_DIFFERENT)
    }
}

fn print_report(report: &Report, max_shown: usize) {
    for difference in report.differences.iter().take(max_shown) {
        println!("DIFFERENT: {difference}");
    }
    if report.differences.len() > max_shown {
        println!("... and {} more", report.differences.len() - max_shown);
    }
    let per_model: Vec<String> = MODELS
        .iter()
        .map(|m| {
            format!(
                "{m} {} rows, {} different",
                report.compared.get(m).copied().unwrap_or(0),
                report.count(m)
            )
        })
        .collect();
    let totals = if report.totals_against_log {
        "totals against the log"
    } else {
        "totals against the balance rows (the log moved during the check)"
    };
    let verdict = if report.differences.is_empty() {
        "reconciled"
    } else {
        "NOT reconciled"
    };
    println!(
        "{verdict}: {} events folded up to {}.{}; {}; {totals}",
        report.events,
        report.head.tx_id,
        report.head.position,
        per_model.join(", ")
    );
}

/// The report as gauges in this process's recorder: what a push sends.
fn record(report: &Report, now_s: i64) {
    for model in MODELS {
        metrics::gauge!("tally_reconcile_differences", "model" => model).set(report.count(model) as f64);
    }
    metrics::gauge!("tally_reconcile_last_run_timestamp_seconds").set(now_s as f64);
}

/// Replaces the `tally_reconcile` job's metrics on a Pushgateway.
async fn push(url: &str, report: &Report) -> anyhow::Result<()> {
    record(report, chrono::Utc::now().timestamp());
    let body = tally_service::metrics::install().render();
    let endpoint = format!("{}/metrics/job/tally_reconcile", url.trim_end_matches('/'));
    let response = reqwest::Client::new()
        .put(&endpoint)
        .header(reqwest::header::CONTENT_TYPE, "text/plain; version=0.0.4")
        .timeout(Duration::from_secs(10))
        .body(body)
        .send()
        .await
        .context("sending")?;
    let status = response.status();
    anyhow::ensure!(status.is_success(), "the Pushgateway answered {status}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_projectors::reconcile::Difference;

    #[test]
    fn the_pushed_text_has_a_series_per_model_even_without_differences() {
        let handle = tally_service::metrics::install();
        let mut report = Report::default();
        report.differences.push(Difference {
            model: "transfers",
            key: "k".into(),
            got: "a".into(),
            want: "b".into(),
        });
        record(&report, 1_700_000_000);
        let text = handle.render();
        for model in MODELS {
            let want = if model == "transfers" { 1 } else { 0 };
            assert!(
                text.contains(&format!("tally_reconcile_differences{{model=\"{model}\"}} {want}\n")),
                "{text}"
            );
        }
        assert!(
            text.contains("tally_reconcile_last_run_timestamp_seconds 1700000000\n"),
            "{text}"
        );
    }
}
