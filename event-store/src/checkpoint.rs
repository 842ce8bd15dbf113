//! Signed checkpoints: the commitment to the whole log that the table owner cannot forge.
//!
//! The hash chain ([`crate::verify`]) catches an edited event, but whoever owns `events` can
//! recompute a stream's tail, cut it, delete a stream or insert one into the past, and every
//! chain still checks. A checkpoint is signed outside the database's reach: the Merkle root
//! ([`crate::merkle`]) of the first `tree_size` events in commit order, signed with an Ed25519
//! key the database never holds, appended to a history file an auditor keeps. Any later
//! change to those events changes the root, and nobody without the key can sign a new one.
//!
//! Owns, without touching the database: the signed form (`schemas/CHECKPOINT.md`), signing and
//! checking a signature, the key files (`tally audit keygen`), and the history file (JSON
//! Lines of [`SignedCheckpoint`], oldest first). [`crate::seal`] reads the log.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use rand::TryRngCore;
use sha2::{Digest, Sha256};
pub use tally_schemas::checkpoint::{CHECKPOINT_FORMAT, SignedCheckpoint};

use crate::Checkpoint;
use crate::merkle::{Frontier, Hash};

/// What a checkpoint says about the log, once its signature checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeHead {
    /// Events covered: the first `tree_size` events of the log in commit order.
    pub tree_size: u64,
    pub root: Hash,
    /// The last event covered (`(0, 0)` for the empty tree).
    pub last: Checkpoint,
    /// The exact signed text (RFC 3339, six fractional digits).
    pub created_at: String,
}

/// Why a checkpoint, a history or a key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file is not what it should be (not JSON, a field that is not hex, a short key).
    #[error("{path}: {reason}")]
    Malformed { path: PathBuf, reason: String },
    /// Signed by another key than the one given: nothing can be said about it with this key.
    #[error("the checkpoint at tree size {tree_size} was signed by key {found}, not by the given key {expected}")]
    WrongKey {
        tree_size: u64,
        expected: String,
        found: String,
    },
    /// The signature does not match the signed form: the checkpoint was altered (or forged).
    #[error("the checkpoint at tree size {tree_size} has a bad signature: it was altered or forged")]
    BadSignature { tree_size: u64 },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn malformed(path: &Path, reason: impl Into<String>) -> CheckpointError {
    CheckpointError::Malformed {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// A key's id: lowercase hex of the first 8 bytes of SHA-256 of the public key.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

/// `created_at` as signed: RFC 3339, UTC, six fractional digits (like `recorded_at`).
pub fn format_created_at(at: DateTime<Utc>) -> String {
    crate::hash::format_recorded_at(at)
}

/// The bytes a checkpoint's signature covers (`schemas/CHECKPOINT.md`): every field but the
/// signature and the frontier, each preceded by its length as a u64 big-endian, like the hash
/// chain's form, so no two different heads give the same bytes.
pub fn signed_bytes(head: &TreeHead, key_id: &str) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(160);
    let mut field = |value: &[u8]| {
        bytes.extend_from_slice(&(value.len() as u64).to_be_bytes());
        bytes.extend_from_slice(value);
    };
    field(CHECKPOINT_FORMAT.as_bytes());
    field(&head.tree_size.to_be_bytes());
    field(&head.root);
    field(&head.last.tx_id.to_be_bytes());
    field(&head.last.position.to_be_bytes());
    field(head.created_at.as_bytes());
    field(key_id.as_bytes());
    bytes
}

/// Signs `head`; `frontier` (the tree it was computed from) rides along unsigned, for the next
/// seal.
pub fn sign(head: &TreeHead, frontier: &Frontier, key: &SigningKey) -> SignedCheckpoint {
    assert_eq!(frontier.size(), head.tree_size, "the frontier is the signed tree's");
    let key_id = key_id(&key.verifying_key());
    let signature = key.sign(&signed_bytes(head, &key_id));
    SignedCheckpoint {
        format: CHECKPOINT_FORMAT.into(),
        tree_size: head.tree_size,
        root: hex::encode(head.root),
        last_tx_id: head.last.tx_id,
        last_position: head.last.position,
        created_at: head.created_at.clone(),
        key_id,
        signature: hex::encode(signature.to_bytes()),
        frontier: frontier.nodes().iter().map(hex::encode).collect(),
    }
}

fn hex_array<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N || text.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    hex::decode(text).ok()?.try_into().ok()
}

/// Checks `checkpoint`'s signature with `key` and returns what it says. A checkpoint whose
/// fields are not even well-formed is a bad signature too: nothing in it can be trusted.
pub fn verify_signature(checkpoint: &SignedCheckpoint, key: &VerifyingKey) -> Result<TreeHead, CheckpointError> {
    let expected = key_id(key);
    if checkpoint.key_id != expected {
        return Err(CheckpointError::WrongKey {
            tree_size: checkpoint.tree_size,
            expected,
            found: checkpoint.key_id.clone(),
        });
    }
    let bad = || CheckpointError::BadSignature {
        tree_size: checkpoint.tree_size,
    };
    if checkpoint.format != CHECKPOINT_FORMAT {
        return Err(bad());
    }
    let root = hex_array::<32>(&checkpoint.root).ok_or_else(bad)?;
    let signature = Signature::from_bytes(&hex_array::<64>(&checkpoint.signature).ok_or_else(bad)?);
    let head = TreeHead {
        tree_size: checkpoint.tree_size,
        root,
        last: Checkpoint {
            tx_id: checkpoint.last_tx_id,
            position: checkpoint.last_position,
        },
        created_at: checkpoint.created_at.clone(),
    };
    key.verify(&signed_bytes(&head, &checkpoint.key_id), &signature)
        .map_err(|_| bad())?;
    Ok(head)
}

/// The frontier stored with a checkpoint, if it gives the checkpoint's root: the only way the
/// sealer may take it up again.
pub fn stored_frontier(checkpoint: &SignedCheckpoint, head: &TreeHead) -> Option<Frontier> {
    let nodes = checkpoint
        .frontier
        .iter()
        .map(|n| hex_array::<32>(n))
        .collect::<Option<Vec<_>>>()?;
    let frontier = Frontier::from_parts(head.tree_size, nodes)?;
    (frontier.root() == head.root).then_some(frontier)
}

/// A new signing key from the operating system's random source.
pub fn generate_key() -> SigningKey {
    let mut seed = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut seed)
        .expect("the operating system's random source works");
    SigningKey::from_bytes(&seed)
}

/// The public key file written beside a private key file: `<path>.pub`.
pub fn public_key_path(private: &Path) -> PathBuf {
    let mut name = private.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

/// Writes `key` to `path` (hex of the 32-byte secret, readable by its owner only) and its
/// public key to `<path>.pub` (hex of 32 bytes). Refuses to overwrite a key: a lost key
/// cannot sign on, and every checkpoint it signed stays checkable with its `.pub`.
pub fn write_key_files(path: &Path, key: &SigningKey) -> Result<PathBuf, CheckpointError> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(io(path))?;
    writeln!(file, "{}", hex::encode(key.to_bytes())).map_err(io(path))?;
    file.sync_all().map_err(io(path))?;
    let public = public_key_path(path);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&public)
        .map_err(io(&public))?;
    writeln!(file, "{}", hex::encode(key.verifying_key().as_bytes())).map_err(io(&public))?;
    file.sync_all().map_err(io(&public))?;
    Ok(public)
}

fn read_hex_key(path: &Path) -> Result<[u8; 32], CheckpointError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    hex_array::<32>(text.trim()).ok_or_else(|| malformed(path, "not a key: expected 64 lowercase hex digits"))
}

/// The signing key in `path` (as [`write_key_files`] writes it).
pub fn read_signing_key(path: &Path) -> Result<SigningKey, CheckpointError> {
    Ok(SigningKey::from_bytes(&read_hex_key(path)?))
}

/// The public key in `path` (a `.pub` file).
pub fn read_verifying_key(path: &Path) -> Result<VerifyingKey, CheckpointError> {
    VerifyingKey::from_bytes(&read_hex_key(path)?)
        .map_err(|e| malformed(path, format!("not an Ed25519 public key: {e}")))
}

/// Every checkpoint in `path`: a history file (one JSON object a line, oldest first) or a
/// single checkpoint (one JSON object, pretty-printed or not). A missing file is an error; an
/// empty one holds no checkpoint.
pub fn read_checkpoints(path: &Path) -> Result<Vec<SignedCheckpoint>, CheckpointError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let mut lines = Vec::new();
    let mut by_lines = Ok(());
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        match serde_json::from_str::<SignedCheckpoint>(line) {
            Ok(checkpoint) => lines.push(checkpoint),
            Err(e) => {
                by_lines = Err(format!("line {}: {e}", n + 1));
                break;
            }
        }
    }
    match by_lines {
        Ok(()) => Ok(lines),
        Err(reason) => serde_json::from_str::<SignedCheckpoint>(&text)
            .map(|one| vec![one])
            .map_err(|_| malformed(path, format!("not a checkpoint or a history of them: {reason}"))),
    }
}

/// The last checkpoint of a history file, `None` when the file does not exist yet or is empty.
/// Reads the file from its end, a block at a time, up to the start of its last line: a seal
/// every minute for years makes a long history, and each round needs only its last line.
pub fn read_last(path: &Path) -> Result<Option<SignedCheckpoint>, CheckpointError> {
    use std::io::{Read, Seek, SeekFrom};
    const BLOCK_BYTES: u64 = 8 * 1024;
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(path)(e)),
    };
    let len = file.seek(SeekFrom::End(0)).map_err(io(path))?;
    // The bytes from `start` to the end of the file, grown backwards until they hold a whole
    // non-blank last line (or the whole file).
    let mut tail: Vec<u8> = Vec::new();
    let mut start = len;
    let line = loop {
        let text_end = tail.iter().rposition(|b| !b.is_ascii_whitespace());
        if let Some(end) = text_end
            && let Some(newline) = tail[..end].iter().rposition(|&b| b == b'\n')
        {
            break tail[newline + 1..=end].to_vec();
        }
        if start == 0 {
            match text_end {
                Some(end) => break tail[..=end].to_vec(),
                None => return Ok(None),
            }
        }
        let block = BLOCK_BYTES.min(start);
        start -= block;
        file.seek(SeekFrom::Start(start)).map_err(io(path))?;
        let mut chunk = vec![0; block as usize];
        file.read_exact(&mut chunk).map_err(io(path))?;
        chunk.extend_from_slice(&tail);
        tail = chunk;
    };
    serde_json::from_slice::<SignedCheckpoint>(&line)
        .map(Some)
        .map_err(|e| malformed(path, format!("its last line: {e}")))
}

/// Appends `checkpoint` as one line to the history file at `path` (created if missing) and
/// syncs it to disk before returning: a seal reported done is on disk.
pub fn append(path: &Path, checkpoint: &SignedCheckpoint) -> Result<(), CheckpointError> {
    let mut line = serde_json::to_string(checkpoint).expect("a checkpoint always serializes");
    line.push('\n');
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io(path))?;
    file.write_all(line.as_bytes()).map_err(io(path))?;
    file.sync_all().map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merkle::event_leaf_hash;

    fn sealed(key: &SigningKey, leaves: u8) -> (SignedCheckpoint, TreeHead) {
        let mut frontier = Frontier::new();
        for i in 0..leaves {
            frontier.push(event_leaf_hash(1, i64::from(i) + 1, &[i; 32]));
        }
        let head = TreeHead {
            tree_size: frontier.size(),
            root: frontier.root(),
            last: Checkpoint {
                tx_id: 1,
                position: i64::from(leaves),
            },
            created_at: "2026-12-05T06:00:00.123456Z".into(),
        };
        (sign(&head, &frontier, key), head)
    }

    #[test]
    fn a_signed_checkpoint_verifies_with_its_key_and_gives_back_its_head_and_frontier() {
        let key = generate_key();
        let (checkpoint, head) = sealed(&key, 5);

        let checked = verify_signature(&checkpoint, &key.verifying_key()).unwrap();

        assert_eq!(checked, head);
        assert_eq!(stored_frontier(&checkpoint, &checked).unwrap().root(), head.root);
    }

    #[test]
    fn any_change_to_a_signed_field_is_a_bad_signature() {
        let key = generate_key();
        let (checkpoint, _) = sealed(&key, 5);
        let edits: [fn(&mut SignedCheckpoint); 6] = [
            |c| c.tree_size += 1,
            |c| c.root = "11".repeat(32),
            |c| c.last_tx_id += 1,
            |c| c.last_position -= 1,
            |c| c.created_at = "2026-12-05T06:00:01.123456Z".into(),
            |c| c.root = c.root.to_uppercase(),
        ];
        for edit in edits {
            let mut altered = checkpoint.clone();
            edit(&mut altered);
            assert!(
                matches!(
                    verify_signature(&altered, &key.verifying_key()),
                    Err(CheckpointError::BadSignature { .. })
                ),
                "{altered:?}"
            );
        }
    }

    #[test]
    fn another_key_is_named_not_trusted() {
        let (checkpoint, _) = sealed(&generate_key(), 2);
        let other = generate_key();

        let err = verify_signature(&checkpoint, &other.verifying_key()).unwrap_err();

        assert!(matches!(err, CheckpointError::WrongKey { .. }), "{err}");
    }

    #[test]
    fn a_frontier_that_does_not_give_the_signed_root_is_not_taken_up() {
        let key = generate_key();
        let (mut checkpoint, head) = sealed(&key, 5);
        checkpoint.frontier[0] = "22".repeat(32);

        assert_eq!(stored_frontier(&checkpoint, &head), None);
    }

    #[test]
    fn key_files_and_a_history_round_trip_and_a_key_is_never_overwritten() {
        let dir = std::env::temp_dir().join(format!("tally-checkpoint-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let key_path = dir.join("seal.key");
        let key = generate_key();
        let public = write_key_files(&key_path, &key).unwrap();
        assert_eq!(read_signing_key(&key_path).unwrap().to_bytes(), key.to_bytes());
        assert_eq!(read_verifying_key(&public).unwrap(), key.verifying_key());
        assert!(write_key_files(&key_path, &generate_key()).is_err());

        let history = dir.join("history.jsonl");
        assert_eq!(read_last(&history).unwrap(), None);
        let (first, _) = sealed(&key, 3);
        let (second, _) = sealed(&key, 4);
        append(&history, &first).unwrap();
        append(&history, &second).unwrap();
        assert_eq!(read_checkpoints(&history).unwrap(), vec![first.clone(), second.clone()]);
        assert_eq!(read_last(&history).unwrap(), Some(second.clone()));
        // A last line longer than a read block, and blank lines after it, are read whole.
        let mut long = second.clone();
        long.created_at = format!("{}{}", long.created_at, " ".repeat(20_000));
        let mut text = std::fs::read_to_string(&history).unwrap();
        text.push_str(&serde_json::to_string(&long).unwrap());
        text.push_str("\n\n  \n");
        std::fs::write(&history, text).unwrap();
        assert_eq!(read_last(&history).unwrap(), Some(long));
        std::fs::write(&history, "\n \n").unwrap();
        assert_eq!(read_last(&history).unwrap(), None);
        std::fs::write(&history, "{not json").unwrap();
        assert!(matches!(read_last(&history), Err(CheckpointError::Malformed { .. })));
        std::fs::remove_file(&history).unwrap();
        append(&history, &first).unwrap();
        append(&history, &second).unwrap();

        let single = dir.join("one.json");
        std::fs::write(&single, serde_json::to_string_pretty(&first).unwrap()).unwrap();
        assert_eq!(read_checkpoints(&single).unwrap(), vec![first]);
        std::fs::write(&single, "not json").unwrap();
        assert!(matches!(
            read_checkpoints(&single),
            Err(CheckpointError::Malformed { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
