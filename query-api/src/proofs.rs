//! Inclusion proofs for auditors: that an event is in the log a signed checkpoint covers.
//!
//! `GET /v1/audit/events/{event_id}/proof?tree_size=N` answers the event's leaf (its place in
//! commit order and its chain hash), its RFC 6962 audit path to the root of the first `N`
//! events, and the signed checkpoint of that size as `tally audit seal` published it. A client
//! checks it offline with the signer's public key
//! (`tally_event_store::checkpoint::verify_signature`, then
//! `tally_event_store::merkle::verify_inclusion`): neither this server nor the database is
//! trusted. The server recomputes the path from the log (one pass over the first `N` leaves,
//! 48 bytes each) and refuses to serve one when the log no longer gives the signed root.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tally_event_store::checkpoint::SignedCheckpoint;
use tally_event_store::merkle::Hash;
use tally_event_store::seal::{self, Proved};
use tally_service::Problem;
use tally_service::auth::{Auditor, Require};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::AppState;
use crate::audit::checkpoint_text;
use crate::routes::{PROBLEM_JSON, Params, path_id, unavailable_because};

/// Which checkpoint to prove against.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ProofQuery {
    /// The `tree_size` of a published checkpoint (1 or more); the latest when absent.
    pub tree_size: Option<i64>,
}

/// An event's inclusion proof against a signed checkpoint.
#[derive(Debug, Serialize, ToSchema)]
pub struct InclusionProofView {
    pub event_id: Uuid,
    /// The event's place in commit order (`<tx>.<position>`, as in the feed).
    #[schema(example = "74531.1042")]
    pub checkpoint: String,
    /// The leaf's number in commit order, from 0.
    pub leaf_index: u64,
    pub tree_size: u64,
    /// Hex SHA-256(0x00 ‖ tx_id ‖ position ‖ event hash), the integers as 8-byte big-endian
    /// (schemas/CHECKPOINT.md).
    pub leaf_hash: String,
    /// Hex of the event's chain hash (see HASH_CHAIN.md), the leaf's last 32 bytes.
    pub event_hash: String,
    /// Hex sibling hashes from the leaf up (RFC 6962 PATH).
    pub audit_path: Vec<String>,
    /// Hex root the path leads to: the checkpoint's signed `root`.
    pub root: String,
    /// The signed checkpoint (schemas/checkpoints/SignedCheckpoint.v1.json).
    #[schema(value_type = Object)]
    pub signed_checkpoint: SignedCheckpoint,
}

#[utoipa::path(
    get,
    path = "/v1/audit/events/{event_id}/proof",
    tag = "audit",
    security(("bearerAuth" = ["auditor"])),
    summary = "An event's Merkle inclusion proof against a signed checkpoint of the log",
    params(
        ("event_id" = Uuid, Path, description = "The event's id."),
        ProofQuery,
    ),
    responses(
        (status = 200, description = "The proof and the signed checkpoint it leads to.", body = InclusionProofView),
        (status = 400, description = "`invalid-parameter`: `tree_size` is not a number.", body = Problem,
         content_type = PROBLEM_JSON),
        (status = 404, description = "`event-not-found`: no event has this id; `checkpoint-not-found`: no \
            checkpoint of this size was published.", body = Problem, content_type = PROBLEM_JSON),
        (status = 409, description = "`log-does-not-match-checkpoint`: the log no longer gives the signed root \
            (run `tally audit verify --checkpoint`).", body = Problem, content_type = PROBLEM_JSON),
        (status = 422, description = "`tree-size-out-of-range`: `tree_size` is below 1; \
            `event-not-in-checkpoint`: the event was committed after the checkpoint.", body = Problem,
         content_type = PROBLEM_JSON),
        (status = 503, description = "`database-unavailable`; retry after `Retry-After` seconds.", body = Problem,
         content_type = PROBLEM_JSON),
    )
)]
pub(crate) async fn get_event_proof(
    _: Require<Auditor>,
    State(state): State<AppState>,
    Path(event_id): Path<String>,
    Params(query): Params<ProofQuery>,
) -> Response {
    match proof(&state, &event_id, query).await {
        Ok(view) => Json(view).into_response(),
        Err(response) => response,
    }
}

async fn proof(state: &AppState, event_id: &str, query: ProofQuery) -> Result<InclusionProofView, Response> {
    let event_id = path_id(event_id, "event-not-found", "event")?;
    let tree_size = match query.tree_size {
        None => None,
        Some(size) if size >= 1 => Some(size as u64),
        Some(size) => {
            return Err(unprocessable(
                "tree-size-out-of-range",
                "Tree size out of range",
                format!("tree_size must be 1 or more; got {size}."),
            ));
        }
    };
    let pool = state.sources.pick().0.clone();
    let unavailable = |e: sqlx::Error| unavailable_because(e.to_string());
    let signed = seal::published(&pool, tree_size)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| {
            let which = tree_size.map_or_else(
                || "No checkpoint was published yet.".into(),
                |size| format!("No checkpoint of tree size {size} was published."),
            );
            Problem::not_found("checkpoint-not-found", which).into_response()
        })?;
    let root: Option<Hash> = hex::decode(&signed.root).ok().and_then(|r| r.try_into().ok());
    let Some(signed_root) = root else {
        return Err(mismatch(format!(
            "The published checkpoint of tree size {} has no readable root.",
            signed.tree_size
        )));
    };
    match seal::prove(&pool, event_id, signed.tree_size)
        .await
        .map_err(unavailable)?
    {
        Proved::NoSuchEvent => Err(Problem::not_found("event-not-found", "No event with this id.").into_response()),
        Proved::NotInTree { leaf_index } => Err(unprocessable(
            "event-not-in-checkpoint",
            "Event not covered by the checkpoint",
            format!(
                "The event is leaf {leaf_index}, and the checkpoint covers leaves 0 to {}: ask for a later one.",
                signed.tree_size - 1
            ),
        )),
        Proved::LogTooShort { leaves } => Err(mismatch(format!(
            "The log holds {leaves} events, the checkpoint covers {}.",
            signed.tree_size
        ))),
        Proved::Proof { proof, .. } if proof.root != signed_root => Err(mismatch(format!(
            "The first {} events of the log give the root {}, the checkpoint signed {}.",
            signed.tree_size,
            hex::encode(proof.root),
            signed.root
        ))),
        Proved::Proof { at, event_hash, proof } => Ok(InclusionProofView {
            event_id,
            checkpoint: checkpoint_text(at),
            leaf_index: proof.leaf_index,
            tree_size: proof.tree_size,
            leaf_hash: hex::encode(proof.leaf),
            event_hash: hex::encode(event_hash),
            audit_path: proof.path.iter().map(hex::encode).collect(),
            root: hex::encode(proof.root),
            signed_checkpoint: signed,
        }),
    }
}

fn unprocessable(code: &str, title: &str, detail: String) -> Response {
    Problem::new(StatusCode::UNPROCESSABLE_ENTITY, code, title)
        .detail(detail)
        .into_response()
}

/// The log no longer matches a signed checkpoint: evidence of tampering, for the auditor.
fn mismatch(detail: String) -> Response {
    Problem::new(
        StatusCode::CONFLICT,
        "log-does-not-match-checkpoint",
        "The log does not match the checkpoint",
    )
    .detail(detail)
    .into_response()
}
