//! Stored events of older schema versions are upcast on read, by every reader.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tally_event_store::{NewEvent, StreamAppend};
use tally_tests::{Api, Stack, eventually};
use uuid::Uuid;

#[tokio::test]
async fn an_account_stored_as_v1_is_upcast_by_the_command_path_and_the_projector() {
    let stack = Stack::start().await;
    let client = tally_tests::client();
    let id = Uuid::now_v7();
    // A raw v1 AccountOpened, as an older Tally wrote it: no overdraft_limit field.
    stack
        .db
        .store()
        .append(vec![StreamAppend {
            stream_type: "account".into(),
            stream_id: id,
            expected_version: 0,
            known_prev_hash: None,
            events: vec![NewEvent {
                event_id: Uuid::now_v7(),
                event_type: "AccountOpened".into(),
                schema_version: 1,
                payload: format!(r#"{{"account_id":"{id}","owner":"Old Ada","currency":"EUR"}}"#),
                metadata: format!(r#"{{"correlation_id":"{id}","causation_id":"{id}"}}"#),
            }],
        }])
        .await
        .unwrap();

    let api = Api::new(&stack.command);
    let (deposit, _, _) = api
        .post_keyed(&format!("/v1/accounts/{id}/deposits"), &json!({"amount": 500}))
        .await;
    let (overdraw, problem, _) = api
        .post_keyed(&format!("/v1/accounts/{id}/withdrawals"), &json!({"amount": 600}))
        .await;

    assert_eq!(deposit, StatusCode::CREATED);
    assert_eq!(
        overdraw,
        StatusCode::UNPROCESSABLE_ENTITY,
        "v1 accounts have no overdraft"
    );
    assert_eq!(problem["available"], 500);
    let view = eventually(Duration::from_secs(20), "the projector to apply the v1 event", || {
        let client = client.clone();
        let url = format!("{}/v1/accounts/{id}", stack.query);
        async move {
            let body: Value = client.get(&url).send().await.ok()?.json().await.ok()?;
            (body["version"] == 2).then_some(body)
        }
    })
    .await;
    assert_eq!(view["owner"], "Old Ada", "{}", stack.logs());
    assert_eq!(view["balance"], 500);
}
