//! The test kit: real services for every test, isolated per test.
//!
//! Under `cargo xtask test` the Postgres cluster (primary + replica) and NATS server are
//! started once and passed in through `TALLY_TEST_*` variables. Run any other way
//! (`cargo test -p tally-tests`), the kit starts a private set for the test process.
//! Either way each test gets its own database ([`TestDb`]) and its own JetStream stream and
//! subject prefix ([`TestNats`]), so tests run in parallel and never see each other's data.
//! NATS requires a password: each service the kit starts signs in as its own NATS user, with
//! only that user's permissions (`tally_event_store::nats_users`); the tests' own clients sign
//! in as the admin user ([`TestNats::connect`]).
//!
//! Every service the kit starts verifies HS256 tokens signed with [`JWT_SECRET`]; the kit's
//! clients ([`Api`], [`client`]) send a token minted with it ([`token`]).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cqrs_es::Aggregate;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;
use tally_domain::Account;
use tally_event_store::nats_users::{self, Credentials};
use tally_event_store::{READ_LIMIT_MAX, roles};
use tally_service::auth::{Claims, Role};
use uuid::Uuid;

/// The HS256 secret of every service the kit starts (`TALLY_JWT_SECRET`).
pub const JWT_SECRET: &str = "tally-tests-hs256-secret-0123456789abcdef";
/// The subject of the kit's own clients: the actor of the events their commands append.
pub const TEST_SUBJECT: &str = "tally-tests";

/// A token for `subject` with `roles`, valid for an hour, that the kit's services accept.
pub fn token(subject: &str, roles: &[Role]) -> String {
    tally_service::auth::mint(JWT_SECRET.as_bytes(), &Claims::new(subject, roles, 3600))
}

/// The environment that makes a service verify the kit's tokens, and lifts the per-client
/// rate limit (every client of the kit is one subject, and load tests send thousands of
/// requests a second; a test of the limit sets its own after this).
pub fn auth_env() -> Vec<(&'static str, String)> {
    vec![
        ("TALLY_JWT_SECRET", JWT_SECRET.to_owned()),
        ("TALLY_RATE_LIMIT_PER_S", "1000000".to_owned()),
        ("TALLY_RATE_LIMIT_BURST", "1000000".to_owned()),
    ]
}

/// A client builder whose requests carry `Authorization: Bearer {token}`.
pub fn client_with(token: &str) -> reqwest::ClientBuilder {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}")
            .parse()
            .expect("a token is a valid header value"),
    );
    reqwest::Client::builder().default_headers(headers)
}

/// A client of both APIs as [`TEST_SUBJECT`] with the `teller` and `reader` roles.
pub fn client() -> reqwest::Client {
    client_with(&token(TEST_SUBJECT, &[Role::Teller, Role::Reader]))
        .build()
        .expect("a client")
}

pub mod browser;
pub mod fold;
pub mod link;
pub mod load;

/// The shared servers a test process uses.
#[derive(Debug, Clone)]
pub struct Services {
    /// Primary URL without a database name's meaning: the `postgres` maintenance database.
    pub primary_admin_url: String,
    pub replica_admin_url: Option<String>,
    pub nats_url: String,
    /// The NATS users' passwords.
    pub nats_credentials: Credentials,
}

fn with_database(url: &str, database: &str) -> String {
    let base = url.rsplit_once('/').map_or(url, |(b, _)| b);
    format!("{base}/{database}")
}

/// The servers for this process: from `cargo xtask test`, or started privately once.
pub fn services() -> &'static Services {
    static SERVICES: OnceLock<Services> = OnceLock::new();
    SERVICES.get_or_init(|| {
        if let (Ok(primary), Ok(nats), Ok(passwords)) = (
            std::env::var("TALLY_TEST_DATABASE_URL"),
            std::env::var("TALLY_TEST_NATS_URL"),
            std::env::var("TALLY_TEST_NATS_PASSWORDS"),
        ) {
            let replica = std::env::var("TALLY_TEST_REPLICA_URL").ok().filter(|r| !r.is_empty());
            return Services {
                primary_admin_url: primary,
                replica_admin_url: replica,
                nats_url: nats,
                nats_credentials: Credentials::decode(&passwords)
                    .expect("TALLY_TEST_NATS_PASSWORDS names every NATS user (user=password,...)"),
            };
        }
        start_private_services()
    })
}

/// Starts Postgres + replica + NATS for this process only. They live as long as the process
/// (devstack kills them through the parent-death signal when it exits).
fn start_private_services() -> Services {
    let root = std::env::temp_dir().join(format!("tally-tests-{}", std::process::id()));
    let pg = tally_devstack::Postgres::start(
        &root.join("pg"),
        tally_devstack::PgOptions {
            replica: true,
            durable: false,
        },
    )
    .expect("starting a private Postgres for the tests");
    let nats_credentials = Credentials::generate();
    let nats = tally_devstack::Nats::start_with_config(
        &root.join("nats"),
        &nats_credentials.authorization(&nats_users::shared_topology()),
    )
    .expect("starting a private NATS for the tests");
    let services = Services {
        primary_admin_url: pg.primary_url("postgres"),
        replica_admin_url: pg.replica_url("postgres"),
        nats_url: nats.url(),
        nats_credentials,
    };
    // Kept alive for the whole process on purpose.
    std::mem::forget(pg);
    std::mem::forget(nats);
    services
}

/// A fresh, migrated database of its own for one test.
#[derive(Debug, Clone)]
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub replica_url: Option<String>,
    pub pool: PgPool,
}

/// A Postgres primary and streaming replica of one test's own, for tests that stop the
/// replica's replay (`pg_wal_replay_pause()`), which would stall every other test on the shared
/// one. Stopped and deleted when dropped.
#[derive(Debug)]
pub struct PrivateCluster {
    pg: tally_devstack::Postgres,
}

impl PrivateCluster {
    /// Fast and not crash-safe (fsync and synchronous commit off), like the shared servers.
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// Crash-safe (fsync and synchronous commit on): for tests that crash the server and count
    /// what survived, since without it a commit acknowledged in the last moments before a crash
    /// is lost by design.
    pub fn start_durable() -> Self {
        Self::start_with(true)
    }

    fn start_with(durable: bool) -> Self {
        let root = std::env::temp_dir().join(format!("tally-private-pg-{}", Uuid::now_v7().simple()));
        let pg = tally_devstack::Postgres::start(&root, tally_devstack::PgOptions { replica: true, durable })
            .expect("starting a private Postgres primary and replica");
        Self { pg }
    }

    /// These servers, and the shared NATS.
    pub fn services(&self) -> Services {
        Services {
            primary_admin_url: self.pg.primary_url("postgres"),
            replica_admin_url: self.pg.replica_url("postgres"),
            nats_url: services().nats_url.clone(),
            nats_credentials: services().nats_credentials.clone(),
        }
    }

    /// Stops (`true`) or resumes (`false`) WAL replay on the replica: it stays up and answers
    /// reads, with the data it had.
    pub async fn pause_replay(&self, paused: bool) {
        let url = self
            .pg
            .replica_url("postgres")
            .expect("the private cluster has a replica");
        let replica = PgPool::connect(&url).await.expect("connecting to the private replica");
        let sql = if paused {
            "SELECT pg_wal_replay_pause()"
        } else {
            "SELECT pg_wal_replay_resume()"
        };
        sqlx::query(sql)
            .execute(&replica)
            .await
            .expect("pausing or resuming replay");
        replica.close().await;
    }
}

impl TestDb {
    /// A database on the shared servers.
    pub async fn new() -> Self {
        Self::on(services()).await
    }

    /// A database on `services` (e.g. a [`PrivateCluster`]'s).
    pub async fn on(services: &Services) -> Self {
        let db = Self::unmigrated_on(services).await;
        tally_event_store::migrate(&db.pool)
            .await
            .expect("event store migrations");
        tally_projectors::migrate(&db.pool).await.expect("projector migrations");
        db.sync_replica().await;
        db
    }

    /// An empty database on the shared servers, with no migration applied (for tests of a
    /// migration itself).
    pub async fn unmigrated() -> Self {
        Self::unmigrated_on(services()).await
    }

    async fn unmigrated_on(services: &Services) -> Self {
        let name = format!("t_{}", Uuid::now_v7().simple());
        let admin = PgPool::connect(&services.primary_admin_url)
            .await
            .expect("connecting to the test Postgres");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .expect("creating the test database");
        admin.close().await;
        let url = with_database(&services.primary_admin_url, &name);
        let pool = tally_event_store::connect(&url, 16).expect("connecting to the test database");
        let replica_url = services.replica_admin_url.as_deref().map(|r| with_database(r, &name));
        Self {
            replica_url,
            name,
            url,
            pool,
        }
    }

    /// The URL of this database for the service role `role` (`tally_event_store::roles`):
    /// what the kit's services connect with, so the suite runs with least privilege.
    pub fn url_as(&self, role: &str) -> String {
        tally_devstack::with_user(&self.url, role)
    }

    /// Like [`Self::url_as`] for the replica (the primary when there is none).
    pub fn replica_url_as(&self, role: &str) -> String {
        tally_devstack::with_user(self.replica_url.as_deref().unwrap_or(&self.url), role)
    }

    /// Waits until the replica has replayed everything the primary has written so far
    /// (schema included), so a test never mistakes replication lag for a bug.
    pub async fn sync_replica(&self) {
        let Some(replica_url) = &self.replica_url else {
            return;
        };
        // The insert position, not `pg_current_wal_lsn()` (the write position): the test
        // servers commit asynchronously, so a commit can still sit in WAL buffers, behind the
        // write position, when this runs.
        let target: String = sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text")
            .fetch_one(&self.pool)
            .await
            .expect("primary WAL position");
        eventually(
            Duration::from_secs(30),
            "the replica to catch up with the primary",
            || async {
                // CREATE DATABASE itself reaches the replica asynchronously: connecting may fail at first.
                let replica = sqlx::PgPool::connect(replica_url).await.ok()?;
                let caught_up: Option<bool> = sqlx::query_scalar("SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn")
                    .bind(&target)
                    .fetch_one(&replica)
                    .await
                    .ok();
                replica.close().await;
                caught_up.filter(|c| *c).map(|_| ())
            },
        )
        .await;
    }

    pub fn store(&self) -> tally_event_store::EventStore {
        tally_event_store::EventStore::new(self.pool.clone())
    }

    /// How many events `stream` holds (up to `READ_LIMIT_MAX`).
    pub async fn event_count(&self, stream: Uuid) -> usize {
        self.store()
            .read_stream(stream, 0, READ_LIMIT_MAX)
            .await
            .expect("reading the stream")
            .len()
    }

    /// Replays a whole account stream (up to `READ_LIMIT_MAX` events) without snapshots: the
    /// reference the writer's state is checked against. Returns the account and its version.
    pub async fn replay_account(&self, stream: Uuid) -> (Account, i64) {
        let mut account = Account::default();
        let mut version = 0;
        for stored in self.read_whole_stream(stream).await {
            let event =
                tally_schemas::decode_account_event(&stored.event_type, stored.schema_version as u32, &stored.payload)
                    .expect("a stored account event decodes");
            account.apply(event);
            version = stored.version;
        }
        (account, version)
    }

    /// Every event of `stream`, however long it is.
    pub async fn read_whole_stream(&self, stream: Uuid) -> Vec<tally_event_store::StoredEvent> {
        let mut events = Vec::new();
        loop {
            let after = events.last().map_or(0, |e: &tally_event_store::StoredEvent| e.version);
            let page = self
                .store()
                .read_stream(stream, after, READ_LIMIT_MAX)
                .await
                .expect("reading the stream");
            let done = (page.len() as i64) < READ_LIMIT_MAX;
            events.extend(page);
            if done {
                return events;
            }
        }
    }
}

/// A JetStream stream and subject prefix of this test's own on the shared NATS server (whose
/// permissions allow any stream and any `*.events` prefix: `nats_users::shared_topology`).
#[derive(Debug, Clone)]
pub struct TestNats {
    /// The server's URL, or a cluster's, comma-separated.
    pub url: String,
    /// JetStream replicas of the stream (`TALLY_NATS_REPLICAS`).
    pub replicas: usize,
    pub stream: String,
    pub subject_prefix: String,
    pub credentials: Credentials,
}

impl TestNats {
    pub fn new() -> Self {
        let id = Uuid::now_v7().simple().to_string();
        Self {
            url: services().nats_url.clone(),
            replicas: 1,
            stream: format!("T_{id}"),
            subject_prefix: format!("t{id}.events"),
            credentials: services().nats_credentials.clone(),
        }
    }

    /// A stream of this test's own on a NATS server of its own (with the same users and
    /// permissions as the shared one), for tests that stop or kill the server: stopping the
    /// shared one would break other tests. The server stops when the returned handle drops.
    pub fn private_server(name: &str) -> (Self, tally_devstack::Nats) {
        let root = std::env::temp_dir().join(format!("tally-{name}-nats-{}", Uuid::now_v7().simple()));
        let nats = Self::new();
        let server = tally_devstack::Nats::start_with_config(
            &root,
            &nats.credentials.authorization(&nats_users::shared_topology()),
        )
        .expect("starting a private NATS");
        (
            Self {
                url: server.url(),
                ..nats
            },
            server,
        )
    }

    /// What a service signing in to this stream's server as NATS user `user` is started with.
    pub fn env(&self, user: &str) -> Vec<(&'static str, String)> {
        let mut env = self.topology_env();
        env.extend(self.credentials.env(user));
        env
    }

    /// The server, stream and prefix, without a user (add [`Credentials::env`]).
    pub fn topology_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("TALLY_NATS_URL", self.url.clone()),
            ("TALLY_NATS_REPLICAS", self.replicas.to_string()),
            ("TALLY_NATS_STREAM", self.stream.clone()),
            ("TALLY_SUBJECT_PREFIX", self.subject_prefix.clone()),
        ]
    }

    /// A client of this stream's server signed in as `user`, connecting in the background
    /// (so it may be made while the server is down).
    pub async fn connect_as(&self, user: &str) -> async_nats::Client {
        self.options_as(user)
            .retry_on_initial_connect()
            .connect(self.args_as(user).servers().expect("valid NATS URLs"))
            .await
            .expect("NATS connect options are valid")
    }

    /// Connection options signing in to this stream's server as `user`, as the service would.
    pub fn options_as(&self, user: &str) -> async_nats::ConnectOptions {
        self.args_as(user).options()
    }

    fn args_as(&self, user: &str) -> nats_users::NatsArgs {
        nats_users::NatsArgs {
            url: self.url.clone(),
            user: Some(user.to_owned()),
            password: Some(self.credentials.password(user).to_owned()),
        }
    }

    /// A stream of this test's own on a three-server NATS cluster of its own (the shared
    /// users and permissions), kept at three replicas: for tests that kill a server of a
    /// cluster. The cluster stops when the returned handle drops.
    pub fn private_cluster(name: &str) -> (Self, tally_devstack::NatsCluster) {
        let root = std::env::temp_dir().join(format!("tally-{name}-nats-cluster-{}", Uuid::now_v7().simple()));
        let nats = Self::new();
        let cluster = tally_devstack::NatsCluster::start(
            &root,
            3,
            &nats.credentials.authorization(&nats_users::shared_topology()),
        )
        .expect("starting a private NATS cluster");
        (
            Self {
                url: cluster.urls(),
                replicas: 3,
                ..nats
            },
            cluster,
        )
    }

    /// A client with every permission (the admin user), for a test to look at or tamper with
    /// the stream.
    pub async fn connect(&self) -> async_nats::Client {
        self.connect_as(nats_users::ADMIN).await
    }
}

impl Default for TestNats {
    fn default() -> Self {
        Self::new()
    }
}

/// Where the service binaries are: `TALLY_BIN_DIR`, or the profile folder this test
/// executable was built into (`target/debug/deps/suite-… → target/debug`).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TALLY_BIN_DIR") {
        return dir.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps layout")
        .to_path_buf()
}

/// Runs `tally audit verify` on the database at `url` and fails the test, quoting its output,
/// unless every hash chain verifies.
pub fn assert_audit_verifies(url: &str) {
    let output = std::process::Command::new(bin_dir().join("tally"))
        .args(["audit", "verify"])
        .env("TALLY_DATABASE_URL", url)
        .output()
        .expect("running tally audit verify");
    assert!(
        output.status.success(),
        "tally audit verify:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A service binary started by a test; killed when dropped. Its output goes to a log file
/// whose tail is printed if the test needs it.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `bin` with `env`. A `tally-relay` not told where to listen gets an ephemeral
    /// port (`TALLY_RELAY_LISTEN=127.0.0.1:0`), so relays of parallel tests never collide on
    /// the default one; give it a port from [`free_port`] to reach its probes.
    pub fn spawn(bin: &str, env: &[(&str, String)]) -> Self {
        Self::spawn_with_args(bin, &[], env)
    }

    /// Like [`Proc::spawn`], with command-line arguments (`tally audit seal --every 1s`).
    pub fn spawn_with_args(bin: &str, args: &[&str], env: &[(&str, String)]) -> Self {
        let path = bin_dir().join(bin);
        assert!(
            path.exists(),
            "{} is missing: build the binaries first (cargo build --workspace --bins, or use cargo xtask test)",
            path.display()
        );
        let log = std::env::temp_dir().join(format!("tally-{bin}-{}.log", Uuid::now_v7().simple()));
        let out = File::create(&log).expect("log file");
        let mut command = Command::new(&path);
        if bin == "tally-relay" && !env.iter().any(|(k, _)| *k == "TALLY_RELAY_LISTEN") {
            command.env("TALLY_RELAY_LISTEN", "127.0.0.1:0");
        }
        let child = command
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("TALLY_LOG", "info,tally=debug")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log file"))
            .stderr(out)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", path.display()));
        Self {
            name: bin.to_owned(),
            child,
            log,
        }
    }

    /// The last lines of the process's output, for failure messages, without the stack
    /// backtrace of an error it exited with (which would push the error itself out of view).
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let text = text.split("\nStack backtrace:").next().unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for the process to exit on its own; its status, or `None` if it
    /// is still running.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM: the process is asked to stop and shut down gracefully.
    #[allow(unsafe_code)]
    pub fn terminate(&self) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("a pid fits pid_t");
        // SAFETY: kill(2) with a pid of our own child and a valid signal number.
        let sent = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(sent, 0, "sending SIGTERM to {}", self.name);
    }

    /// SIGKILL: the process gets no chance to clean up (crash simulation).
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // `TALLY_TEST_KEEP_LOGS=1` keeps every service's whole log (in the temp folder) for a
        // post-mortem beyond the tail a failure prints.
        if std::env::var_os("TALLY_TEST_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    tally_devstack::free_port().expect("a free port")
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `GET {base}/ready` answers 200, or panics with the process log.
pub async fn wait_ready(base: &str, proc: &Proc) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = client.get(format!("{base}/ready")).send().await
            && r.status().is_success()
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} never became ready; its log:\n{}",
            proc.name,
            proc.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `(variable, a free loopback address)`: an API's operations listener (`/metrics`) for a
/// test, so that APIs started side by side do not contend for the default port.
pub fn ops_listen(variable: &'static str) -> (&'static str, String) {
    (variable, format!("127.0.0.1:{}", free_port()))
}

/// The base URL of the address an env entry from [`ops_listen`] names.
fn ops_base(listen: &(&'static str, String)) -> String {
    format!("http://{}", listen.1)
}

/// A command API alone on `db` (no relay, projector or query API), with extra `env`; ready
/// when this returns. Returns a client of it and its process.
pub async fn command_api(db: &TestDb, env: &[(&'static str, String)]) -> (Api, Proc) {
    let port = free_port();
    let mut all = vec![
        ("TALLY_DATABASE_URL", db.url_as(roles::COMMAND)),
        ("TALLY_COMMAND_LISTEN", format!("127.0.0.1:{port}")),
        ops_listen("TALLY_COMMAND_OPS_LISTEN"),
    ];
    all.extend(auth_env());
    all.extend(env.iter().cloned());
    let proc = Proc::spawn("tally-command-api", &all);
    let base = format!("http://127.0.0.1:{port}");
    wait_ready(&base, &proc).await;
    (Api::new(&base), proc)
}

/// A response from the command API: status, body (`null` when it is not JSON), and whether it
/// was marked `Idempotent-Replayed: true`.
pub type Reply = (StatusCode, Value, bool);

/// One client's view of a command API at `base`.
#[derive(Debug, Clone)]
pub struct Api {
    client: reqwest::Client,
    pub base: String,
}

impl Api {
    /// A client with the kit's token ([`client`]).
    pub fn new(base: &str) -> Self {
        Self {
            client: client(),
            base: base.to_owned(),
        }
    }

    /// A client that sends `token` instead.
    pub fn with_token(base: &str, token: &str) -> Self {
        Self {
            client: client_with(token).build().expect("a client"),
            base: base.to_owned(),
        }
    }

    /// POSTs `body` to `{base}{path}`, under the `Idempotency-Key` `key` when given. Checks on
    /// the way that every refusal is a problem. The request is built before this returns, so
    /// the future borrows none of the arguments (requests can be built in a loop and awaited
    /// together).
    pub fn post(&self, path: &str, key: Option<&str>, body: &Value) -> impl Future<Output = Reply> + use<> {
        let mut request = self.client.post(format!("{}{path}", self.base)).json(body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        let path = path.to_owned();
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            if !status.is_success() {
                assert_eq!(
                    response.headers().get("content-type").and_then(|v| v.to_str().ok()),
                    Some("application/problem+json"),
                    "{path}: every refusal is a problem"
                );
            }
            let replayed = response
                .headers()
                .get("idempotent-replayed")
                .is_some_and(|v| v == "true");
            (status, response.json().await.unwrap_or(Value::Null), replayed)
        }
    }

    /// POSTs `body` under a fresh, unique `Idempotency-Key`, as a careful client does
    /// (money-moving commands require one).
    pub fn post_keyed(&self, path: &str, body: &Value) -> impl Future<Output = Reply> + use<> {
        self.post(path, Some(&Uuid::now_v7().to_string()), body)
    }

    /// `POST /v1/transfers` under a fresh key.
    pub fn transfer(&self, body: Value) -> impl Future<Output = Reply> + use<> {
        self.post_keyed("/v1/transfers", &body)
    }

    /// Opens an account for Ada in `currency` and checks that it starts open and empty.
    pub async fn open(&self, currency: &str) -> Uuid {
        let (status, body, _) = self
            .post("/v1/accounts", None, &json!({"owner": "Ada", "currency": currency}))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["status"], "open");
        assert_eq!(body["held"], 0);
        body["account_id"].as_str().unwrap().parse().unwrap()
    }

    /// Opens an account and deposits `funds` into it.
    pub async fn funded(&self, currency: &str, funds: i64) -> Uuid {
        let id = self.open(currency).await;
        if funds > 0 {
            let (status, body, _) = self
                .post_keyed(&format!("/v1/accounts/{id}/deposits"), &json!({"amount": funds}))
                .await;
            assert_eq!(status, StatusCode::CREATED, "{body}");
        }
        id
    }
}

/// The code of a problem body: its `type` without the `https://tally.dev/problems/` prefix, or
/// `""` when it has none.
pub fn problem_code(body: &Value) -> &str {
    body["type"]
        .as_str()
        .and_then(|t| t.strip_prefix("https://tally.dev/problems/"))
        .unwrap_or("")
}

/// Settings of a projector worker started by a test: its name, a free port for its HTTP
/// endpoints, and a short lease so a killed worker's partitions move within seconds.
pub fn projector_env(worker_id: &str) -> Vec<(&'static str, String)> {
    vec![
        ("TALLY_PROJECTOR_WORKER_ID", worker_id.to_owned()),
        ("TALLY_PROJECTOR_LISTEN", format!("127.0.0.1:{}", free_port())),
        ("TALLY_PROJECTOR_LEASE_MS", "2000".into()),
    ]
}

/// Every Tally service for one test, on its own database and NATS stream.
#[derive(Debug)]
pub struct Stack {
    /// Base URL of the command API.
    pub command: String,
    /// Base URL of the query API (reading from the replica).
    pub query: String,
    /// Base URL of each API's operations listener (`/metrics`, `/health`, `/ready`), by the
    /// API's base URL: see [`Stack::ops_of`].
    pub ops: HashMap<String, String>,
    /// Base URL of the relay's probes and metrics.
    pub relay: String,
    /// Base URL of the projector's probes and metrics.
    pub projector: String,
    pub procs: Vec<Proc>,
    /// What every service of the stack is started with (database, NATS, auth).
    pub env: Vec<(&'static str, String)>,
    pub db: TestDb,
    pub nats: TestNats,
}

impl Stack {
    pub async fn start() -> Self {
        Self::start_on(TestDb::new().await, &[]).await
    }

    /// Like [`Stack::start`], with `extra` in every service's environment.
    pub async fn start_with(extra: &[(&'static str, String)]) -> Self {
        Self::start_configured(TestDb::new().await, extra, &[]).await
    }

    /// Every service on `db`, the query API with `query_env` added to its environment.
    pub async fn start_on(db: TestDb, query_env: &[(&'static str, String)]) -> Self {
        Self::start_configured(db, &[], query_env).await
    }

    /// Every service on `db` and `nats` (e.g. a private NATS cluster's).
    pub async fn start_on_nats(db: TestDb, nats: TestNats) -> Self {
        Self::start_with_nats(db, nats, &[], &[]).await
    }

    /// Every service on `db` with `extra` in its environment, the query API with `query_env`
    /// too.
    async fn start_configured(
        db: TestDb,
        extra: &[(&'static str, String)],
        query_env: &[(&'static str, String)],
    ) -> Self {
        Self::start_with_nats(db, TestNats::new(), extra, query_env).await
    }

    async fn start_with_nats(
        db: TestDb,
        nats: TestNats,
        extra: &[(&'static str, String)],
        query_env: &[(&'static str, String)],
    ) -> Self {
        let (command_port, relay_port) = (free_port(), free_port());
        // Without a NATS user: each service below adds its own.
        let mut env = nats.topology_env();
        env.extend(auth_env());
        env.push(("TALLY_DATABASE_URL", db.url.clone()));
        env.push(("TALLY_PARTITIONS", "4".into()));
        env.extend(extra.iter().cloned());
        let with = |extra: Vec<(&'static str, String)>| -> Vec<(&'static str, String)> {
            env.iter().cloned().chain(extra).collect()
        };
        // Each service as its own role and NATS user, with only the privileges it needs
        // (roles.rs, nats_users.rs).
        let command_ops = ops_listen("TALLY_COMMAND_OPS_LISTEN");
        let command_ops_base = ops_base(&command_ops);
        let command_api = Proc::spawn(
            "tally-command-api",
            &with(vec![
                ("TALLY_COMMAND_LISTEN", format!("127.0.0.1:{command_port}")),
                command_ops,
                ("TALLY_DATABASE_URL", db.url_as(roles::COMMAND)),
            ]),
        );
        let relay = Proc::spawn(
            "tally-relay",
            &with(
                [
                    ("TALLY_RELAY_LISTEN", format!("127.0.0.1:{relay_port}")),
                    ("TALLY_DATABASE_URL", db.url_as(roles::RELAY)),
                ]
                .into_iter()
                .chain(nats.credentials.env(nats_users::RELAY))
                .collect(),
            ),
        );
        let projector_env = projector_env("w1");
        let projector_listen = projector_env
            .iter()
            .find(|(k, _)| *k == "TALLY_PROJECTOR_LISTEN")
            .map(|(_, v)| format!("http://{v}"))
            .expect("projector_env names the listen address");
        let projector = Proc::spawn(
            "tally-projector",
            &with(
                projector_env
                    .into_iter()
                    .chain([("TALLY_DATABASE_URL", db.url_as(roles::PROJECTOR))])
                    .chain(nats.credentials.env(nats_users::PROJECTOR))
                    .collect(),
            ),
        );
        let command = format!("http://127.0.0.1:{command_port}");
        let mut stack = Self {
            ops: HashMap::from([(command.clone(), command_ops_base)]),
            command,
            query: String::new(),
            relay: format!("http://127.0.0.1:{relay_port}"),
            projector: projector_listen,
            procs: vec![command_api, relay, projector],
            env,
            db,
            nats,
        };
        stack.query = stack.spawn_query_api(query_env).await;
        wait_ready(&stack.command, &stack.procs[0]).await;
        stack
    }

    /// Starts one more query API instance (reading from the replica, with `extra` in its
    /// environment), waits until it is ready and returns its base URL.
    pub async fn spawn_query_api(&mut self, extra: &[(&'static str, String)]) -> String {
        let port = free_port();
        let ops = ops_listen("TALLY_QUERY_OPS_LISTEN");
        let ops_base = ops_base(&ops);
        let env: Vec<(&'static str, String)> = self
            .env
            .iter()
            .cloned()
            .chain([
                ("TALLY_QUERY_LISTEN", format!("127.0.0.1:{port}")),
                ops,
                ("TALLY_REPLICA_URLS", self.db.replica_url_as(roles::QUERY)),
                ("TALLY_DATABASE_URL", self.db.url_as(roles::QUERY)),
            ])
            .chain(self.nats.credentials.env(nats_users::QUERY))
            .chain(extra.iter().cloned())
            .collect();
        let proc = Proc::spawn("tally-query-api", &env);
        let base = format!("http://127.0.0.1:{port}");
        wait_ready(&base, &proc).await;
        self.procs.push(proc);
        self.ops.insert(base.clone(), ops_base);
        base
    }

    /// The base URL of the operations listener (`/metrics`) of the API at `base`.
    pub fn ops_of(&self, base: &str) -> &str {
        self.ops
            .get(base)
            .unwrap_or_else(|| panic!("no API of this stack at {base}"))
    }

    /// Starts a console on this stack (sampling every service's `/metrics` every 500 ms),
    /// waits until it is ready and returns its base URL.
    pub async fn spawn_console(&mut self) -> String {
        let port = free_port();
        let env: Vec<(&'static str, String)> = self
            .env
            .iter()
            .cloned()
            .chain([
                ("TALLY_CONSOLE_LISTEN", format!("127.0.0.1:{port}")),
                ("TALLY_QUERY_URL", self.query.clone()),
                ("TALLY_CONSOLE_COMMAND_URLS", self.ops_of(&self.command).to_owned()),
                ("TALLY_CONSOLE_QUERY_URLS", self.ops_of(&self.query).to_owned()),
                ("TALLY_CONSOLE_RELAY_URLS", self.relay.clone()),
                ("TALLY_CONSOLE_PROJECTOR_URLS", self.projector.clone()),
                ("TALLY_CONSOLE_SAMPLE_MS", "500".into()),
            ])
            .collect();
        let proc = Proc::spawn("tally-console", &env);
        let base = format!("http://127.0.0.1:{port}");
        wait_ready(&base, &proc).await;
        self.procs.push(proc);
        base
    }

    /// The tail of every service's log, for failure messages.
    pub fn logs(&self) -> String {
        self.procs
            .iter()
            .map(|p| format!("--- {} ---\n{}", p.name, p.log_tail()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}
