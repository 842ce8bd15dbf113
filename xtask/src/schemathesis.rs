//! `cargo xtask schemathesis`, also the last step of `cargo xtask test`: hostile input against
//! both APIs as they run.
//!
//! [schemathesis](https://pypi.org/project/schemathesis/) (from PyPI, pinned, installed into a
//! venv under the target directory on first use) reads each API's `GET /openapi.json` and
//! throws generated requests at every operation it lists: valid and invalid bodies, path
//! parameters and headers, wrong methods. Every request carries a token with every role, so
//! the handlers, not only the authentication, are reached. The run fails when any response is
//! a 5xx, breaks the document (undocumented status, wrong content type, a body or header not
//! matching its schema), when an invalid request is accepted, or when fewer than
//! [`CASES_MIN`] cases were generated in all; each document's run is bounded by
//! [`TIME_BUDGET_S`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use tally_devstack::{Nats, PgOptions, Postgres};
use tally_event_store::nats_users::{self, Credentials};
use tally_event_store::partition::Topology;
use tally_service::auth::{Claims, Role};

use crate::stack::{Inherit, Service, free_ops_listen};
use crate::target_dir;

/// The schemathesis release this check was written against.
const SCHEMATHESIS: &str = "schemathesis==4.32.5";
/// Generated cases, over both documents, below which the run does not count.
const CASES_MIN: u64 = 1_000;
/// Most cases per operation and phase (`--max-examples`).
const EXAMPLES_PER_OPERATION: u32 = 50;
/// Time budget of one document's run (`--max-time`), in seconds.
const TIME_BUDGET_S: u64 = 50;
/// The checks (`--checks`): no 5xx, responses as documented, invalid input refused.
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
                      response_headers_conformance,response_schema_conformance,negative_data_rejection";
/// Name of the database the checked stack runs on.
const DATABASE: &str = "schemathesis";
/// Secret of the checked stack's tokens.
const SECRET: &str = "schemathesis-hs256-secret-0123456789abcdef";

/// `cargo xtask schemathesis`: its own Postgres and NATS, then [`run`].
pub fn schemathesis() -> anyhow::Result<()> {
    crate::cargo(&["build", "--workspace", "--bins"])?;
    let root = target_dir().join("schemathesis").join("servers");
    let _ = std::fs::remove_dir_all(&root);
    let pg = Postgres::start(
        &root.join("pg"),
        PgOptions {
            replica: false,
            durable: false,
        },
    )?;
    let (nats, credentials) = crate::stack::start_nats(&root.join("nats"), &Topology::default())?;
    let result = run(&pg, &nats, &credentials);
    drop(nats);
    pg.stop();
    result
}

/// What one document's run found.
#[derive(Debug, Default)]
struct Outcome {
    cases: u64,
    statuses: BTreeMap<u16, u64>,
    failures: Vec<String>,
}

/// Starts the command API, the query API, the relay and a projector on `pg` and `nats`, and
/// runs schemathesis against both APIs.
pub fn run(pg: &Postgres, nats: &Nats, credentials: &Credentials) -> anyhow::Result<()> {
    let st = ensure_schemathesis()?;
    let dir = target_dir().join("schemathesis");
    let logs = dir.join("logs");
    let reports = dir.join("reports");
    let _ = std::fs::remove_dir_all(&reports);
    std::fs::create_dir_all(&logs)?;
    std::fs::create_dir_all(&reports)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(crate::stack::prepare_database(&pg.primary_url(DATABASE)))?;

    let bin_dir = target_dir().join("debug");
    let (command_port, query_port) = (tally_devstack::free_port()?, tally_devstack::free_port()?);
    let common = [
        ("TALLY_DATABASE_URL", pg.primary_url(DATABASE)),
        ("TALLY_NATS_URL", nats.url()),
        ("TALLY_JWT_SECRET", SECRET.to_owned()),
        ("TALLY_LOG", "info".to_owned()),
        // Thousands of generated requests from one token: lifted, so every case reaches its
        // handler instead of a 429.
        ("TALLY_RATE_LIMIT_PER_S", "1000000".to_owned()),
        ("TALLY_RATE_LIMIT_BURST", "1000000".to_owned()),
    ];
    let spawn = |bin: &str, extra: &[(&'static str, String)]| {
        let env: Vec<(&str, String)> = common.iter().cloned().chain(extra.iter().cloned()).collect();
        Service::spawn(
            &bin_dir.join(bin),
            &[],
            bin,
            &logs.join(format!("{bin}.log")),
            &env,
            Inherit::AllButTally,
        )
    };
    let command = format!("http://127.0.0.1:{command_port}");
    let query = format!("http://127.0.0.1:{query_port}");
    let mut command_api = spawn(
        "tally-command-api",
        &[
            ("TALLY_COMMAND_LISTEN", format!("127.0.0.1:{command_port}")),
            free_ops_listen("TALLY_COMMAND_OPS_LISTEN")?,
        ],
    )?;
    let mut query_api = spawn(
        "tally-query-api",
        &[
            ("TALLY_QUERY_LISTEN", format!("127.0.0.1:{query_port}")),
            free_ops_listen("TALLY_QUERY_OPS_LISTEN")?,
        ]
        .into_iter()
        .chain(credentials.env(nats_users::QUERY))
        .collect::<Vec<_>>(),
    )?;
    let _relay = spawn("tally-relay", &credentials.env(nats_users::RELAY))?;
    let _projector = spawn(
        "tally-projector",
        &[(
            "TALLY_PROJECTOR_LISTEN",
            format!("127.0.0.1:{}", tally_devstack::free_port()?),
        )]
        .into_iter()
        .chain(credentials.env(nats_users::PROJECTOR))
        .collect::<Vec<_>>(),
    )?;
    runtime.block_on(async {
        command_api.wait_ready(&command).await?;
        query_api.wait_ready(&query).await
    })?;
    let token = tally_service::auth::mint(SECRET.as_bytes(), &Claims::new("schemathesis", &Role::ALL, 3_600));

    let started = Instant::now();
    let mut total = Outcome::default();
    for (name, base) in [("command-api", &command), ("query-api", &query)] {
        let outcome = run_one(&st, name, base, &token, &reports.join(name))?;
        println!(
            "schemathesis {name}: {} cases, statuses {:?}, {} failures",
            outcome.cases,
            outcome.statuses,
            outcome.failures.len()
        );
        total.cases += outcome.cases;
        for (status, n) in outcome.statuses {
            *total.statuses.entry(status).or_default() += n;
        }
        total
            .failures
            .extend(outcome.failures.into_iter().map(|f| format!("{name}: {f}")));
    }
    let server_errors: u64 = total.statuses.range(500..).map(|(_, n)| n).sum();
    let panicked = [&command_api, &query_api]
        .iter()
        .filter(|s| std::fs::read_to_string(&s.log).is_ok_and(|log| log.contains("panicked")))
        .map(|s| s.name.clone())
        .collect::<Vec<_>>();
    println!(
        "schemathesis: {} cases in {:.0?}, statuses {:?}; reports in {}",
        total.cases,
        started.elapsed(),
        total.statuses,
        reports.display()
    );
    if !total.failures.is_empty() || server_errors > 0 || !panicked.is_empty() || total.cases < CASES_MIN {
        bail!(
            "schemathesis: {} failures, {server_errors} responses 5xx, panics in {panicked:?}, {} cases (at least \
             {CASES_MIN} wanted):\n{}\nservice logs in {}",
            total.failures.len(),
            total.cases,
            total.failures.join("\n"),
            logs.display()
        );
    }
    Ok(())
}

/// Runs schemathesis against `{base}/openapi.json`.
fn run_one(st: &Path, name: &str, base: &str, token: &str, reports: &Path) -> anyhow::Result<Outcome> {
    std::fs::create_dir_all(reports)?;
    let json = reports.join("report.json");
    let har = reports.join("requests.har");
    let output = Command::new(st)
        .arg("run")
        .arg(format!("{base}/openapi.json"))
        .args(["--url", base])
        .args(["--header", &format!("Authorization: Bearer {token}")])
        .args(["--checks", CHECKS])
        .args(["--max-examples", &EXAMPLES_PER_OPERATION.to_string()])
        .args(["--max-time", &TIME_BUDGET_S.to_string()])
        // One worker: hypothesis's internals are not thread-safe everywhere (a second worker
        // made it trip over its own lambda cache), and CI has two cores for everything.
        .args(["--workers", "1", "--seed", "1", "--no-color", "--warnings", "off"])
        .args(["--report", "json,har"])
        .arg("--report-json-path")
        .arg(&json)
        .arg("--report-har-path")
        .arg(&har)
        .env("SCHEMATHESIS_HOOKS", "")
        // Its cache (`.schemathesis/`) goes next to the reports, not into the workspace.
        .current_dir(reports)
        .output()
        .with_context(|| format!("running {}", st.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::write(reports.join("output.txt"), &text)?;
    let report: serde_json::Value = std::fs::read_to_string(&json)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .with_context(|| format!("schemathesis wrote no report for {name}; its output:\n{text}"))?;
    let mut outcome = Outcome {
        cases: report["test_cases"]["generated"].as_u64().unwrap_or(0),
        ..Outcome::default()
    };
    for failure in report["failures"].as_array().into_iter().flatten() {
        outcome.failures.push(format!(
            "{} {} ({}×) in {}",
            failure["code"].as_str().unwrap_or("?"),
            failure["title"].as_str().unwrap_or("?"),
            failure["count"],
            failure["operations"]
        ));
    }
    for error in report["errors"].as_array().into_iter().flatten() {
        outcome.failures.push(format!("error: {error}"));
    }
    if !output.status.success() && outcome.failures.is_empty() {
        outcome
            .failures
            .push(format!("schemathesis exited {}:\n{text}", output.status));
    }
    if !outcome.failures.is_empty() {
        outcome
            .failures
            .push(format!("details in {}", reports.join("output.txt").display()));
    }
    let har: serde_json::Value = std::fs::read_to_string(&har)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    for entry in har["log"]["entries"].as_array().into_iter().flatten() {
        if let Some(status) = entry["response"]["status"].as_u64() {
            *outcome.statuses.entry(status as u16).or_default() += 1;
        }
    }
    Ok(outcome)
}

/// The `st` executable of a venv under the target directory, installed on first use.
fn ensure_schemathesis() -> anyhow::Result<PathBuf> {
    let venv = target_dir().join("schemathesis").join("venv");
    let st = venv.join("bin").join("st");
    let stamp = venv.join("installed");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == SCHEMATHESIS) && st.exists() {
        return Ok(st);
    }
    println!("installing {SCHEMATHESIS} into {}", venv.display());
    let status = Command::new("python3")
        .arg("-m")
        .arg("venv")
        .arg(&venv)
        .status()
        .context("python3 -m venv (Debian: apt-get install python3-venv)")?;
    if !status.success() {
        bail!("python3 -m venv failed ({status}); Debian: apt-get install python3-venv");
    }
    let status = Command::new(venv.join("bin").join("pip"))
        .args(["install", "--quiet", SCHEMATHESIS])
        .status()
        .context("pip install schemathesis")?;
    if !status.success() {
        bail!("pip install {SCHEMATHESIS} failed ({status})");
    }
    std::fs::write(&stamp, SCHEMATHESIS)?;
    Ok(st)
}
