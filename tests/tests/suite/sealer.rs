//! The periodic sealer (`tally audit seal --every`), the real binary as the `tally_sealer` role
//! against a real Postgres: its history grows while writers append, every checkpoint in it
//! verifies with `tally audit verify --checkpoint`, a database outage does not kill it (it
//! backs off, reports it, and catches up when the database is back), and SIGTERM stops it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tally_event_store::checkpoint;
use tally_event_store::roles;
use tally_tests::link::{Link, postgres_address, through};
use tally_tests::{Proc, TestDb, eventually, free_port, wait_ready};
use uuid::Uuid;

use crate::audit::{seed_stream, tally, tally_audit_verify};

/// A key, a history file and a running sealer of one test.
struct Sealer {
    dir: PathBuf,
    history: PathBuf,
    public_key: PathBuf,
    base: String,
    proc: Proc,
}

impl Sealer {
    /// Makes a key with `tally audit keygen`, then starts `tally audit seal --every 1s`
    /// connecting to `database_url` (the sealer's role) and waits until its first round sealed.
    async fn start(db: &TestDb, database_url: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("tally-sealer-{}", Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("seal.key");
        let run = tally(&db.url, &["audit", "keygen", "--out", path(&key)]).await;
        assert_eq!(run.code, Some(0), "{run:?}");
        let history = dir.join("history.jsonl");
        let port = free_port();
        let proc = Proc::spawn_with_args(
            "tally",
            &["audit", "seal"],
            &[
                ("TALLY_DATABASE_URL", database_url.to_owned()),
                ("TALLY_CHECKPOINT_KEY_FILE", path(&key).to_owned()),
                ("TALLY_CHECKPOINT_HISTORY", path(&history).to_owned()),
                ("TALLY_SEALER_EVERY", "1s".to_owned()),
                ("TALLY_SEALER_LISTEN", format!("127.0.0.1:{port}")),
            ],
        );
        let base = format!("http://127.0.0.1:{port}");
        wait_ready(&base, &proc).await;
        Self {
            public_key: checkpoint::public_key_path(&key),
            dir,
            history,
            base,
            proc,
        }
    }

    /// The tree size of the history's last checkpoint.
    fn tree_size(&self) -> u64 {
        checkpoint::read_last(&self.history).unwrap().map_or(0, |c| c.tree_size)
    }

    /// Waits until the history's last checkpoint covers `events` events.
    async fn sealed(&self, events: u64) {
        eventually(Duration::from_secs(60), "the sealer to seal every event", || async {
            (self.tree_size() == events).then_some(())
        })
        .await;
    }

    async fn get(&self, route: &str) -> (reqwest::StatusCode, String) {
        let response = reqwest::get(format!("{}{route}", self.base)).await.unwrap();
        (response.status(), response.text().await.unwrap())
    }

    /// `tally audit verify --checkpoint <history> --public-key <pub>` as the table owner.
    async fn verify(&self, db: &TestDb) -> crate::audit::Run {
        tally_audit_verify(
            &db.url,
            &[
                "--checkpoint",
                path(&self.history),
                "--public-key",
                path(&self.public_key),
            ],
        )
        .await
    }
}

impl Drop for Sealer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temporary path")
}

#[tokio::test]
async fn the_sealer_seals_periodically_while_appends_proceed_and_every_checkpoint_verifies() {
    let db = TestDb::new().await;
    seed_stream(&db, 4).await;
    let mut sealer = Sealer::start(&db, &db.url_as(roles::SEALER)).await;

    // Appends go on while it seals every second, and none waits for it.
    let mut slowest = Duration::ZERO;
    for _ in 0..6 {
        let started = Instant::now();
        seed_stream(&db, 2).await;
        slowest = slowest.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    sealer.sealed(16).await;

    assert!(slowest < Duration::from_secs(2), "an append took {slowest:?}");
    let checkpoints = checkpoint::read_checkpoints(&sealer.history).unwrap();
    assert!(checkpoints.len() >= 2, "the history grew: {checkpoints:?}");
    assert!(
        checkpoints.windows(2).all(|w| w[0].tree_size < w[1].tree_size),
        "a line only when something was new"
    );
    let run = sealer.verify(&db).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(
        run.stdout.contains(&format!(
            "OK: the log matches {} signed checkpoint(s), up to tree size 16",
            checkpoints.len()
        )),
        "{run:?}"
    );
    let published: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_checkpoints")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(published as usize, checkpoints.len(), "each checkpoint is published");
    let (status, metrics) = sealer.get("/metrics").await;
    assert!(status.is_success());
    assert_eq!(sample(&metrics, "tally_sealer_tree_size"), Some(16.0), "{metrics}");
    assert!(
        metrics.contains(r#"tally_sealer_seals_total{result="sealed"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("tally_sealer_last_success_timestamp_seconds "),
        "{metrics}"
    );
    let (status, ready) = sealer.get("/ready").await;
    assert!(status.is_success(), "{ready}");
    assert!(ready.contains(r#""tree_size":16"#), "{ready}");
    let log = std::fs::read_to_string(&sealer.proc.log).unwrap();
    assert!(log.contains("sealed"), "progress shows as log lines: {log}");

    sealer.proc.terminate();
    let exit = sealer.proc.wait_exit(Duration::from_secs(15)).await;
    assert!(exit.is_some_and(|s| s.success()), "SIGTERM stops it cleanly: {exit:?}");
}

#[tokio::test]
async fn a_database_outage_does_not_kill_the_sealer_and_it_catches_up_when_the_database_is_back() {
    let db = TestDb::new().await;
    seed_stream(&db, 3).await;
    let mut link = Link::start(postgres_address(&db.url)).await;
    let through_link = through(&db.url_as(roles::SEALER), &link);
    let mut sealer = Sealer::start(&db, &through_link).await;
    sealer.sealed(3).await;

    link.cut();
    seed_stream(&db, 4).await;
    eventually(Duration::from_secs(30), "the sealer to report the outage", || async {
        let (status, _) = sealer.get("/ready").await;
        let (_, metrics) = sealer.get("/metrics").await;
        (status == reqwest::StatusCode::SERVICE_UNAVAILABLE
            && sample(&metrics, "tally_sealer_failures_total") >= Some(1.0))
        .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        sealer.proc.wait_exit(Duration::ZERO).await.is_none(),
        "the sealer outlives the outage: {}",
        sealer.proc.log_tail()
    );
    assert_eq!(sealer.tree_size(), 3, "nothing sealed while the database is away");

    link.restore().await;
    sealer.sealed(7).await;

    wait_ready(&sealer.base, &sealer.proc).await;
    let run = sealer.verify(&db).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    let log = std::fs::read_to_string(&sealer.proc.log).unwrap();
    assert!(log.contains("sealing failed; retrying"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// The value of the series `name` (no labels) in a Prometheus text page.
fn sample(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}
