//! `tally audit keygen`, `tally audit seal` and the checkpoint half of `tally audit verify
//! --checkpoint`: signed checkpoints of the log (`tally_event_store::checkpoint`).
//!
//! Sealing is a one-shot command, run periodically by whoever holds the key (cron, a
//! Kubernetes CronJob, an auditor's machine), not a loop inside a service: the key then never
//! sits beside the database credentials of a long-running process, and each run extends the
//! history file from its last line, reading only the events committed since.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use tally_event_store::checkpoint::{self, CheckpointError, TreeHead};
use tally_event_store::seal;

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

/// `tally audit seal`
pub async fn seal(database_url: &str, args: &SealArgs) -> anyhow::Result<()> {
    let key = checkpoint::read_signing_key(&args.key_file)?;
    let previous = checkpoint::read_last(&args.history)?;
    let pool = tally_event_store::connect(database_url, 1)?;
    let started = std::time::Instant::now();
    let sealed = seal::seal(&pool, &key, previous.as_ref()).await?;
    let cp = &sealed.checkpoint;
    if sealed.new_events == 0 && previous.is_some() {
        println!(
            "unchanged: tree size {}, root {} (no new events)",
            cp.tree_size, cp.root
        );
        return Ok(());
    }
    checkpoint::append(&args.history, cp)?;
    if !args.no_publish {
        seal::publish(&pool, cp).await?;
    }
    println!(
        "sealed: tree size {} (+{}), root {}, last event {}.{}, key {}, in {} ms",
        cp.tree_size,
        sealed.new_events,
        cp.root,
        cp.last_tx_id,
        cp.last_position,
        cp.key_id,
        started.elapsed().as_millis()
    );
    Ok(())
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
