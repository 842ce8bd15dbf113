//! `cargo xtask up`: the whole stack on this machine until Ctrl-C. Plain: a Postgres primary
//! with a streaming replica and one NATS server. `--ha`: three Postgres nodes under Patroni
//! (leader lock in etcd, synchronous replication) behind HAProxy, three clustered NATS servers
//! keeping the stream at three replicas, and two of each Tally service. Either way on free
//! ports in temporary folders, from the installed binaries; Ctrl-C leaves nothing running.

use std::fs::File;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use tally_devstack::{HaOptions, HaPostgres, Nats, NatsCluster, PgOptions, Postgres};
use tally_event_store::nats_users::{self, Credentials};
use tally_event_store::partition::Topology;
use tally_event_store::roles;
use tally_service::auth::{Claims, Role};

use crate::stack::{Inherit, Service, prepare_database};
use crate::{cargo, target_dir};

/// Name of the database `xtask up` creates for the stack.
const DATABASE: &str = "tally";

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
    /// High availability: Patroni + etcd + HAProxy (three Postgres nodes, synchronous
    /// replication), a three-server NATS cluster, and two of each service.
    #[arg(long)]
    ha: bool,
    /// With `--ha`: the second command API's address.
    #[arg(long, default_value = "127.0.0.1:8084")]
    command_listen_2: SocketAddr,
    /// With `--ha`: the second command API's operations address.
    #[arg(long, default_value = "127.0.0.1:9183")]
    command_ops_listen_2: SocketAddr,
}

/// The stack's Postgres: a primary with a replica, or a Patroni cluster behind HAProxy.
enum Database {
    Plain(Postgres),
    Ha(HaPostgres),
}

impl Database {
    fn primary_url(&self, database: &str) -> String {
        match self {
            Database::Plain(pg) => pg.primary_url(database),
            Database::Ha(ha) => ha.primary_url(database),
        }
    }

    fn replica_url(&self, database: &str) -> String {
        match self {
            Database::Plain(pg) => pg.replica_url(database).expect("the plain stack starts a replica"),
            Database::Ha(ha) => ha.replica_url(database),
        }
    }

    fn describe(&self) -> String {
        match self {
            Database::Plain(_) => format!(
                "{} (primary)\n                {} (replica)",
                self.primary_url(DATABASE),
                self.replica_url(DATABASE)
            ),
            Database::Ha(ha) => format!(
                "{} (HAProxy, read-write: the Patroni leader)\n                {} (HAProxy, read-only: the standbys)\n  Patroni       {}   (patronictl: see README, High availability)",
                self.primary_url(DATABASE),
                self.replica_url(DATABASE),
                ha.patroni_urls().join("  ")
            ),
        }
    }

    /// What the env file adds for this kind of database.
    fn exports(&self) -> String {
        match self {
            Database::Plain(_) => String::new(),
            Database::Ha(ha) => {
                let (rw, ro) = ha.router_ports();
                format!(
                    "export TALLY_PATRONI_URLS={}\nexport TALLY_HAPROXY_RW_PORT={rw}\nexport TALLY_HAPROXY_RO_PORT={ro}\n",
                    ha.patroni_urls().join(",")
                )
            }
        }
    }

    fn stop(self) {
        match self {
            Database::Plain(pg) => pg.stop(),
            Database::Ha(ha) => ha.stop(),
        }
    }
}

/// The stack's NATS: one server, or a cluster.
enum Broker {
    Single(Nats),
    Cluster(NatsCluster),
}

impl Broker {
    /// What `TALLY_NATS_URL` takes: the server's URL, or every cluster server's, comma-separated.
    fn url(&self) -> String {
        match self {
            Broker::Single(nats) => nats.url(),
            Broker::Cluster(cluster) => cluster.urls(),
        }
    }
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
        // A previous run that was killed hard: its servers died with it (parent-death signal),
        // all but Postgres under Patroni, which runs in a session of its own.
        tally_devstack::kill_orphaned_postmasters(&root);
        std::fs::remove_dir_all(&root).with_context(|| format!("removing stale {}", root.display()))?;
    }
    let log_dir = root.join("logs");
    std::fs::create_dir_all(&log_dir)?;
    let nats_credentials = Credentials::generate();
    // Two of each service on the HA stack; one command API and one relay on the plain one.
    let (database, broker, replicas) = if args.ha {
        println!(
            "starting etcd, three Postgres nodes under Patroni (synchronous replication) behind HAProxy, and three clustered NATS servers under {}",
            root.display()
        );
        let ha = HaPostgres::start(
            &root.join("pg"),
            HaOptions {
                nodes: 3,
                durable: true,
            },
        )?;
        let cluster = NatsCluster::start(
            &root.join("nats"),
            3,
            &nats_credentials.authorization(&Topology::default()),
        )?;
        (Database::Ha(ha), Broker::Cluster(cluster), 3)
    } else {
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
        let nats = Nats::start_with_config(
            &root.join("nats"),
            &nats_credentials.authorization(&Topology::default()),
        )?;
        (Database::Plain(pg), Broker::Single(nats), 1)
    };
    let runtime = tokio::runtime::Runtime::new()?;
    let database_url = database.primary_url(DATABASE);
    let replica_url = database.replica_url(DATABASE);
    runtime.block_on(prepare_database(&database_url))?;

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
    // The command APIs: one, or two on the HA stack (the first answers on the plain stack's
    // address).
    let mut commands = vec![(args.command_listen, args.command_ops_listen)];
    if args.ha {
        commands.push((args.command_listen_2, args.command_ops_listen_2));
    }
    let relays = &RELAY_LISTEN[..if args.ha { 2 } else { 1 }];
    let command_urls: Vec<String> = commands.iter().map(|(listen, _)| format!("http://{listen}")).collect();
    let env_file = root.join("env");
    std::fs::write(
        &env_file,
        format!(
            "export TALLY_DATABASE_URL={database_url}\nexport TALLY_REPLICA_URL={replica_url}\nexport TALLY_NATS_URL={}\nexport TALLY_NATS_USER={}\nexport TALLY_NATS_PASSWORD={}\nexport TALLY_COMMAND_URL={}\nexport TALLY_COMMAND_URLS={}\nexport TALLY_QUERY_URL=http://{}\nexport TALLY_CONSOLE_URL=http://{}\nexport TALLY_JWT_SECRET={secret}\n{}{token_exports}export TALLY_TOKEN=$TALLY_TOKEN_TELLER\n",
            broker.url(),
            nats_users::ADMIN,
            nats_credentials.password(nats_users::ADMIN),
            command_urls[0],
            command_urls.join(","),
            args.query_listen.first().context("at least one query-api address")?,
            args.console_listen,
            database.exports(),
        ),
    )?;

    // The dev stack lifts the per-client rate limit (one developer's token is one client, and
    // `tally load` against it sends thousands of requests a second) unless the developer set one.
    let lifted = |name: &str| std::env::var(name).unwrap_or_else(|_| "100000".to_owned());
    let common = [
        ("TALLY_DATABASE_URL", database_url.clone()),
        ("TALLY_NATS_URL", broker.url()),
        ("TALLY_NATS_REPLICAS", replicas.to_string()),
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
    let mut services = Vec::new();
    for (i, (listen, ops_listen)) in commands.iter().enumerate() {
        services.push(spawn(
            "tally-command-api",
            &format!("command-api-{}", i + 1),
            &with(vec![
                ("TALLY_COMMAND_LISTEN", listen.to_string()),
                ("TALLY_COMMAND_OPS_LISTEN", ops_listen.to_string()),
                ("TALLY_DATABASE_URL", as_role(roles::COMMAND)),
            ]),
        )?);
    }
    // Relays: one publishes at a time (leadership in Postgres), the other stands by.
    for (i, listen) in relays.iter().enumerate() {
        services.push(spawn(
            "tally-relay",
            &format!("relay-{}", i + 1),
            &with(
                vec![
                    ("TALLY_RELAY_LISTEN", (*listen).to_owned()),
                    ("TALLY_DATABASE_URL", as_role(roles::RELAY)),
                ]
                .into_iter()
                .chain(nats_credentials.env(nats_users::RELAY))
                .collect(),
            ),
        )?);
    }
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
    let queries: Vec<String> = args.query_listen.iter().map(|a| format!("http://{a}")).collect();
    let commands_ops: Vec<String> = commands.iter().map(|(_, ops)| format!("http://{ops}")).collect();
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
            ("TALLY_CONSOLE_COMMAND_URLS", commands_ops.join(",")),
            ("TALLY_CONSOLE_QUERY_URLS", queries_ops.join(",")),
            (
                "TALLY_CONSOLE_RELAY_URLS",
                relays
                    .iter()
                    .map(|l| format!("http://{l}"))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            (
                "TALLY_CONSOLE_PROJECTOR_URLS",
                PROJECTOR_LISTEN.map(|l| format!("http://{l}")).join(","),
            ),
        ]),
    )?);
    let console_service = services.len() - 1;
    runtime.block_on(async {
        for (i, command) in command_urls.iter().enumerate() {
            services[i].wait_ready(command).await?;
        }
        for (i, q) in queries.iter().enumerate() {
            services[first_query + i].wait_ready(q).await?;
        }
        services[console_service].wait_ready(&console).await?;
        anyhow::Ok(())
    })?;
    let seeded = if args.seed {
        runtime.block_on(seed(&client, &command_urls[0], &teller))?
    } else {
        Vec::new()
    };

    let ops: Vec<String> = commands_ops.into_iter().chain(queries_ops).collect();
    print_banner(&Banner {
        commands: &command_urls,
        queries: &queries,
        ops: &ops,
        relays,
        console: &console,
        database: &database,
        nats: &broker.url(),
        env_file: &env_file,
        log_dir: &log_dir,
        seeded: &seeded,
    });
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
    drop(broker);
    database.stop();
    // The exports point at servers that no longer exist; the logs stay for a post-mortem.
    let _ = std::fs::remove_file(&env_file);
    println!("stopped; nothing left running (logs kept in {})", log_dir.display());
    outcome
}

/// Where `up` runs the relay's probe listener and the projectors'.
const RELAY_LISTEN: [&str; 2] = ["127.0.0.1:9092", "127.0.0.1:9093"];
const PROJECTOR_LISTEN: [&str; 2] = ["127.0.0.1:9090", "127.0.0.1:9091"];

/// What the banner lists.
struct Banner<'a> {
    commands: &'a [String],
    queries: &'a [String],
    ops: &'a [String],
    relays: &'a [&'a str],
    console: &'a str,
    database: &'a Database,
    nats: &'a str,
    env_file: &'a Path,
    log_dir: &'a Path,
    seeded: &'a [String],
}

fn print_banner(banner: &Banner<'_>) {
    let Banner {
        commands,
        queries,
        ops,
        relays,
        console,
        database,
        nats,
        env_file,
        log_dir,
        seeded,
    } = *banner;
    let command = &commands[0];
    let q = &queries[0];
    let workers: Vec<String> = ops
        .iter()
        .cloned()
        .chain(
            relays
                .iter()
                .chain(PROJECTOR_LISTEN.iter())
                .map(|listen| format!("http://{listen}")),
        )
        .collect();
    println!(
        "\nProbes and Prometheus metrics (/health, /ready, /metrics): the APIs' operations listeners, relays and projectors at {}",
        workers.join("  ")
    );
    println!(
        "\nTally is up.\n\n  console       {console}/   (sign in with a dev token below: ops sees the overview and projections, reader accounts, auditor audit)\n  command API   {}\n  query API     {}\n  Postgres      {}\n  NATS          {nats}\n  env exports   {}   (source it for psql / tally)\n  logs          {}\n",
        commands.join("  "),
        queries.join("  "),
        database.describe(),
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
