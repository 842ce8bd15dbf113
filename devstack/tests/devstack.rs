//! Starts real PostgreSQL and NATS servers from the installed binaries.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tally_devstack::{HaOptions, HaPostgres, Nats, NatsCluster, PgOptions, Postgres};

/// How long a row written on the primary may take to appear on the replica.
const REPLICATION_TIMEOUT_MS: u64 = 20_000;
const REPLICATION_POLL_INTERVAL_MS: u64 = 100;
/// How long a server may take to die once its parent process is killed.
const ORPHAN_DEATH_TIMEOUT_MS: u64 = 10_000;
/// Set when this test binary is re-run as the "parent that gets killed".
const ORPHAN_HELPER_ENV: &str = "TALLY_DEVSTACK_ORPHAN_HELPER";

/// A root folder under the temp dir that no other test (or test run) uses.
fn temp_root(test: &str) -> PathBuf {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    std::env::temp_dir().join(format!("tally-devstack-test-{test}-{}-{nanos}", std::process::id()))
}

fn connects(port: u16) -> bool {
    TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, port).into(), Duration::from_secs(2)).is_ok()
}

/// Runs one SQL statement with psql and returns its unaligned, tuples-only output.
fn psql(port: u16, sql: &str) -> String {
    let output = Command::new("psql")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args(["-d", "postgres", "-X", "-q", "-A", "-t"])
        .args(["-v", "ON_ERROR_STOP=1", "-c", sql])
        .env_remove("PGPASSWORD")
        .env_remove("PGDATABASE")
        .env_remove("PGSERVICE")
        .output()
        .expect("psql runs");
    assert!(
        output.status.success(),
        "psql -p {port} -c {sql:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// Pids of live processes whose command line mentions `path`.
fn processes_mentioning(path: &Path) -> Vec<u32> {
    let needle = path.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != std::process::id())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmdline).contains(&needle) && !is_zombie(*pid)
        })
        .collect()
}

/// State letter and parent pid from /proc/PID/stat ("pid (comm) S ppid ...").
fn state_and_parent(pid: u32) -> Option<(String, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.to_owned();
    let parent = fields.next()?.parse().ok()?;
    Some((state, parent))
}

fn is_zombie(pid: u32) -> bool {
    state_and_parent(pid).is_none_or(|(state, _)| state == "Z")
}

/// Live direct children of `parents` (e.g. postgres backends, whose command
/// lines no longer mention the data folder).
fn live_children_of(parents: &[u32]) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| state_and_parent(*pid).is_some_and(|(state, parent)| state != "Z" && parents.contains(&parent)))
        .collect()
}

#[test]
fn a_row_written_on_the_primary_becomes_visible_on_the_replica_and_stop_removes_everything() {
    let root = temp_root("pg");
    let pg = Postgres::start(
        &root,
        PgOptions {
            replica: true,
            durable: false,
        },
    )
    .expect("postgres starts");
    let primary = pg.primary_port();
    let replica = pg.replica_port().expect("a replica was asked for");
    assert_ne!(primary, replica);
    assert!(![5432, 4222].contains(&primary) && ![5432, 4222].contains(&replica));
    assert_eq!(
        pg.primary_url("tally"),
        format!("postgres://postgres@127.0.0.1:{primary}/tally")
    );
    assert_eq!(
        pg.replica_url("tally"),
        Some(format!("postgres://postgres@127.0.0.1:{replica}/tally"))
    );

    psql(primary, "CREATE TABLE greeting (word text NOT NULL)");
    psql(primary, "INSERT INTO greeting VALUES ('hello')");

    let deadline = Instant::now() + Duration::from_millis(REPLICATION_TIMEOUT_MS);
    loop {
        // The table itself may not have replicated yet on the first polls.
        let seen = Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &replica.to_string(), "-U", "postgres"])
            .args(["-d", "postgres", "-X", "-q", "-A", "-t", "-c"])
            .arg("SELECT word FROM greeting")
            .stderr(Stdio::null())
            .output()
            .expect("psql runs");
        if seen.status.success() && String::from_utf8_lossy(&seen.stdout).trim() == "hello" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "row not visible on the replica within {REPLICATION_TIMEOUT_MS} ms"
        );
        thread::sleep(Duration::from_millis(REPLICATION_POLL_INTERVAL_MS));
    }
    assert_eq!(psql(replica, "SELECT pg_is_in_recovery()"), "t");
    assert_eq!(psql(primary, "SELECT pg_is_in_recovery()"), "f");
    assert!(!processes_mentioning(&root).is_empty(), "servers run");

    pg.stop();

    assert!(!root.exists(), "{} still exists", root.display());
    assert!(!connects(primary), "primary port {primary} still accepts");
    assert!(!connects(replica), "replica port {replica} still accepts");
    assert_eq!(processes_mentioning(&root), Vec::<u32>::new());
}

#[test]
fn a_durable_primary_without_a_replica_keeps_fsync_on_and_has_no_replica_url() {
    let root = temp_root("durable");
    let pg = Postgres::start(
        &root,
        PgOptions {
            replica: false,
            durable: true,
        },
    )
    .expect("postgres starts");
    assert_eq!(pg.replica_port(), None);
    assert_eq!(pg.replica_url("tally"), None);
    assert_eq!(psql(pg.primary_port(), "SHOW fsync"), "on");
    assert_eq!(psql(pg.primary_port(), "SHOW max_connections"), "400");
    let port = pg.primary_port();
    drop(pg);
    assert!(!root.exists(), "drop removes {}", root.display());
    assert!(!connects(port));
}

#[test]
fn nats_killed_and_restarted_comes_back_on_the_same_port_and_drop_removes_its_folder() {
    let root = temp_root("nats");
    let mut nats = Nats::start(&root).expect("nats starts");
    let port = nats.port();
    assert!(![5432, 4222].contains(&port));
    assert_eq!(nats.url(), format!("nats://127.0.0.1:{port}"));
    assert!(connects(port));
    assert!(root.join("store").is_dir(), "JetStream store is under the root");

    nats.kill();
    assert!(!connects(port), "killed server still accepts");
    assert!(root.join("store").is_dir(), "kill keeps the store");

    nats.restart().expect("nats restarts");
    assert_eq!(nats.port(), port);
    assert!(connects(port));

    nats.stop();
    assert!(!connects(port), "stopped server still accepts");
    nats.restart().expect("nats restarts after a graceful stop");
    assert!(connects(port));

    drop(nats);
    assert!(!root.exists(), "{} still exists", root.display());
    assert!(!connects(port));
    assert_eq!(processes_mentioning(&root), Vec::<u32>::new());
}

#[test]
fn a_server_started_on_a_thread_that_has_since_exited_keeps_running() {
    // Test harnesses share stacks across tests from short-lived threads; the
    // parent-death signal must not fire when the starting thread ends.
    let root = temp_root("thread");
    let nats = thread::spawn({
        let root = root.clone();
        move || Nats::start(&root).expect("nats starts")
    })
    .join()
    .unwrap();
    thread::sleep(Duration::from_millis(500));
    assert!(connects(nats.port()));
    drop(nats);
    assert!(!root.exists());
}

#[test]
fn starting_in_a_folder_that_already_has_files_is_refused_and_leaves_them_alone() {
    let root = temp_root("occupied");
    std::fs::create_dir_all(&root).unwrap();
    let precious = root.join("precious.txt");
    std::fs::write(&precious, "keep me").unwrap();

    let error = Nats::start(&root).unwrap_err().to_string();
    assert!(error.contains("not empty"), "{error}");
    let error = Postgres::start(&root, PgOptions::default()).unwrap_err().to_string();
    assert!(error.contains("not empty"), "{error}");

    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "keep me");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn servers_die_when_the_process_that_started_them_is_killed() {
    let root = temp_root("orphan");
    let mut parent = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "orphan_helper_starts_servers_and_waits_to_be_killed",
            "--ignored",
            "--nocapture",
        ])
        .env(ORPHAN_HELPER_ENV, &root)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(parent.stdout.take().unwrap()).lines();
    let ready = lines.find_map(|line| line.ok().filter(|line| line.starts_with("READY")));
    assert!(ready.is_some(), "helper did not start its servers");
    // nats-server, the postgres primary and the replica.
    let servers = processes_mentioning(&root);
    assert_eq!(servers.len(), 3, "servers are running: {servers:?}");
    let workers = live_children_of(&servers);
    assert!(!workers.is_empty(), "postgres has worker processes");

    parent.kill().unwrap();
    parent.wait().unwrap();

    let deadline = Instant::now() + Duration::from_millis(ORPHAN_DEATH_TIMEOUT_MS);
    while !processes_mentioning(&root).is_empty() {
        assert!(
            Instant::now() < deadline,
            "orphaned servers {:?} outlived their parent",
            processes_mentioning(&root)
        );
        thread::sleep(Duration::from_millis(50));
    }
    // Postgres workers notice their postmaster is gone and exit by themselves.
    while !workers.iter().all(|pid| is_zombie(*pid)) {
        assert!(
            Instant::now() < deadline,
            "postgres workers outlived their postmaster: {workers:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
    // Nobody ran Drop, so the folder is left behind; clean it up ourselves.
    std::fs::remove_dir_all(&root).unwrap();
}

/// Helper for the test above, run in a child process that is then SIGKILLed.
#[test]
#[ignore = "run only as the child of servers_die_when_the_process_that_started_them_is_killed"]
fn orphan_helper_starts_servers_and_waits_to_be_killed() {
    let Some(root) = std::env::var_os(ORPHAN_HELPER_ENV) else {
        return;
    };
    let root = PathBuf::from(root);
    let _nats = Nats::start(&root.join("nats")).expect("nats starts");
    let _pg = Postgres::start(
        &root.join("pg"),
        PgOptions {
            replica: true,
            durable: false,
        },
    )
    .expect("postgres starts");
    println!("READY");
    loop {
        thread::sleep(Duration::from_secs(60));
    }
}

#[test]
fn an_ha_cluster_replicates_synchronously_fails_over_when_its_leader_dies_and_stop_removes_everything() {
    let root = temp_root("ha");
    let mut ha = HaPostgres::start(&root, HaOptions::default()).expect("the HA cluster starts");
    let (rw, ro) = ha.router_ports();
    assert_eq!(ha.patroni_urls().len(), 3);
    // The router's read-write port reaches the leader, whose commits wait for a standby.
    assert_eq!(psql(rw, "SELECT pg_is_in_recovery()"), "f");
    assert_ne!(psql(rw, "SHOW synchronous_standby_names"), "");
    assert_eq!(psql(ro, "SELECT pg_is_in_recovery()"), "t");
    psql(rw, "CREATE TABLE kept (n int); INSERT INTO kept VALUES (1)");

    // The leader's machine dies: after the TTL its synchronous standby leads, with the row.
    let old = ha.leader().unwrap().expect("a leader");
    ha.kill_node(&old).unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    let new = loop {
        if let Ok(Some(leader)) = ha.leader()
            && leader != old
        {
            break leader;
        }
        assert!(Instant::now() < deadline, "no failover: {:?}", ha.members());
        thread::sleep(Duration::from_millis(200));
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !connects(rw)
        || Command::new("pg_isready")
            .args(["-h", "127.0.0.1", "-p", &rw.to_string(), "-q"])
            .status()
            .is_ok_and(|s| !s.success())
    {
        assert!(
            Instant::now() < deadline,
            "the router never reached the new leader {new}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(psql(rw, "SELECT count(*) FROM kept"), "1");
    // Commits go on: the remaining standby follows the new leader and acknowledges them.
    psql(rw, "INSERT INTO kept VALUES (2)");

    // The old leader comes back as a standby, and a switchover hands the lead back and forth.
    ha.restart_node(&old).unwrap();
    ha.wait_healthy(Duration::from_secs(90))
        .expect("the old leader rejoins");
    let switched = ha.switchover().expect("a switchover");
    assert_ne!(switched, new);
    ha.wait_healthy(Duration::from_secs(90)).unwrap();
    psql(rw, "INSERT INTO kept VALUES (3)");
    assert_eq!(psql(rw, "SELECT count(*) FROM kept"), "3");

    drop(ha);
    assert!(!root.exists(), "drop removes {}", root.display());
    assert!(!connects(rw));
    assert_eq!(processes_mentioning(&root), Vec::<u32>::new());
}

#[test]
fn a_nats_cluster_forms_survives_a_killed_node_and_drop_removes_everything() {
    let root = temp_root("nats-cluster");
    let mut cluster = NatsCluster::start(&root, 3, "").expect("the NATS cluster forms");
    let urls = cluster.urls();
    assert_eq!(urls.split(',').count(), 3);
    let ports: Vec<u16> = cluster.nodes().iter().map(Nats::port).collect();
    cluster.nodes()[0].kill();
    assert!(!connects(ports[0]));
    assert!(cluster.nodes()[1].is_healthy() || cluster.nodes()[2].is_healthy());
    cluster.nodes()[0].restart().expect("the node rejoins");
    assert!(cluster.nodes()[0].is_healthy());
    drop(cluster);
    assert!(!root.exists(), "drop removes {}", root.display());
    assert!(ports.iter().all(|p| !connects(*p)));
}
