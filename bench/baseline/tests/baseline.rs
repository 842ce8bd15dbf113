//! The baseline against a real Postgres (the servers of `cargo xtask test`, or private ones):
//! it must do what Tally does for the benchmark's requests, and fail the way stock cqrs-es
//! fails, with problems rather than 500s.

use cqrs_es::EventStore;
use cqrs_es::persist::PersistedEventStore;
use futures::future::join_all;
use postgres_es::PostgresEventRepository;
use serde_json::{Value, json};
use tally_baseline::AppState;
use tally_domain::Account;
use uuid::Uuid;

/// A baseline on a fresh database of its own, served on a free port until the test ends.
struct Baseline {
    base: String,
    pool: sqlx_08::PgPool,
    client: reqwest::Client,
}

impl Baseline {
    async fn start() -> Self {
        let admin_url = &tally_tests::services().primary_admin_url;
        let name = format!("b_{}", Uuid::now_v7().simple());
        let admin = sqlx_08::PgPool::connect(admin_url)
            .await
            .expect("connecting to Postgres");
        sqlx_08::raw_sql(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .expect("creating the database");
        admin.close().await;
        let url = format!("{}/{name}", admin_url.rsplit_once('/').expect("a database URL").0);
        let pool = tally_baseline::connect(&url, 16).expect("a pool");
        tally_baseline::migrate(&pool).await.expect("postgres-es tables");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(tally_baseline::run(
            listener,
            AppState::new(pool.clone()),
            std::future::pending(),
        ));
        Self {
            base,
            pool,
            client: reqwest::Client::new(),
        }
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .expect("the baseline answers");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn open(&self) -> Uuid {
        let (status, body) = self
            .post("/v1/accounts", json!({"owner": "Ada", "currency": "EUR"}))
            .await;
        assert_eq!(status, 201, "{body}");
        body["account_id"].as_str().unwrap().parse().unwrap()
    }

    async fn deposit(&self, account: Uuid, amount: i64) -> (u16, Value) {
        self.post(&format!("/v1/accounts/{account}/deposits"), json!({"amount": amount}))
            .await
    }

    /// The account as postgres-es replays it from its events table.
    async fn account(&self, account: Uuid) -> Account {
        let store = PersistedEventStore::<_, Account>::new_event_store(PostgresEventRepository::new(self.pool.clone()));
        let context = store
            .load_aggregate(&account.to_string())
            .await
            .expect("replaying the account");
        context.aggregate
    }
}

fn transfer(from: Uuid, to: Uuid, amount: i64) -> Value {
    json!({"from": from, "to": to, "amount": amount, "currency": "EUR", "mode": "immediate"})
}

#[tokio::test]
async fn a_transfer_moves_money_between_two_accounts_as_two_commands() {
    let baseline = Baseline::start().await;
    let (ada, bob) = (baseline.open().await, baseline.open().await);
    assert_eq!(baseline.deposit(ada, 1_000).await.0, 204);

    let (status, body) = baseline.post("/v1/transfers", transfer(ada, bob, 300)).await;

    assert_eq!(status, 204, "{body}");
    assert_eq!(baseline.account(ada).await.balance, 700);
    assert_eq!(baseline.account(bob).await.balance, 300);
}

#[tokio::test]
async fn a_refused_transfer_leaves_both_balances_as_they_were() {
    let baseline = Baseline::start().await;
    let ada = baseline.open().await;
    baseline.deposit(ada, 100).await;

    let (status, body) = baseline
        .post("/v1/transfers", transfer(ada, baseline.open().await, 101))
        .await;
    assert_eq!(
        (status, body["type"].as_str()),
        (422, Some("https://tally.dev/problems/insufficient-funds"))
    );

    // The debit goes through, the credit is refused, the refund brings the money back.
    let nobody = Uuid::now_v7();
    let (status, body) = baseline.post("/v1/transfers", transfer(ada, nobody, 40)).await;
    assert_eq!(status, 404, "{body}");
    assert!(body["detail"].as_str().unwrap().contains(&nobody.to_string()), "{body}");
    assert_eq!(baseline.account(ada).await.balance, 100);
}

#[tokio::test]
async fn client_mistakes_are_problems_not_server_errors() {
    let baseline = Baseline::start().await;
    let ada = baseline.open().await;
    assert_eq!(baseline.deposit(Uuid::now_v7(), 1).await.0, 404);
    assert_eq!(baseline.deposit(ada, 0).await.0, 422);
    let (status, _) = baseline
        .post("/v1/accounts", json!({"owner": "Ada", "currency": "euros"}))
        .await;
    assert_eq!(status, 422);
    let (status, _) = baseline
        .post(
            "/v1/transfers",
            json!({"from": ada, "to": ada, "amount": 1, "currency": "EUR", "mode": "pending"}),
        )
        .await;
    assert_eq!(status, 422);
}

#[tokio::test]
async fn concurrent_deposits_to_one_account_either_land_or_get_a_409_and_none_is_lost() {
    let baseline = Baseline::start().await;
    let hot = baseline.open().await;

    let answers = join_all((0..32).map(|_| baseline.deposit(hot, 1))).await;

    let landed = answers.iter().filter(|(status, _)| *status == 204).count();
    for (status, body) in &answers {
        assert!(*status == 204 || *status == 409, "{status} {body}");
    }
    assert!(landed >= 1);
    assert_eq!(baseline.account(hot).await.balance, landed as i64);
}

#[tokio::test]
async fn concurrent_transfers_between_two_accounts_conserve_money_and_answer_no_server_error() {
    let baseline = Baseline::start().await;
    let (ada, bob) = (baseline.open().await, baseline.open().await);
    baseline.deposit(ada, 1_000).await;

    let answers = join_all((0..32).map(|_| baseline.post("/v1/transfers", transfer(ada, bob, 1)))).await;

    let landed = answers.iter().filter(|(status, _)| *status == 204).count() as i64;
    for (status, body) in &answers {
        assert!(*status == 204 || *status == 409, "{status} {body}");
    }
    let (ada, bob) = (baseline.account(ada).await, baseline.account(bob).await);
    assert_eq!((ada.balance, bob.balance), (1_000 - landed, landed));
}
