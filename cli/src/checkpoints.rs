//! `tally audit keygen`, `tally audit seal` and the checkpoint half of `tally audit verify
//! --checkpoint`: signed checkpoints of the log (`tally_event_store::checkpoint`).
//!
//! `tally audit seal` runs one round (`tally_event_store::seal::seal_into_history`): from cron,
//! or by hand on an auditor's machine. With `--every` it is the sealer, a process of its own
//! that runs the same round periodically (`tally_event_store::sealer`) and serves `/health`,
//! `/ready` and `/metrics` on `--listen`. Either way the key sits only with the sealing process,
//! which connects as the `tally_sealer` role: it can read the leaves of the log and publish
//! checkpoints, and nothing else, so the database never holds the key and the sealer cannot
//! change the log.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tally_event_store::checkpoint::{self, CheckpointError, TreeHead};
use tally_event_store::seal;
use tally_event_store::sealer::{self, SealerConfig, SealerStatus};
use tally_service::Problem;

// The exit codes of `tally audit verify`: a checkpoint the log does not match (or with a bad
// signature) is tampering like a broken chain; a file, a key or the log that cannot be read or
// does not fit is "cannot verify".
use crate::{EXIT_BROKEN, EXIT_DATABASE as EXIT_UNREADABLE};

#[derive(Debug, clap::Args)]
pub struct KeygenArgs {
    /// Where to write the private key (hex, mode 0600); the public key goes to `<FILE>.pub`.
    /// Never overwrites a key.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct SealArgs {
    /// The Ed25519 signing key (as `tally audit keygen` writes it). Keep it where the database
    /// and its owner cannot read it.
    #[arg(long, value_name = "FILE", env = "TALLY_CHECKPOINT_KEY_FILE")]
    key_file: PathBuf,
    /// The checkpoint history (JSON Lines, oldest first): the seal extends its last checkpoint
    /// and appends the new one. Keep it, or copies of it, outside the database.
    #[arg(long, value_name = "FILE", env = "TALLY_CHECKPOINT_HISTORY")]
    history: PathBuf,
    /// Do not copy the checkpoint into the database's `audit_checkpoints` table (from which the
    /// query API serves inclusion proofs).
    #[arg(long)]
    no_publish: bool,
    /// Keep sealing, a round every DURATION (`30s`, `5m`, `1h`, `1h30m`; 1s to 7d), until
    /// SIGTERM or Ctrl-C, serving `/health`, `/ready` and `/metrics` on `--listen`. Without
    /// it, seal once and exit.
    #[arg(long, value_name = "DURATION", env = "TALLY_SEALER_EVERY", value_parser = parse_every)]
    every: Option<Duration>,
    /// With `--every`: the address of the sealer's HTTP listener (`/health`, `/ready`: the last
    /// round succeeded, `/metrics`).
    #[arg(long, env = "TALLY_SEALER_LISTEN", default_value = "127.0.0.1:9093")]
    listen: SocketAddr,
}

/// The shortest and longest `--every`.
const EVERY_MIN: Duration = Duration::from_secs(1);
const EVERY_MAX: Duration = Duration::from_secs(7 * 24 * 3600);

fn parse_every(text: &str) -> Result<Duration, String> {
    parse_duration(text, EVERY_MIN, EVERY_MAX)
}

/// A duration such as `30s`, `5m`, `1h30m` or `500ms` between `min` and `max`: numbers each
/// followed by a unit (`ms`, `s`, `m`, `h`, `d`). The workspace has no duration-parsing crate,
/// and this is all it needs.
pub fn parse_duration(text: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let invalid = || format!("{text:?} is not a duration such as 30s, 5m, 1h or 1h30m");
    let mut total = Duration::ZERO;
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(invalid());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("{text:?} has a number without a unit (ms, s, m, h or d)"))?;
        let number: u64 = rest[..digits].parse().map_err(|_| invalid())?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit_ms: u64 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(invalid()),
        };
        rest = &rest[unit_len..];
        let ms = number.checked_mul(unit_ms).ok_or_else(invalid)?;
        total = total.checked_add(Duration::from_millis(ms)).ok_or_else(invalid)?;
    }
    if !(min..=max).contains(&total) {
        return Err(format!("{text:?} is outside {min:?} to {max:?}"));
    }
    Ok(total)
}

/// `tally audit keygen`
pub fn keygen(args: &KeygenArgs) -> anyhow::Result<()> {
    let key = checkpoint::generate_key();
    let public = checkpoint::write_key_files(&args.out, &key)?;
    println!(
        "wrote {} (private: keep it off the database hosts) and {} (public, key id {})",
        args.out.display(),
        public.display(),
        checkpoint::key_id(&key.verifying_key())
    );
    Ok(())
}

/// `tally audit seal`: one round, or with `--every` the sealer.
pub async fn seal(database_url: &str, args: &SealArgs) -> anyhow::Result<()> {
    let key = checkpoint::read_signing_key(&args.key_file)?;
    // A history this key cannot extend (another signer's, or damaged) is refused now, before a
    // sealer starts looping on it.
    if let Some(last) = checkpoint::read_last(&args.history)? {
        checkpoint::verify_signature(&last, &key.verifying_key())?;
    }
    let pool = tally_event_store::connect(database_url, 1)?;
    match args.every {
        None => seal_once(&pool, &key, args).await,
        Some(every) => run_sealer(pool, key, every, args).await,
    }
}

async fn seal_once(pool: &sqlx::PgPool, key: &ed25519_dalek::SigningKey, args: &SealArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let round = seal::seal_into_history(pool, key, &args.history, !args.no_publish).await?;
    let cp = &round.checkpoint;
    if !round.appended {
        println!(
            "unchanged: tree size {}, root {} (no new events)",
            cp.tree_size, cp.root
        );
        return Ok(());
    }
    println!(
        "sealed: tree size {} (+{}), root {}, last event {}.{}, key {}, in {} ms",
        cp.tree_size,
        round.new_events,
        cp.root,
        cp.last_tx_id,
        cp.last_position,
        cp.key_id,
        started.elapsed().as_millis()
    );
    Ok(())
}

/// The sealer: rounds every `every` until SIGTERM or Ctrl-C, with its HTTP listener.
async fn run_sealer(
    pool: sqlx::PgPool,
    key: ed25519_dalek::SigningKey,
    every: Duration,
    args: &SealArgs,
) -> anyhow::Result<()> {
    tally_service::metrics::install();
    let status = Arc::new(SealerStatus::default());
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    tracing::info!(listen = %listener.local_addr()?, "sealer probes listening");
    let probes = tally_service::probes::router(get(ready)).with_state(status.clone());
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, probes).await {
            tracing::error!(%error, "the health and metrics endpoint stopped");
        }
    });
    let config = SealerConfig {
        every,
        history: args.history.clone(),
        publish: !args.no_publish,
    };
    sealer::run(pool, key, config, &status, tally_service::shutdown::signal()).await;
    Ok(())
}

/// `GET /ready`: 200 `{"tree_size", "sealed_at"}` while the latest round succeeded; 503 before
/// the first one has, and after a failed one (the sealer is retrying).
async fn ready(State(status): State<Arc<SealerStatus>>) -> Response {
    let snapshot = status.snapshot();
    match snapshot.last_success {
        Some((at, tree_size)) if !snapshot.last_round_failed => axum::Json(serde_json::json!({
            "tree_size": tree_size,
            "sealed_at": at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        }))
        .into_response(),
        Some(_) => Problem::unavailable(1)
            .detail("The latest round of sealing failed; the sealer is retrying (see its log).")
            .into_response(),
        None => Problem::unavailable(1)
            .detail("No round of sealing has succeeded yet.")
            .into_response(),
    }
}

/// The checkpoints in `path`, each signature checked with the public key in `public_key`.
/// `Err` is the exit code, after saying why on stdout (tampered) or stderr (unreadable).
pub fn signed_heads(path: &Path, public_key: Option<&Path>) -> Result<Vec<TreeHead>, ExitCode> {
    let unreadable = |message: String| {
        eprintln!("error: cannot verify against {}: {message}", path.display());
        ExitCode::from(EXIT_UNREADABLE)
    };
    let Some(public_key) = public_key else {
        return Err(unreadable(
            "a checkpoint is checked with its signer's public key: give --public-key FILE".into(),
        ));
    };
    let key = checkpoint::read_verifying_key(public_key).map_err(|e| unreadable(e.to_string()))?;
    let checkpoints = checkpoint::read_checkpoints(path).map_err(|e| unreadable(e.to_string()))?;
    if checkpoints.is_empty() {
        return Err(unreadable("it holds no checkpoint".into()));
    }
    checkpoints
        .iter()
        .map(|c| checkpoint::verify_signature(c, &key))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| match e {
            CheckpointError::BadSignature { .. } => {
                println!("BROKEN: {e}");
                ExitCode::from(EXIT_BROKEN)
            }
            e => unreadable(e.to_string()),
        })
}

/// Checks the log against `heads` and reports; `None` when it matches them all.
pub async fn check_log(pool: &sqlx::PgPool, heads: &[TreeHead]) -> Option<ExitCode> {
    match seal::check_log(pool, heads).await {
        Err(e) => {
            eprintln!("error: cannot check the log against the checkpoints: {e}");
            Some(ExitCode::from(EXIT_UNREADABLE))
        }
        Ok(check) => match check.first_mismatch {
            Some(mismatch) => {
                println!("BROKEN: {mismatch}");
                Some(ExitCode::from(EXIT_BROKEN))
            }
            None => {
                let largest = heads.iter().max_by_key(|h| h.tree_size).expect("at least one");
                println!(
                    "OK: the log matches {} signed checkpoint(s), up to tree size {} (root {})",
                    check.checkpoints_matched,
                    largest.tree_size,
                    hex::encode(largest.root)
                );
                None
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_takes_numbers_with_units_between_a_second_and_a_week() {
        let ok = |text: &str| parse_every(text).unwrap();
        assert_eq!(ok("30s"), Duration::from_secs(30));
        assert_eq!(ok("5m"), Duration::from_secs(300));
        assert_eq!(ok("1h30m"), Duration::from_secs(5400));
        assert_eq!(ok("1500ms"), Duration::from_millis(1500));
        assert_eq!(ok("7d"), EVERY_MAX);
        for bad in ["", "5", "5 m", "m", "5x", "500ms", "8d", "-1s", "99999999999999999999s"] {
            assert!(parse_every(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
