//! The console in a real browser (headless Chromium through chromedriver, `tally_tests::browser`)
//! against a real stack: sign-in, a deposit seen live on the overview and on the account page,
//! a rebuild watched to its switch, a tampered event flagged red on the audit page, and the
//! ops pages refused to a reader. Every page visited is saved as a PNG under
//! `<target>/console-screenshots/` (the README's overview picture is one of them).

use std::path::PathBuf;
use std::time::Duration;

use reqwest::StatusCode;
use tally_service::auth::Role;
use tally_tests::browser::Browser;
use tally_tests::{Api, Proc, Stack, TEST_SUBJECT, auth_env, bin_dir, eventually, free_port, token, wait_ready};

/// Where the screenshots go: `<target>/console-screenshots/`.
fn screenshots() -> PathBuf {
    bin_dir()
        .parent()
        .map_or_else(bin_dir, |target| target.to_path_buf())
        .join("console-screenshots")
}

/// Signs in through the form with `token` and returns the page it landed on.
async fn sign_in(browser: &Browser, console: &str, token: &str) -> String {
    browser.goto(&format!("{console}/")).await;
    assert!(
        browser.url().await.contains("/sign-in"),
        "a visitor without a session is sent to the sign-in page"
    );
    browser.type_into("#token", token).await;
    browser.click("form.signin button").await;
    eventually(Duration::from_secs(10), "the page after signing in", || async {
        let url = browser.url().await;
        (!url.contains("/sign-in")).then_some(url)
    })
    .await
}

#[tokio::test]
async fn an_ops_auditor_signs_in_sees_a_deposit_live_runs_a_rebuild_to_its_switch_and_sees_a_tampered_event_in_red() {
    let mut stack = Stack::start().await;
    let console = stack.spawn_console().await;
    let console = console.as_str();
    let shots = screenshots();
    let browser = Browser::start().await;
    let b = &browser;
    let user = token("console-ops", &[Role::Ops, Role::Reader, Role::Auditor]);

    browser.goto(&format!("{console}/sign-in")).await;
    browser.screenshot(&shots.join("sign-in.png")).await;
    let landed = sign_in(b, console, &user).await;
    assert_eq!(landed, format!("{console}/"), "ops land on the overview");

    // A deposit: the overview's live fragment counts it without a reload.
    let teller = Api::with_token(&stack.command, &token(TEST_SUBJECT, &[Role::Teller]));
    let id = teller.funded("EUR", 123_456).await;
    eventually(
        Duration::from_secs(30),
        "the account opening and deposit on the overview",
        || async move {
            let total = b.text_of("#commands-total .value").await?;
            (total.trim().parse::<f64>().ok()? >= 2.0).then_some(())
        },
    )
    .await;
    let outcomes = browser.text_of("#outcomes").await.unwrap_or_default();
    assert!(outcomes.contains("accepted"), "{outcomes}");
    // A few more samples, so the charts have lines to draw.
    for i in 0..5 {
        let _ = teller
            .post_keyed(
                &format!("/v1/accounts/{id}/deposits"),
                &serde_json::json!({"amount": 100 + i}),
            )
            .await;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let overview = browser.text().await;
    for part in [
        "relay leader",
        "Projection lag per partition",
        "Replicas",
        "p99 command latency",
    ] {
        assert!(overview.contains(part), "the overview shows {part}: {overview}");
    }
    browser.screenshot(&shots.join("overview.png")).await;

    // The account page, through the query API with the user's token: the money in euros.
    let balance = "1239.66 EUR"; // 123,456 + 100 + 101 + 102 + 103 + 104 cents
    eventually(
        Duration::from_secs(30),
        "the deposits on the account page",
        || async move {
            b.goto(&format!("{console}/accounts/{id}")).await;
            let shown = b.text_of("#balance .value").await?;
            (shown == balance).then_some(())
        },
    )
    .await;
    let statement = browser.text_of("#statement").await.unwrap_or_default();
    assert!(
        statement.contains("1234.56 EUR"),
        "the first deposit is a statement line: {statement}"
    );
    browser.screenshot(&shots.join("account.png")).await;
    browser.goto(&format!("{console}/accounts?q=ad")).await;
    let matches = browser.text_of("#matches").await.unwrap_or_default();
    assert!(
        matches.contains(&id.to_string()),
        "owner search finds Ada's account: {matches}"
    );

    // A rebuild started from the page, watched until the switch.
    browser.goto(&format!("{console}/projections")).await;
    browser.click("button[data-action=rebuild-accounts]").await;
    let report = eventually(Duration::from_secs(60), "the rebuild's switch", || async move {
        let state = b.text_of("#rebuild-accounts").await?;
        assert!(!state.contains("failed"), "the rebuild failed: {state}");
        state.contains("switched").then_some(state)
    })
    .await;
    assert!(report.contains("generation"), "{report}");
    browser.screenshot(&shots.join("projections.png")).await;

    // The chain, intact, then tampered behind the append-only trigger.
    browser.goto(&format!("{console}/audit/streams/{id}")).await;
    let chain = browser.text_of("#chain").await.unwrap_or_default();
    assert!(chain.contains("Chain intact"), "{chain}");
    browser.screenshot(&shots.join("audit-intact.png")).await;
    crate::audit::tamper_as_superuser(
        &stack.db,
        "UPDATE events SET payload = jsonb_set(payload::jsonb, '{amount}', '999999')::json \
         WHERE stream_id = $1 AND version = $2",
        id,
        2,
    )
    .await;
    let broken = eventually(Duration::from_secs(30), "the tampered event in red", || async move {
        b.goto(&format!("{console}/audit/streams/{id}")).await;
        let chain = b.text_of("#chain").await?;
        chain.contains("Chain broken").then_some(chain)
    })
    .await;
    assert!(
        broken.contains("version 2") && broken.contains("hash mismatch"),
        "{broken}"
    );
    let source = browser.source().await;
    assert!(
        source.contains(r#"class="broken" data-version="2""#),
        "the tampered row is marked"
    );
    browser.screenshot(&shots.join("audit-tampered.png")).await;
    browser.goto(&format!("{console}/audit")).await;
    browser.screenshot(&shots.join("audit-feed.png")).await;

    // The export: the feed's JSON lines, as `tally audit export` writes them.
    let export = reqwest::Client::new()
        .get(format!("{console}/audit/export"))
        .header("cookie", format!("tally_console_token={user}"))
        .send()
        .await
        .unwrap();
    assert_eq!(export.status(), StatusCode::OK);
    let lines = export.text().await.unwrap();
    let events: Vec<serde_json::Value> = lines.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(events.len() >= 7, "open + 6 deposits at least: {}", events.len());
    assert!(
        events
            .iter()
            .all(|e| e["hash"].is_string() && e["checkpoint"].is_string())
    );
    drop(browser);
    drop(stack);
}

#[tokio::test]
async fn a_reader_gets_403_pages_on_the_ops_pages_cannot_post_their_forms_and_sees_an_api_outage_as_a_page() {
    // No stack is needed: the role check comes before any read.
    let port = free_port();
    let mut env = auth_env();
    env.extend([
        ("TALLY_CONSOLE_LISTEN", format!("127.0.0.1:{port}")),
        ("TALLY_DATABASE_URL", "postgres://nobody@127.0.0.1:1/none".to_owned()),
        ("TALLY_QUERY_URL", "http://127.0.0.1:1".to_owned()),
        ("TALLY_CONSOLE_COMMAND_URLS", String::new()),
        ("TALLY_CONSOLE_QUERY_URLS", String::new()),
        ("TALLY_CONSOLE_RELAY_URLS", String::new()),
        ("TALLY_CONSOLE_PROJECTOR_URLS", String::new()),
    ]);
    let proc = Proc::spawn("tally-console", &env);
    let console = format!("http://127.0.0.1:{port}");
    wait_ready(&console, &proc).await;
    let reader = token("console-reader", &[Role::Reader]);

    let browser = Browser::start().await;
    let landed = sign_in(&browser, &console, &reader).await;
    assert_eq!(
        landed,
        format!("{console}/accounts"),
        "readers land on the accounts page"
    );
    let nav = browser.text_of("header nav").await.unwrap_or_default();
    assert!(
        !nav.contains("Overview") && !nav.contains("Projections") && nav.contains("Accounts"),
        "{nav}"
    );
    for page in ["/", "/projections"] {
        browser.goto(&format!("{console}{page}")).await;
        let text = browser.text().await;
        assert!(
            text.contains("Not for your role") && text.contains("ops"),
            "{page}: {text}"
        );
    }
    browser.screenshot(&screenshots().join("forbidden.png")).await;

    let client = reqwest::Client::new();
    let cookie = format!("tally_console_token={reader}");
    for path in ["/", "/projections", "/overview/live", "/projections/live"] {
        let status = client
            .get(format!("{console}{path}"))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}");
    }
    let pause = client
        .post(format!("{console}/projections/accounts/pause"))
        .header("cookie", &cookie)
        .form(&[("csrf", "whatever")])
        .send()
        .await
        .unwrap();
    assert_eq!(pause.status(), StatusCode::FORBIDDEN, "a reader cannot pause");
    // This console's query API is down: the account page says so, as a page.
    let outage = client
        .get(format!("{console}/accounts/{}", uuid::Uuid::now_v7()))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(outage.status(), StatusCode::BAD_GATEWAY);
    let page = outage.text().await.unwrap();
    assert!(
        page.contains("Query API unavailable") && page.contains("cannot be reached"),
        "{page}"
    );
    let foreign = client
        .post(format!("{console}/sign-out"))
        .header("cookie", &cookie)
        .header("origin", "http://attacker.example")
        .form(&[("csrf", "whatever")])
        .send()
        .await
        .unwrap();
    assert_eq!(
        foreign.status(),
        StatusCode::FORBIDDEN,
        "a form from another site is refused"
    );
    let unauthenticated = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("{console}/projections"))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), StatusCode::SEE_OTHER);
    assert_eq!(unauthenticated.headers()["location"], "/sign-in");
}
