//! `POST /v1/batches`: up to [`BATCH_ITEMS_MAX`] commands in one request (ADR 0005).
//!
//! Each item is what one of the single routes takes (a transfer, an entry, a deposit, a
//! withdrawal, a post or a void), with its own idempotency key, and gets its own result, in
//! order: exactly the status and body the single route would have answered. Items marked
//! `linked` chain to the next; a chain ends at the first item without the mark, and is written
//! whole or not at all (the writer decides it in one transaction; see `writer.rs`).
//!
//! An item that does not parse fails alone (or with its chain) and nothing of it reaches the
//! writer. The items are queued in order without waiting for one another, so the writer's
//! group commit puts many of them in each transaction.

use std::collections::HashMap;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tally_domain::{AccountCommand, AccountError, Metadata};
use tally_event_store::idempotency::{IdempotencyKey, request_hash};
use tally_service::auth::{Principal, Require, Teller};
use tally_service::{Json, Problem};
use utoipa::{OpenApi, ToSchema};
use uuid::Uuid;

use crate::AppState;
use crate::command::{Command, EntryAction};
use crate::entries::{EntryRequest, FinishRequest, entry_command, finish_command};
use crate::error::{ApiError, command_problem, rejection};
use crate::execute::{CommandError, Idempotency, Outcome, StreamKind, load_many};
use crate::routes::{
    INTERNAL, PROBLEM_JSON, PostingRequest, UNAVAILABLE, UNSUPPORTED_MEDIA_TYPE, metadata, parse_amount,
    posting_command,
};
use crate::transfers::{PostRequest, TransferRequest, VoidRequest, post_command, transfer_command, void_command};
use crate::writer::{Respond, Submission, Ticket};

/// Most items in one batch, as TigerBeetle's `create_transfers` takes.
pub const BATCH_ITEMS_MAX: usize = 8_190;
/// Largest accepted batch body: 8,190 transfers of a few hundred bytes each, with room to spare.
pub const BATCH_BODY_MAX_BYTES: usize = 4 * 1024 * 1024;

/// The batch route's part of the OpenAPI document (merged in [`crate::openapi::document`]).
#[derive(OpenApi)]
#[openapi(
    paths(create),
    components(schemas(ItemKind, BatchItem, BatchRequest, ItemResult, BatchResponse)),
    tags((name = "batches", description = "Many commands in one request, each with its own result; linked chains all or nothing."))
)]
pub struct BatchesApi;

pub fn routes() -> Router<AppState> {
    Router::new().route(
        "/v1/batches",
        post(create).layer(DefaultBodyLimit::max(BATCH_BODY_MAX_BYTES)),
    )
}

/// What an item does: the single route it stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ItemKind {
    /// `POST /v1/transfers`.
    Transfer,
    /// `POST /v1/entries`.
    Entry,
    /// `POST /v1/accounts/{account_id}/deposits`.
    Deposit,
    /// `POST /v1/accounts/{account_id}/withdrawals`.
    Withdrawal,
    /// `POST /v1/transfers/{transfer_id}/post` or `/v1/entries/{entry_id}/post`.
    Post,
    /// `POST /v1/transfers/{transfer_id}/void` or `/v1/entries/{entry_id}/void`.
    Void,
}

/// One item (documentation of its shape: each item is parsed on its own, so one that does not
/// fit this fails alone). Besides the fields below, an item carries the body fields of the
/// single route its `kind` stands for.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct BatchItem {
    pub kind: ItemKind,
    /// 1 to 255 visible ASCII characters, unique within the batch: the item's own
    /// Idempotency-Key (a retried batch replays each item's stored result).
    pub idempotency_key: String,
    /// Chains this item to the next: the chain is written whole or not at all.
    #[serde(default)]
    pub linked: bool,
    /// `deposit` and `withdrawal`: the account.
    #[serde(default)]
    pub account_id: Option<Uuid>,
    /// `transfer`: the new transfer's id (optional); `post` and `void`: the pending transfer.
    #[serde(default)]
    pub transfer_id: Option<Uuid>,
    /// `entry`: the new entry's id (optional); `post` and `void`: the pending entry.
    #[serde(default)]
    pub entry_id: Option<Uuid>,
    /// The single route's other body fields (`from`, `to`, `amount`, `currency`, `mode`,
    /// `legs`, `reference`, `expires_in_s`).
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub fields: Map<String, Value>,
}

/// `POST /v1/batches`
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// 1 to 8,190 items, each shaped as `BatchItem` says. Any JSON value is accepted here: an
    /// item that is not a valid `BatchItem` fails alone, with its own problem in its result.
    #[schema(value_type = Vec<serde_json::Value>, min_items = 1)]
    pub items: Vec<Value>,
}

/// One item's result: what its single route would have answered.
#[derive(Debug, Serialize, ToSchema)]
pub struct ItemResult {
    /// The item's index in the request.
    pub index: usize,
    /// The single route's status: 201, or a problem's.
    pub status: u16,
    /// The single route's body: its success shape, or a problem (RFC 9457).
    #[schema(value_type = Object)]
    pub body: Value,
    /// `true` when this repeats the result stored under the item's idempotency key.
    pub replayed: bool,
}

/// The results, one per item, in order.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchResponse {
    pub results: Vec<ItemResult>,
}

#[utoipa::path(
    post,
    path = "/v1/batches",
    tag = "batches",
    security(("bearerAuth" = ["teller"])),
    summary = "Run up to 8,190 commands, each with its own result; linked chains all or nothing",
    request_body = BatchRequest,
    responses(
        (status = 200, description = "Every item's own result, in order. An item refused, or malformed, fails alone, \
            or with its chain: the chain's other items answer `422 linked-item-failed` (with `failed_index`), and \
            nothing of it is written.", body = BatchResponse),
        (status = 400, description = "`malformed-json`.", body = Problem, content_type = PROBLEM_JSON),
        (status = 413, description = "`batch-too-large`: more than 8,190 items; `payload-too-large`: the body is over 4 MiB.", body = Problem, content_type = PROBLEM_JSON),
        (status = 415, description = UNSUPPORTED_MEDIA_TYPE, body = Problem, content_type = PROBLEM_JSON),
        (status = 422, description = "`invalid-batch`: no items; `invalid-body`: not `{\"items\": [...]}`.", body = Problem, content_type = PROBLEM_JSON),
        (status = 500, description = INTERNAL, body = Problem, content_type = PROBLEM_JSON),
        (status = 503, description = UNAVAILABLE, body = Problem, content_type = PROBLEM_JSON),
    )
)]
pub(crate) async fn create(
    Require { caller, .. }: Require<Teller>,
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(body): Json<BatchRequest>,
) -> Result<Response, ApiError> {
    let items = body.items;
    if items.is_empty() {
        return Err(
            Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-batch", "Invalid batch")
                .detail(format!("A batch has 1 to {BATCH_ITEMS_MAX} items."))
                .into(),
        );
    }
    if items.len() > BATCH_ITEMS_MAX {
        return Err(
            Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "batch-too-large", "Batch too large")
                .detail(format!(
                    "A batch has at most {BATCH_ITEMS_MAX} items; this one has {}. Split it.",
                    items.len()
                ))
                .extension("items", items.len() as i64)
                .extension("items_max", BATCH_ITEMS_MAX as i64)
                .into(),
        );
    }
    let base = metadata(&caller, &headers, None);
    let mut parsed: Vec<Parsed> = items.into_iter().map(|item| parse(&caller, item)).collect();
    refuse_repeated_keys(&mut parsed);
    if let Some(last) = parsed.last_mut().filter(|p| p.linked) {
        last.command = Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "linked-chain-open",
            "Linked chain open",
        )
        .detail("The batch's last item is `linked`, so its chain has no end: unmark it."));
    }
    resolve_targets(&state, &mut parsed).await?;

    let mut results: Vec<Option<ItemResult>> = (0..parsed.len()).map(|_| None).collect();
    let mut tickets: Vec<(Vec<usize>, Ticket)> = Vec::new();
    for chain in chains(&parsed) {
        let refused = chain
            .iter()
            .find_map(|&i| parsed[i].command.as_ref().err().map(|problem| (i, problem.clone())));
        if let Some((failed, problem)) = refused {
            // Never reaches the writer: nothing is written or stored.
            for &i in &chain {
                let problem = if i == failed {
                    problem.clone()
                } else {
                    rejection(&AccountError::LinkedItemFailed { failed })
                };
                results[i] = Some(problem_result(i, problem));
            }
            continue;
        }
        chain_hashes(&mut parsed, &chain);
        let submissions = chain.iter().map(|&i| submission(&mut parsed[i], i, &base)).collect();
        tickets.push((chain, state.writer.enqueue(submissions).await));
    }
    for (chain, ticket) in tickets {
        for (i, result) in chain.into_iter().zip(ticket.results().await) {
            results[i] = Some(item_result(i, result));
        }
    }
    let results: Vec<ItemResult> = results
        .into_iter()
        .map(|r| r.expect("every item has a result"))
        .collect();
    if results
        .iter()
        .all(|r| r.status == StatusCode::SERVICE_UNAVAILABLE.as_u16())
    {
        // Nothing ran (the store is away, or the writer is stopping): the batch as a whole is
        // to be retried, answered as its items were.
        let database = format!("{}database-unavailable", tally_service::problem::PROBLEM_TYPE_BASE);
        let cause = "every item of the batch was unavailable".to_owned();
        return Err(ApiError::Command(
            if results
                .iter()
                .all(|r| r.body["type"].as_str() == Some(database.as_str()))
            {
                CommandError::DatabaseUnavailable(cause)
            } else {
                CommandError::Unavailable(cause)
            },
        ));
    }
    Ok((StatusCode::OK, axum::Json(BatchResponse { results })).into_response())
}

/// An item as parsed: its command (or why it has none) and how it chains.
struct Parsed {
    command: Result<Prepared, Problem>,
    /// Chained to the next item. Read even from an item that fails otherwise, so a malformed
    /// item fails its own chain rather than joining the next.
    linked: bool,
}

/// An item ready for the writer, but for a post or void whose target is still to be read.
struct Prepared {
    idempotency: Idempotency,
    /// The item as its request hash covers it (its fields and kind, without `linked`).
    hashed: Value,
    action: Action,
}

enum Action {
    Ready(Command, Respond),
    /// A post or void (`post`: the amount, if any) of the transfer or entry `target`, whose
    /// parties are read (from an earlier item of the batch, or the log) before queueing.
    Finish {
        target: Target,
        post: Option<Option<i64>>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Transfer(Uuid),
    Entry(Uuid),
}

fn invalid_body(detail: impl Into<String>) -> Problem {
    Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-body", "Invalid request body").detail(detail)
}

/// Parses one item of the batch; a malformed one gets its own problem.
fn parse(caller: &Principal, item: Value) -> Parsed {
    let Value::Object(mut fields) = item else {
        return Parsed {
            command: Err(invalid_body("A batch item is a JSON object.")),
            linked: false,
        };
    };
    let linked = fields.remove("linked");
    let command = match &linked {
        None | Some(Value::Bool(_)) => prepare(caller, fields),
        Some(_) => Err(invalid_body("`linked` is true or false.")),
    };
    Parsed {
        command,
        linked: linked.is_some_and(|l| l == Value::Bool(true)),
    }
}

fn prepare(caller: &Principal, mut fields: Map<String, Value>) -> Result<Prepared, Problem> {
    let kind: ItemKind = match fields.remove("kind") {
        Some(kind) => serde_json::from_value(kind)
            .map_err(|_| invalid_body("`kind` is one of transfer, entry, deposit, withdrawal, post, void."))?,
        None => return Err(invalid_body("A batch item names its `kind`.")),
    };
    let key = match fields.remove("idempotency_key") {
        Some(Value::String(raw)) => IdempotencyKey::parse(&caller.subject, &raw).ok_or_else(|| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid-idempotency-key",
                "Invalid Idempotency-Key",
            )
            .detail("An idempotency_key is 1 to 255 visible ASCII characters.")
        })?,
        Some(_) | None => {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "idempotency-key-required",
                "Idempotency-Key required",
            )
            .detail("Each batch item carries its own idempotency_key (1 to 255 visible ASCII characters)."));
        }
    };
    // The hash covers the item as the single route sees it, with its kind and target: the
    // same key sent again with another item is refused, as on the single routes. (A chain's
    // members hash the whole chain instead: `chain_hashes`.)
    let mut hashed = fields.clone();
    hashed.insert("kind".into(), serde_json::to_value(kind).expect("kinds serialize"));
    let hashed = Value::Object(hashed);
    let idempotency = Idempotency {
        key,
        request_hash: request_hash("POST", "/v1/batches", &hashed),
    };
    let take_id = |fields: &mut Map<String, Value>, name: &str| -> Result<Option<Uuid>, Problem> {
        match fields.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(raw)) => Uuid::try_parse(&raw)
                .map(Some)
                .map_err(|_| invalid_body(format!("`{name}` is a UUID."))),
            Some(_) => Err(invalid_body(format!("`{name}` is a UUID."))),
        }
    };
    let body = |fields: Map<String, Value>| Value::Object(fields);
    let action = match kind {
        ItemKind::Transfer => {
            let request: TransferRequest = from_fields(body(fields))?;
            let (command, respond) = transfer_command(request)?;
            Action::Ready(command, respond)
        }
        ItemKind::Entry => {
            let request: EntryRequest = from_fields(body(fields))?;
            let (command, respond) = entry_command(request)?;
            Action::Ready(command, respond)
        }
        ItemKind::Deposit | ItemKind::Withdrawal => {
            let account_id = take_id(&mut fields, "account_id")?
                .ok_or_else(|| invalid_body("A deposit or withdrawal names its `account_id`."))?;
            let request: PostingRequest = from_fields(body(fields))?;
            let (command, respond) = if kind == ItemKind::Deposit {
                posting_command(account_id, request, |amount, reference| AccountCommand::Deposit {
                    amount,
                    reference,
                })?
            } else {
                posting_command(account_id, request, |amount, reference| AccountCommand::Withdraw {
                    amount,
                    reference,
                })?
            };
            Action::Ready(command, respond)
        }
        ItemKind::Post | ItemKind::Void => {
            let transfer = take_id(&mut fields, "transfer_id")?;
            let entry = take_id(&mut fields, "entry_id")?;
            let target = match (transfer, entry) {
                (Some(id), None) => Target::Transfer(id),
                (None, Some(id)) => Target::Entry(id),
                _ => {
                    return Err(invalid_body(
                        "A post or void names a `transfer_id` or an `entry_id`, not both.",
                    ));
                }
            };
            let post = match (kind, target) {
                (ItemKind::Post, Target::Transfer(_)) => {
                    let request: PostRequest = from_fields(body(fields))?;
                    if let Some(amount) = request.amount {
                        parse_amount(amount)?;
                    }
                    Some(request.amount)
                }
                (ItemKind::Post, Target::Entry(_)) => {
                    let _: FinishRequest = from_fields(body(fields))?;
                    Some(None)
                }
                (_, Target::Transfer(_)) => {
                    let _: VoidRequest = from_fields(body(fields))?;
                    None
                }
                (_, Target::Entry(_)) => {
                    let _: FinishRequest = from_fields(body(fields))?;
                    None
                }
            };
            Action::Finish { target, post }
        }
    };
    Ok(Prepared {
        idempotency,
        hashed,
        action,
    })
}

/// Gives each member of `chain` (every one parsed) a request hash over the whole chain and its
/// place in it: its key then replays only within the very same chain. A key of a refused
/// chain sent again in another chain (say, with the refused item mended under a new key) is a
/// reused key, which fails that chain, so no chain is ever part replayed, part written.
fn chain_hashes(parsed: &mut [Parsed], chain: &[usize]) {
    if chain.len() < 2 {
        return;
    }
    let members: Vec<Value> = chain
        .iter()
        .filter_map(|&i| parsed[i].command.as_ref().ok().map(|p| p.hashed.clone()))
        .collect();
    for (position, &i) in chain.iter().enumerate() {
        if let Ok(prepared) = &mut parsed[i].command {
            let whole = serde_json::json!({ "chain": members, "position": position });
            prepared.idempotency.request_hash = request_hash("POST", "/v1/batches", &whole);
        }
    }
}

fn from_fields<T: serde::de::DeserializeOwned>(body: Value) -> Result<T, Problem> {
    serde_json::from_value(body).map_err(|e| invalid_body(e.to_string()))
}

/// An item whose key an earlier item of the batch already carries is refused: one key, one
/// command.
fn refuse_repeated_keys(parsed: &mut [Parsed]) {
    let mut first: HashMap<IdempotencyKey, usize> = HashMap::new();
    for (i, item) in parsed.iter_mut().enumerate() {
        let Ok(prepared) = &item.command else { continue };
        if let Some(&earlier) = first.get(&prepared.idempotency.key) {
            item.command = Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency-key-repeated",
                "Idempotency key repeated",
            )
            .detail(format!(
                "Item {earlier} of this batch carries the same idempotency_key."
            ))
            .extension("first_index", earlier as i64));
        } else {
            first.insert(prepared.idempotency.key.clone(), i);
        }
    }
}

/// Reads the parties of every post and void: from the log, all in one round trip, or, for a
/// transfer or entry the log does not hold yet, from the first item of the batch that creates
/// it (a hold and its post may share a batch). A target that exists nowhere is that item's 404.
/// (Should the creating item be refused and a later one create the id with other parties, the
/// writer refuses the post as stale, and its retry reads the log.)
async fn resolve_targets(state: &AppState, parsed: &mut [Parsed]) -> Result<(), ApiError> {
    let mut wanted: Vec<(Uuid, StreamKind)> = parsed
        .iter()
        .filter_map(|item| match &item.command.as_ref().ok()?.action {
            Action::Finish {
                target: Target::Transfer(id),
                ..
            } => Some((*id, StreamKind::Transfer)),
            Action::Finish {
                target: Target::Entry(id),
                ..
            } => Some((*id, StreamKind::Entry)),
            Action::Ready(..) => None,
        })
        .collect();
    wanted.sort_unstable_by_key(|(id, _)| *id);
    wanted.dedup();
    // Transfer id -> (from, to); entry id -> its legs' accounts.
    let mut transfers: HashMap<Uuid, (Uuid, Uuid)> = HashMap::new();
    let mut entries: HashMap<Uuid, Vec<Uuid>> = HashMap::new();
    if !wanted.is_empty() {
        for (id, loaded) in load_many(&state.store, None, &wanted).await? {
            // Another kind of stream under the id, or nothing yet: not in the log.
            let Ok(loaded) = loaded else { continue };
            if let Some(t) = loaded.transfer().filter(|_| loaded.version > 0) {
                transfers.insert(id, (t.from, t.to));
            }
            if let Some(e) = loaded.entry().filter(|_| loaded.version > 0) {
                entries.insert(id, e.legs.iter().map(|l| l.account).collect());
            }
        }
    }
    for item in parsed.iter() {
        let Ok(prepared) = &item.command else { continue };
        match &prepared.action {
            Action::Ready(Command::Transfer(t), _) => {
                transfers.entry(t.transfer_id).or_insert((t.from, t.to));
            }
            Action::Ready(Command::Entry(e), _) => {
                entries
                    .entry(e.entry_id)
                    .or_insert_with(|| e.legs.iter().map(|l| l.account).collect());
            }
            _ => {}
        }
    }
    for item in parsed.iter_mut() {
        let Ok(prepared) = &mut item.command else { continue };
        let Action::Finish { target, post } = &prepared.action else {
            continue;
        };
        let resolved = match *target {
            Target::Transfer(id) => transfers.get(&id).map(|&(from, to)| match post {
                Some(amount) => {
                    let amount = amount.map(|a| parse_amount(a).expect("checked when parsed"));
                    post_command(id, from, to, amount)
                }
                None => void_command(id, from),
            }),
            Target::Entry(id) => entries.get(&id).map(|accounts| {
                let action = if post.is_some() {
                    EntryAction::Post
                } else {
                    EntryAction::Void
                };
                finish_command(id, accounts.clone(), action)
            }),
        };
        match resolved {
            Some((command, respond)) => prepared.action = Action::Ready(command, respond),
            None => {
                item.command = Err(match target {
                    Target::Transfer(_) => Problem::not_found("transfer-not-found", "No transfer with this id."),
                    Target::Entry(_) => Problem::not_found("entry-not-found", "No entry with this id."),
                });
            }
        }
    }
    Ok(())
}

/// The batch's items grouped into chains (an unlinked item is a chain of one), in order. (A
/// chain still open at the end of the batch has its last item refused before this.)
fn chains(parsed: &[Parsed]) -> Vec<Vec<usize>> {
    let mut chains = Vec::new();
    let mut chain = Vec::new();
    for (i, item) in parsed.iter().enumerate() {
        chain.push(i);
        if !item.linked {
            chains.push(std::mem::take(&mut chain));
        }
    }
    if !chain.is_empty() {
        chains.push(chain);
    }
    chains
}

/// The writer's submission for item `index`, which is ready (its chain has no refused item).
fn submission(item: &mut Parsed, index: usize, base: &Metadata) -> Submission {
    let prepared = std::mem::replace(&mut item.command, Err(invalid_body("submitted")))
        .unwrap_or_else(|_| unreachable!("only chains without a refused item are submitted"));
    let Action::Ready(command, respond) = prepared.action else {
        unreachable!("targets are resolved before submitting")
    };
    let metadata = Metadata {
        // Each item is its own cause; the batch shares the correlation id.
        causation_id: Uuid::now_v7(),
        idempotency_key: Some(prepared.idempotency.key.as_str().to_owned()),
        ..base.clone()
    };
    Submission {
        command,
        metadata,
        idempotency: Some(prepared.idempotency),
        respond,
        index,
    }
}

fn problem_result(index: usize, problem: Problem) -> ItemResult {
    ItemResult {
        index,
        status: problem.status,
        body: serde_json::to_value(&problem).expect("problems always serialize"),
        replayed: false,
    }
}

/// The result of item `index` as its single route would have answered.
fn item_result(index: usize, result: Result<Outcome, CommandError>) -> ItemResult {
    match result {
        Ok(Outcome::Fresh(stored)) => ItemResult {
            index,
            status: stored.status,
            body: stored.body,
            replayed: false,
        },
        Ok(Outcome::Replayed(stored)) => ItemResult {
            index,
            status: stored.status,
            body: stored.body,
            replayed: true,
        },
        Err(error) => {
            let (problem, cause) = command_problem(error);
            if let Some(cause) = cause {
                tracing::error!(index, %cause, "a batch item failed");
            }
            problem_result(index, problem)
        }
    }
}
