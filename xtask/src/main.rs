//! `cargo xtask`: developer tasks.
//!
//! - `up`: the whole stack on this machine (Postgres primary + replica and NATS from the
//!   installed binaries, then every Tally service), until Ctrl-C; `up --ha`: the same on
//!   Patroni + etcd + HAProxy and a three-server NATS cluster, two of each service.
//! - `test`: the same ephemeral services, then the whole workspace test suite, then
//!   `schemathesis` (unless runner arguments were given).
//! - `schemathesis`: generated requests against both APIs' OpenAPI documents (schemathesis).
//! - `bench`: the write-path benchmark (limits vs Tally, same run), see BENCHMARKS.md.
//! - `schemas`: rewrites the checked-in JSON Schemas and OpenAPI documents from the code.
//! - `check-deploy`: validates `docker-compose.yml` and `deploy/` and checks them against the code.

mod bench;
mod deploy;
mod schemathesis;
mod stack;
mod up;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Run the whole stack locally until Ctrl-C.
    Up(up::UpArgs),
    /// Start ephemeral Postgres (primary + replica) and NATS, run every test and then
    /// schemathesis against both APIs, stop them.
    Test {
        /// Extra arguments for the test runner (cargo nextest run / cargo test). With any,
        /// only the runner runs (schemathesis is skipped).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Measure the write path against its limits (release build, durable Postgres, NATS).
    Bench(bench::BenchArgs),
    /// Run schemathesis (from PyPI, in a venv under the target directory) against both APIs'
    /// OpenAPI documents on a stack of its own.
    Schemathesis,
    /// Write schemas/events/*.json, schemas/checkpoints/*.json and schemas/openapi/*.json from the code.
    Schemas,
    /// Validate docker-compose.yml and deploy/ (docker-compose config, Kubernetes schemas,
    /// promtool on the alert rules and dashboards) and check them against the binaries'
    /// configuration and metrics.
    CheckDeploy,
}

/// The workspace root (this crate lives one level below it).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// The cargo target directory (honours `CARGO_TARGET_DIR`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| if p.is_relative() { workspace_root().join(p) } else { p })
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Runs `cargo <args>` in the workspace and fails if it fails.
pub fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("running {cargo} {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Up(args) => up::up(args),
        Task::Test { args } => stack::test(&args),
        Task::Bench(args) => bench::bench(args),
        Task::Schemathesis => schemathesis::schemathesis(),
        Task::Schemas => write_schemas(),
        Task::CheckDeploy => deploy::check_deploy(),
    }
}

fn write_schemas() -> anyhow::Result<()> {
    let dir = tally_schemas::events_dir();
    std::fs::create_dir_all(&dir)?;
    for (file, schema) in tally_schemas::current_event_schemas() {
        let path = dir.join(&file);
        std::fs::write(&path, tally_schemas::render(&schema)).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    let (file, schema) = tally_schemas::checkpoint_schema();
    let dir = tally_schemas::checkpoints_dir();
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(file);
    std::fs::write(&path, tally_schemas::render(&schema)).with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    let documents = [
        (
            tally_command_api::openapi::FILE_NAME,
            tally_command_api::openapi::document(),
        ),
        (
            tally_query_api::openapi::FILE_NAME,
            tally_query_api::openapi::document(),
        ),
    ];
    for (file_name, document) in documents {
        let path = tally_service::openapi::checked_in_path(file_name);
        let text = tally_service::openapi::render(&document);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
