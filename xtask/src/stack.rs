//! `cargo xtask up` and `cargo xtask test`: ephemeral services from the installed binaries.

use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tally_devstack::{Nats, PgOptions, Postgres};
use tally_event_store::nats_users::{self, Credentials};
use tally_event_store::partition::Topology;
use tally_event_store::roles;
use tally_service::auth::{Claims, Role};

use crate::{cargo, target_dir};

/// Name of the database `xtask up` creates for the stack.
const DATABASE: &str = "tally";
/// How long a freshly started service has to answer `/ready`.
const SERVICE_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long services get to drain after SIGTERM before they are killed.
const SERVICE_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the dev tokens `xtask up` prints stay valid; `tally token` mints more.
const DEV_TOKEN_TTL_S: u64 = 24 * 60 * 60;
/// Subject of the dev tokens: the actor recorded in the events of their commands.
const DEV_TOKEN_SUBJECT: &str = "dev";

/// The stack's HS256 secret: `TALLY_JWT_SECRET` when set (so tokens survive a restart), else
/// 32 fresh random bytes, hex-encoded.
fn dev_secret() -> anyhow::Result<String> {
    if let Ok(secret) = std::env::var("TALLY_JWT_SECRET") {
        return Ok(secret);
    }
    let mut bytes = [0u8; 32];
    std::io::Read::read_exact(&mut File::open("/dev/urandom")?, &mut bytes).context("reading /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// One token per role, for `dev`.
fn dev_tokens(secret: &str) -> Vec<(Role, String)> {
    Role::ALL
        .into_iter()
        .map(|role| {
            let claims = Claims::new(DEV_TOKEN_SUBJECT, &[role], DEV_TOKEN_TTL_S);
            (role, tally_service::auth::mint(secret.as_bytes(), &claims))
        })
        .collect()
}

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Command API address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    command_listen: SocketAddr,
    /// Command API operations address (`/metrics`, `/health`, `/ready`).
    #[arg(long, default_value = "127.0.0.1:9180")]
    command_ops_listen: SocketAddr,
    /// Query API addresses: one instance each.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:8081,127.0.0.1:8082")]
    query_listen: Vec<SocketAddr>,
    /// Query API operations addresses, one per `--query-listen` address, in the same order.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:9181,127.0.0.1:9182")]
    query_ops_listen: Vec<SocketAddr>,
    /// Console address (the operations and audit pages).
    #[arg(long, default_value = "127.0.0.1:8083")]
    console_listen: SocketAddr,
    /// Open a few demo accounts with money in them.
    #[arg(long)]
    seed: bool,
    /// Build and run release binaries.
    #[arg(long)]
    release: bool,
}

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

/// A NATS server under `root` that requires a password, with a fresh one for each service's
/// user and only the permissions `nats_users` gives it on `topology`.
/// `(variable, a free loopback address)` for an API's operations listener (`/metrics`), so a
/// bench or schemathesis run does not contend with a dev stack for the default port.
pub(crate) fn free_ops_listen(variable: &'static str) -> anyhow::Result<(&'static str, String)> {
    Ok((variable, format!("127.0.0.1:{}", tally_devstack::free_port()?)))
}

pub(crate) fn start_nats(root: &Path, topology: &Topology) -> anyhow::Result<(Nats, Credentials)> {
    let credentials = Credentials::generate();
    let nats = Nats::start_with_config(root, &credentials.authorization(topology))?;
    Ok((nats, credentials))
}

/// Creates `database` on the primary unless it exists; the caller applies its migrations.
pub(crate) async fn create_database(pg: &Postgres, database: &str) -> anyhow::Result<()> {
    let admin = sqlx::PgPool::connect(&pg.primary_url("postgres")).await?;
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

/// Creates `database` if absent and applies every migration.
pub(crate) async fn prepare_database(pg: &Postgres, database: &str) -> anyhow::Result<()> {
    create_database(pg, database).await?;
    let pool = sqlx::PgPool::connect(&pg.primary_url(database)).await?;
    tally_event_store::migrate(&pool).await?;
    tally_projectors::migrate(&pool).await?;
    pool.close().await;
    Ok(())
}

async fn seed(client: &reqwest::Client, command: &str, teller: &str) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::new();
    for (owner, currency, amount) in [
        ("Ada Lovelace", "EUR", 125_000),
        ("Grace Hopper", "EUR", 50_000),
        ("Alan Turing", "GBP", 80_000),
    ] {
        let opened: serde_json::Value = client
            .post(format!("{command}/v1/accounts"))
            .bearer_auth(teller)
            .json(&serde_json::json!({ "owner": owner, "currency": currency }))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let id = opened["account_id"].as_str().context("no account_id")?.to_owned();
        client
            .post(format!("{command}/v1/accounts/{id}/deposits"))
            .bearer_auth(teller)
            // Deposits require a key; one per account, so the seed deposit happens once.
            .header("Idempotency-Key", format!("seed-{id}"))
            .json(&serde_json::json!({ "amount": amount, "reference": "seed" }))
            .send()
            .await?
            .error_for_status()?;
        ids.push(id);
    }
    Ok(ids)
}

pub fn up(args: UpArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.query_listen.len() == args.query_ops_listen.len(),
        "--query-ops-listen needs one address per --query-listen address ({} given for {})",
        args.query_ops_listen.len(),
        args.query_listen.len()
    );
    let profile = if args.release { "release" } else { "debug" };
    let mut build = vec!["build", "--workspace", "--bins"];
    if args.release {
        build.push("--release");
    }
    cargo(&build)?;
    let bin_dir = target_dir().join(profile);

    let root = target_dir().join("tally-dev");
    if root.exists() {
        // A previous run that was killed hard: its servers died with it (parent-death signal).
        std::fs::remove_dir_all(&root).with_context(|| format!("removing stale {}", root.display()))?;
    }
    let log_dir = root.join("logs");
    std::fs::create_dir_all(&log_dir)?;
    println!(
        "starting Postgres (primary + streaming replica) and NATS JetStream under {}",
        root.display()
    );
    let pg = Postgres::start(
        &root.join("pg"),
        PgOptions {
            replica: true,
            durable: true,
        },
    )?;
    let (nats, nats_credentials) = start_nats(&root.join("nats"), &Topology::default())?;

    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(prepare_database(&pg, DATABASE))?;

    let database_url = pg.primary_url(DATABASE);
    let replica_url = pg.replica_url(DATABASE).context("replica was requested")?;
    let secret = dev_secret()?;
    let tokens = dev_tokens(&secret);
    let token_exports: String = tokens
        .iter()
        .map(|(role, token)| format!("export TALLY_TOKEN_{}={token}\n", role.as_str().to_uppercase()))
        .collect();
    let teller = tokens
        .iter()
        .find(|(role, _)| *role == Role::Teller)
        .map(|(_, token)| token.clone())
        .context("a teller token")?;
    let env_file = root.join("env");
    std::fs::write(
        &env_file,
        format!(
            "export TALLY_DATABASE_URL={database_url}\nexport TALLY_REPLICA_URL={replica_url}\nexport TALLY_NATS_URL={}\nexport TALLY_NATS_USER={}\nexport TALLY_NATS_PASSWORD={}\nexport TALLY_COMMAND_URL=http://{}\nexport TALLY_QUERY_URL=http://{}\nexport TALLY_CONSOLE_URL=http://{}\nexport TALLY_JWT_SECRET={secret}\n{token_exports}export TALLY_TOKEN=$TALLY_TOKEN_TELLER\n",
            nats.url(),
            nats_users::ADMIN,
            nats_credentials.password(nats_users::ADMIN),
            args.command_listen,
            args.query_listen.first().context("at least one query-api address")?,
            args.console_listen,
        ),
    )?;

    // The dev stack lifts the per-client rate limit (one developer's token is one client, and
    // `tally load` against it sends thousands of requests a second) unless the developer set one.
    let lifted = |name: &str| std::env::var(name).unwrap_or_else(|_| "100000".to_owned());
    let common = [
        ("TALLY_DATABASE_URL", database_url.clone()),
        ("TALLY_NATS_URL", nats.url()),
        ("TALLY_JWT_SECRET", secret.clone()),
        ("TALLY_RATE_LIMIT_PER_S", lifted("TALLY_RATE_LIMIT_PER_S")),
        ("TALLY_RATE_LIMIT_BURST", lifted("TALLY_RATE_LIMIT_BURST")),
    ];
    let with = |extra: Vec<(&'static str, String)>| -> Vec<(&'static str, String)> {
        common.iter().cloned().chain(extra).collect()
    };
    let spawn = |bin: &str, name: &str, env: &[(&str, String)]| {
        Service::spawn(
            &bin_dir.join(bin),
            &[],
            name,
            &log_dir.join(format!("{name}.log")),
            env,
            Inherit::All,
        )
    };
    // Each service connects as its own role, with only the privileges it needs
    // (event-store/src/roles.rs); `tally migrate` created them.
    let as_role = |role: &str| tally_devstack::with_user(&database_url, role);
    let mut services = vec![
        spawn(
            "tally-command-api",
            "command-api",
            &with(vec![
                ("TALLY_COMMAND_LISTEN", args.command_listen.to_string()),
                ("TALLY_COMMAND_OPS_LISTEN", args.command_ops_listen.to_string()),
                ("TALLY_DATABASE_URL", as_role(roles::COMMAND)),
            ]),
        )?,
        spawn(
            "tally-relay",
            "relay",
            &with(
                vec![
                    ("TALLY_RELAY_LISTEN", RELAY_LISTEN.to_owned()),
                    ("TALLY_DATABASE_URL", as_role(roles::RELAY)),
                ]
                .into_iter()
                .chain(nats_credentials.env(nats_users::RELAY))
                .collect(),
            ),
        )?,
    ];
    // Two projector workers: they split the (projection, partition) units between them.
    for (i, listen) in PROJECTOR_LISTEN.iter().enumerate() {
        let name = format!("projector-{}", i + 1);
        services.push(spawn(
            "tally-projector",
            &name,
            &with(
                vec![
                    ("TALLY_PROJECTOR_WORKER_ID", name.clone()),
                    ("TALLY_PROJECTOR_LISTEN", (*listen).to_owned()),
                    ("TALLY_DATABASE_URL", as_role(roles::PROJECTOR)),
                ]
                .into_iter()
                .chain(nats_credentials.env(nats_users::PROJECTOR))
                .collect(),
            ),
        )?);
    }
    let first_query = services.len();
    for (i, (listen, ops_listen)) in args.query_listen.iter().zip(&args.query_ops_listen).enumerate() {
        services.push(spawn(
            "tally-query-api",
            &format!("query-api-{}", i + 1),
            &with(
                vec![
                    ("TALLY_QUERY_LISTEN", listen.to_string()),
                    ("TALLY_QUERY_OPS_LISTEN", ops_listen.to_string()),
                    (
                        "TALLY_REPLICA_URLS",
                        tally_devstack::with_user(&replica_url, roles::QUERY),
                    ),
                    ("TALLY_DATABASE_URL", as_role(roles::QUERY)),
                ]
                .into_iter()
                .chain(nats_credentials.env(nats_users::QUERY))
                .collect(),
            ),
        )?);
    }

    let client = reqwest::Client::new();
    let command = format!("http://{}", args.command_listen);
    let queries: Vec<String> = args.query_listen.iter().map(|a| format!("http://{a}")).collect();
    let command_ops = format!("http://{}", args.command_ops_listen);
    let queries_ops: Vec<String> = args.query_ops_listen.iter().map(|a| format!("http://{a}")).collect();
    let console = format!("http://{}", args.console_listen);
    // The console reads through the first query API and samples every service's /metrics (the
    // APIs' on their operations listeners).
    services.push(spawn(
        "tally-console",
        "console",
        &with(vec![
            ("TALLY_CONSOLE_LISTEN", args.console_listen.to_string()),
            ("TALLY_DATABASE_URL", as_role(roles::PROJECTOR)),
            ("TALLY_QUERY_URL", queries[0].clone()),
            ("TALLY_CONSOLE_COMMAND_URLS", command_ops.clone()),
            ("TALLY_CONSOLE_QUERY_URLS", queries_ops.join(",")),
            ("TALLY_CONSOLE_RELAY_URLS", format!("http://{RELAY_LISTEN}")),
            (
                "TALLY_CONSOLE_PROJECTOR_URLS",
                PROJECTOR_LISTEN.map(|l| format!("http://{l}")).join(","),
            ),
        ]),
    )?);
    let console_service = services.len() - 1;
    runtime.block_on(async {
        services[0].wait_ready(&command).await?;
        for (i, q) in queries.iter().enumerate() {
            services[first_query + i].wait_ready(q).await?;
        }
        services[console_service].wait_ready(&console).await?;
        anyhow::Ok(())
    })?;
    let seeded = if args.seed {
        runtime.block_on(seed(&client, &command, &teller))?
    } else {
        Vec::new()
    };

    let ops: Vec<String> = std::iter::once(command_ops).chain(queries_ops).collect();
    print_banner(
        &command, &queries, &ops, &console, &pg, &nats, &env_file, &log_dir, &seeded,
    );
    print_tokens(&tokens, &env_file);

    // Run until Ctrl-C / SIGTERM, or until a service dies on its own.
    let outcome = runtime.block_on(async {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                () = tally_service::shutdown::signal() => return Ok(()),
                _ = tick.tick() => {
                    for s in &mut services {
                        if let Some(status) = s.exited() {
                            bail!("{} exited unexpectedly ({status}); see {}", s.name, s.log.display());
                        }
                    }
                }
            }
        }
    });
    println!("\nstopping services…");
    // Reverse start order: readers and writers first, then NATS, then Postgres.
    while let Some(mut s) = services.pop() {
        s.stop();
    }
    drop(nats);
    pg.stop();
    // The exports point at servers that no longer exist; the logs stay for a post-mortem.
    let _ = std::fs::remove_file(&env_file);
    println!("stopped; nothing left running (logs kept in {})", log_dir.display());
    outcome
}

/// Where `up` runs the relay's probe listener and the projectors'.
const RELAY_LISTEN: &str = "127.0.0.1:9092";
const PROJECTOR_LISTEN: [&str; 2] = ["127.0.0.1:9090", "127.0.0.1:9091"];

#[allow(clippy::too_many_arguments)]
fn print_banner(
    command: &str,
    queries: &[String],
    ops: &[String],
    console: &str,
    pg: &Postgres,
    nats: &Nats,
    env_file: &Path,
    log_dir: &Path,
    seeded: &[String],
) {
    let q = &queries[0];
    let workers: Vec<String> = ops
        .iter()
        .cloned()
        .chain(
            std::iter::once(RELAY_LISTEN)
                .chain(PROJECTOR_LISTEN)
                .map(|listen| format!("http://{listen}")),
        )
        .collect();
    println!(
        "\nProbes and Prometheus metrics (/health, /ready, /metrics): the APIs' operations listeners, relay and projectors at {}",
        workers.join("  ")
    );
    println!(
        "\nTally is up.\n\n  console       {console}/   (sign in with a dev token below: ops sees the overview and projections, reader accounts, auditor audit)\n  command API   {command}\n  query API     {}\n  Postgres      {} (primary)\n                {} (replica)\n  NATS          {}\n  env exports   {}   (source it for psql / tally)\n  logs          {}\n",
        queries.join("  "),
        pg.primary_url(DATABASE),
        pg.replica_url(DATABASE).unwrap_or_default(),
        nats.url(),
        env_file.display(),
        log_dir.display(),
    );
    if !seeded.is_empty() {
        println!("  demo accounts {}\n", seeded.join(", "));
    }
    println!(
        r#"Try it:

  source {env}
  ID=$(curl -s -X POST {command}/v1/accounts -H 'content-type: application/json' \
        -H "Authorization: Bearer $TALLY_TOKEN_TELLER" \
        -d '{{"owner":"Ada","currency":"EUR"}}' | sed -E 's/.*"account_id":"([^"]+)".*/\1/')
  curl -s -X POST {command}/v1/accounts/$ID/deposits -H 'content-type: application/json' \
       -H "Authorization: Bearer $TALLY_TOKEN_TELLER" \
       -H "Idempotency-Key: salary-$ID" -d '{{"amount":1000,"reference":"salary"}}'
  curl -s -X POST {command}/v1/accounts/$ID/withdrawals -H 'content-type: application/json' \
       -H "Authorization: Bearer $TALLY_TOKEN_TELLER" \
       -H "Idempotency-Key: rent-$ID" -d '{{"amount":300,"reference":"rent"}}'
  curl -s {q}/v1/accounts/$ID -H "Authorization: Bearer $TALLY_TOKEN_READER"
  curl -s "{q}/v1/accounts/$ID/statement?limit=20" -H "Authorization: Bearer $TALLY_TOKEN_READER"
  curl -s "{q}/v1/audit/streams/$ID/events" -H "Authorization: Bearer $TALLY_TOKEN_AUDITOR"
  tally audit export --token "$TALLY_TOKEN_AUDITOR" --output feed.jsonl""#,
        env = env_file.display(),
    );
}

/// The dev token of each role, and where they are exported.
fn print_tokens(tokens: &[(Role, String)], env_file: &Path) {
    println!(
        "\nDev tokens (subject `{DEV_TOKEN_SUBJECT}`, valid {}h; exported as TALLY_TOKEN_<ROLE> in {}; \
         mint more with `tally token --role R --secret $TALLY_JWT_SECRET`):\n",
        DEV_TOKEN_TTL_S / 3600,
        env_file.display()
    );
    for (role, token) in tokens {
        println!("  {:<8} {token}", role.as_str());
    }
    println!("\nCtrl-C stops everything.");
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
        .env("TALLY_BIN_DIR", target_dir().join("debug"))
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
