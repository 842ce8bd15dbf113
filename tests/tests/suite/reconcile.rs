//! `tally ledger reconcile` against real Postgres and NATS: no false difference while writes
//! go on, and a corrupted read-model row of each kind is reported with a non-zero exit.

use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tally_tests::{TestNats, bin_dir};
use uuid::Uuid;

use super::projections::{PARTITIONS, Rig, drive, open_accounts};

fn reconcile(rig: &Rig) -> Output {
    std::process::Command::new(bin_dir().join("tally"))
        .args(["ledger", "reconcile", "--wait", "30s"])
        .env("TALLY_DATABASE_URL", &rig.db.url)
        .env("TALLY_PARTITIONS", PARTITIONS.to_string())
        .output()
        .expect("running tally ledger reconcile")
}

fn show(output: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reconcile_finds_no_difference_under_load_and_reports_each_corrupted_row() {
    let rig = Rig::start(TestNats::new(), &["w1"], &[]).await;
    let accounts = open_accounts(&rig.api, 200).await;
    drive(&rig.api, &accounts, 16, 1_500, None).await;

    // While 32 clients keep writing: rows are behind and ahead of the fold, streams begin
    // after it; none of that is a difference.
    let stop = Arc::new(AtomicBool::new(false));
    let writers = {
        let (api, accounts, stop) = (rig.api.clone(), accounts.clone(), stop.clone());
        tokio::spawn(async move { drive(&api, &accounts, 32, usize::MAX, Some(stop)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let live = tokio::task::block_in_place(|| reconcile(&rig));
    stop.store(true, Ordering::Relaxed);
    let written = writers.await.expect("writers");
    assert!(written > 100, "writes went on during the check ({written})");
    assert_eq!(
        live.status.code(),
        Some(0),
        "under load:\n{}\n{}",
        show(&live),
        rig.logs()
    );
    assert!(
        String::from_utf8_lossy(&live.stdout).contains("reconciled: "),
        "{}",
        show(&live)
    );

    // Quiet: the totals are compared with the log itself.
    rig.converged().await;
    let quiet = tokio::task::block_in_place(|| reconcile(&rig));
    let stdout = String::from_utf8_lossy(&quiet.stdout).into_owned();
    assert_eq!(quiet.status.code(), Some(0), "{}", show(&quiet));
    assert!(stdout.contains("totals against the log"), "{stdout}");

    // Corrupt one row of each read model, as someone with write access to them could.
    let pool = &rig.db.pool;
    let (edited, statement_of): (Uuid, Uuid) = (accounts[0], accounts[1]);
    sqlx::query("UPDATE account_balances SET balance = balance + 1, available = available + 1 WHERE account_id = $1")
        .bind(edited)
        .execute(pool)
        .await
        .unwrap();
    let deleted_version: i64 = sqlx::query_scalar(
        "DELETE FROM account_statement WHERE (account_id, version) = \
         (SELECT account_id, min(version) FROM account_statement WHERE account_id = $1 GROUP BY account_id) \
         RETURNING version",
    )
    .bind(statement_of)
    .fetch_one(pool)
    .await
    .unwrap();
    let transfer: Uuid = sqlx::query_scalar(
        "UPDATE transfers SET settled_amount = settled_amount + 5 \
         WHERE transfer_id = (SELECT transfer_id FROM transfers ORDER BY transfer_id LIMIT 1) RETURNING transfer_id",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    sqlx::query("UPDATE ledger_totals_g1 SET inflow = inflow + 7 WHERE partition = 0 AND currency = 'EUR'")
        .execute(pool)
        .await
        .unwrap();

    let found = tokio::task::block_in_place(|| reconcile(&rig));
    let stdout = String::from_utf8_lossy(&found.stdout).into_owned();
    assert_eq!(found.status.code(), Some(1), "{}", show(&found));
    let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with("DIFFERENT: ")).collect();
    let has = |needle: &str| lines.iter().any(|l| l.contains(needle));
    assert!(has(&format!("account_balances {edited}:")), "{stdout}");
    assert!(
        has(&format!("account_statement {statement_of}/v{deleted_version}:")),
        "{stdout}"
    );
    assert!(has(&format!("transfers {transfer}:")), "{stdout}");
    assert!(has("ledger_totals EUR:"), "{stdout}");
    assert_eq!(lines.len(), 4, "exactly the four corrupted rows:\n{stdout}");
    assert!(stdout.contains("NOT reconciled"), "{stdout}");
}
