//! `cargo xtask test`, and what it shares with `up` (up.rs) and `bench`: ephemeral services
//! from the installed binaries, and Tally's own processes.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tally_devstack::{Nats, PgOptions, Postgres};
use tally_event_store::nats_users::{self, Credentials};
use tally_event_store::partition::Topology;

use crate::{cargo, target_dir};

/// How long a freshly started service has to answer `/ready`.
const SERVICE_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long services get to drain after SIGTERM before they are killed.
const SERVICE_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A service process (a Tally binary) with its output in a log file, stopped with SIGTERM
/// (then SIGKILL) on drop, so an error or an interrupt anywhere leaves nothing running. Used
/// by `up` and by `bench`.
pub(crate) struct Service {
    pub(crate) name: String,
    child: Child,
    pub(crate) log: PathBuf,
}

/// Which of the caller's environment variables a service sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Inherit {
    /// All of them (`up`: a developer's `TALLY_LOG` reaches the services).
    All,
    /// All but `TALLY_*` (`bench`: a developer's settings, say from target/tally-dev/env,
    /// must not change what is measured).
    AllButTally,
}

impl Service {
    pub(crate) fn spawn(
        bin: &Path,
        args: &[&str],
        name: &str,
        log: &Path,
        env: &[(&str, String)],
        inherit: Inherit,
    ) -> anyhow::Result<Self> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut command = Command::new(bin);
        if inherit == Inherit::AllButTally {
            for (key, _) in std::env::vars_os() {
                if key.to_string_lossy().starts_with("TALLY_") {
                    command.env_remove(key);
                }
            }
        }
        let child = command
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            // Own process group: the terminal's Ctrl-C reaches xtask only, which then stops
            // the services in order.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {} (was it built?)", bin.display()))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
        })
    }

    pub(crate) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Resolves when the process exits on its own.
    pub(crate) async fn exit(&mut self) -> std::process::ExitStatus {
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `GET {base}/ready` answers 200; fails if the process exits first or
    /// [`SERVICE_READY_TIMEOUT`] passes.
    pub(crate) async fn wait_ready(&mut self, base: &str) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + SERVICE_READY_TIMEOUT;
        loop {
            if let Some(status) = self.exited() {
                bail!("{} exited ({status}); see {}", self.name, self.log.display());
            }
            if let Ok(r) = client.get(format!("{base}/ready")).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} not ready after {SERVICE_READY_TIMEOUT:?}; see {}",
                    self.name,
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(crate) fn stop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        let pid = self.child.id() as libc::pid_t;
        signal(pid, libc::SIGTERM);
        let deadline = Instant::now() + SERVICE_STOP_TIMEOUT;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop();
    }
}

#[allow(unsafe_code)]
fn signal(pid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions; pid is our own child's.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// `(variable, a free loopback address)` for an API's operations listener (`/metrics`), so a
/// bench or schemathesis run does not contend with a dev stack for the default port.
pub(crate) fn free_ops_listen(variable: &'static str) -> anyhow::Result<(&'static str, String)> {
    Ok((variable, format!("127.0.0.1:{}", tally_devstack::free_port()?)))
}

/// A NATS server under `root` that requires a password, with a fresh one for each service's
/// user and only the permissions `nats_users` gives it on `topology`.
pub(crate) fn start_nats(root: &Path, topology: &Topology) -> anyhow::Result<(Nats, Credentials)> {
    let credentials = Credentials::generate();
    let nats = Nats::start_with_config(root, &credentials.authorization(topology))?;
    Ok((nats, credentials))
}

/// Creates `database` on the primary (`admin_url`: its `postgres` database) unless it exists;
/// the caller applies its migrations.
pub(crate) async fn create_database(admin_url: &str, database: &str) -> anyhow::Result<()> {
    let admin = sqlx::PgPool::connect(admin_url).await?;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(database)
        .fetch_one(&admin)
        .await?;
    if !exists {
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{database}\"")))
            .execute(&admin)
            .await?;
    }
    admin.close().await;
    Ok(())
}

/// Creates `database` if absent and applies every migration (`url`: the database's URL).
pub(crate) async fn prepare_database(url: &str) -> anyhow::Result<()> {
    let (server, database) = url.rsplit_once('/').context("a database URL ends in /DATABASE")?;
    create_database(&format!("{server}/postgres"), database).await?;
    let pool = sqlx::PgPool::connect(url).await?;
    tally_event_store::migrate(&pool).await?;
    tally_projectors::migrate(&pool).await?;
    pool.close().await;
    Ok(())
}

pub fn test(extra: &[String]) -> anyhow::Result<()> {
    // Build once: the binaries the end-to-end tests start, and the test executables.
    cargo(&["build", "--workspace", "--bins"])?;
    let use_nextest = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["nextest", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());

    let root = target_dir().join("tally-test").join(std::process::id().to_string());
    let _ = std::fs::remove_dir_all(&root);
    let pg = Postgres::start(
        &root.join("pg"),
        PgOptions {
            replica: true,
            durable: false,
        },
    )?;
    // One server for every test: each has a stream and prefix of its own.
    let (nats, nats_credentials) = start_nats(&root.join("nats"), &nats_users::shared_topology())?;
    println!(
        "test services: postgres {} (replica {}), nats {}",
        pg.primary_port(),
        pg.replica_port().unwrap_or_default(),
        nats.url()
    );

    let cargo_bin = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo_bin);
    if use_nextest {
        cmd.args(["nextest", "run", "--workspace", "--no-fail-fast"]);
    } else {
        cmd.args(["test", "--workspace", "--no-fail-fast"]);
    }
    let status = cmd
        .args(extra)
        .current_dir(crate::workspace_root())
        .env("TALLY_TEST_DATABASE_URL", pg.primary_url("postgres"))
        .env("TALLY_TEST_REPLICA_URL", pg.replica_url("postgres").unwrap_or_default())
        .env("TALLY_TEST_NATS_URL", nats.url())
        .env("TALLY_TEST_NATS_PASSWORDS", nats_credentials.encode())
        // The binaries just built, unless the caller names others (release builds, to measure).
        .env(
            "TALLY_BIN_DIR",
            // Absolute: the test binaries run in their packages' folders.
            match std::env::var_os("TALLY_BIN_DIR") {
                Some(dir) => std::path::absolute(dir).context("TALLY_BIN_DIR")?,
                None => target_dir().join("debug"),
            },
        )
        .status()
        .context("running the test suite")?;
    // Hostile input against both APIs, on the same servers (a database of its own). A filtered
    // run (runner arguments given) is a developer's quick loop: it is skipped there.
    let fuzzed = if extra.is_empty() {
        crate::schemathesis::run(&pg, &nats, &nats_credentials)
    } else {
        println!("runner arguments given: schemathesis skipped (cargo xtask schemathesis runs it alone)");
        Ok(())
    };
    drop(nats);
    pg.stop();
    let _ = std::fs::remove_dir(root.parent().unwrap_or(&root));
    if !status.success() {
        bail!("tests failed ({status})");
    }
    fuzzed
}
