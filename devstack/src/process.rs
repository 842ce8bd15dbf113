//! Child-process plumbing shared by the Postgres and NATS launchers: running
//! one-shot tools with a deadline, waiting for a server to become ready,
//! retrying when a port is stolen, orderly shutdown, log tails and the
//! root-folder rules.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::sys::{self, Account};

/// How often a starting server is probed for readiness.
pub(crate) const READY_POLL_INTERVAL_MS: u64 = 100;
/// How long a server may take to accept connections before we give up.
pub const READY_TIMEOUT_MS: u64 = 60_000;
/// How long a server gets to exit after its graceful-shutdown signal before SIGKILL.
pub const SHUTDOWN_TIMEOUT_MS: u64 = 10_000;
/// How often an exiting child is checked while we wait for it.
const EXIT_POLL_INTERVAL_MS: u64 = 20;
/// How many log lines an error message quotes.
pub(crate) const LOG_TAIL_LINES: usize = 30;
/// How many ports are tried before a "port already in use" failure is final.
pub(crate) const PORT_ATTEMPTS: usize = 3;
/// Mode of the root folder and of any parents we create: others (the
/// `postgres` user) must be able to traverse them.
const ROOT_DIR_MODE: u32 = 0o755;
/// What servers print when their listening port was taken in the meantime
/// (Postgres: "could not bind ...: Address already in use"; Go: "bind:
/// address already in use"). Compared case-insensitively.
const PORT_IN_USE_MARKER: &str = "address already in use";

/// Runs a one-shot tool to completion with stdout and stderr in `log`, killing
/// it (and anything it forked) if it exceeds `timeout`.
pub(crate) fn run_logged(mut command: Command, log: &Path, timeout: Duration, what: &str) -> Result<()> {
    let log_file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let output = Output::open(log)?;
    command
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    let mut child = sys::spawn(command).with_context(|| format!("spawning {what}"))?;
    match wait_timeout(&mut child, timeout)? {
        Some(status) if status.success() => Ok(()),
        Some(status) => bail!("{what} failed ({status}); {}", output.describe(0, what)),
        None => {
            kill_group_and_reap(&mut child);
            bail!(
                "{what} did not finish within {} s; {}",
                timeout.as_secs(),
                output.describe(0, what)
            )
        }
    }
}

/// A child's log file, also held open for reading: what the child wrote can be quoted even
/// when the file is deleted while it runs (its folder removed by another process), which
/// otherwise reads as an empty log and hides both the child's own error and the cause.
pub(crate) struct Output {
    path: PathBuf,
    reader: File,
}

impl Output {
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let reader = File::open(path).with_context(|| format!("opening {} to read it back", path.display()))?;
        Ok(Self {
            path: path.to_owned(),
            reader,
        })
    }

    /// The log from byte `offset`, lossily decoded.
    fn read(&self, offset: u64) -> String {
        let mut bytes = Vec::new();
        let mut chunk = vec![0; 64 * 1024];
        let mut at = offset;
        while let Ok(n) = self.reader.read_at(&mut chunk, at) {
            if n == 0 {
                break;
            }
            bytes.extend_from_slice(&chunk[..n]);
            at += n as u64;
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// "last N lines of LOG:\n..." for error messages, reading from byte `offset`; says so
    /// when the log (and so its folder) was deleted while `what` ran.
    pub(crate) fn describe(&self, offset: u64, what: &str) -> String {
        let text = self.read(offset);
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
        let said = if tail.is_empty() {
            format!("{} is empty", self.path.display())
        } else {
            format!(
                "last {} lines of {}:\n{}",
                tail.len(),
                self.path.display(),
                tail.join("\n")
            )
        };
        if self.path.exists() {
            return said;
        }
        let folder = self.path.parent().unwrap_or(&self.path);
        format!(
            "{} was deleted while {what} ran: another process removed {} (is a second run \
             using the same folder, e.g. the same target directory?); {said}",
            self.path.display(),
            existing_ancestor_note(folder),
        )
    }
}

/// `folder` and, when it is gone, the nearest ancestor that still exists.
fn existing_ancestor_note(folder: &Path) -> String {
    match folder.ancestors().find(|dir| dir.exists()) {
        Some(kept) if kept != folder => format!("{} (only {} is left)", folder.display(), kept.display()),
        _ => folder.display().to_string(),
    }
}

/// Polls `child` until it exits or `timeout` passes; `None` means it is still running.
pub(crate) fn wait_timeout(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().context("waiting for child process")? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(EXIT_POLL_INTERVAL_MS));
    }
}

/// Asks `child` to exit with `signal`, waits up to [`SHUTDOWN_TIMEOUT_MS`],
/// then SIGKILLs its whole process group. Always reaps the child.
pub(crate) fn shutdown(child: &mut Child, signal: libc::c_int) {
    // Only signal a child we have not reaped yet: until it is reaped its pid
    // cannot be reused, so the signal cannot hit a stranger.
    if !matches!(child.try_wait(), Ok(None)) {
        return;
    }
    let _ = sys::signal_process(child.id(), signal);
    if matches!(
        wait_timeout(child, Duration::from_millis(SHUTDOWN_TIMEOUT_MS)),
        Ok(Some(_))
    ) {
        return;
    }
    kill_group_and_reap(child);
}

/// SIGKILLs the child's process group (the child leads it) and reaps the child.
pub(crate) fn kill_group_and_reap(child: &mut Child) {
    if matches!(child.try_wait(), Ok(None)) {
        let _ = sys::signal_group(child.id(), sys::SIGKILL);
        // Fall back to the single process in case the group is already gone.
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// Why a server launch attempt failed.
pub(crate) enum LaunchError {
    /// The server exited saying its port was taken: worth retrying on another port.
    PortInUse(anyhow::Error),
    Fatal(anyhow::Error),
}

impl From<anyhow::Error> for LaunchError {
    fn from(error: anyhow::Error) -> Self {
        LaunchError::Fatal(error)
    }
}

/// Launches a long-running server and waits until `ready(ports)` says it
/// accepts connections, retrying up to [`PORT_ATTEMPTS`] times with the
/// ports from `choose_ports` when the server reports its port was taken
/// between our probe and its bind.
///
/// `launch` gets the ports and the log file to use as stdout/stderr. The log
/// is appended to, so earlier attempts and earlier runs stay readable.
pub(crate) fn start_server<P: Copy + std::fmt::Debug>(
    what: &str,
    log: &Path,
    mut choose_ports: impl FnMut() -> Result<P>,
    mut launch: impl FnMut(P, File) -> Result<Child>,
    mut ready: impl FnMut(P) -> bool,
) -> Result<(Child, P)> {
    let mut last_error = None;
    for attempt in 1..=PORT_ATTEMPTS {
        let ports = choose_ports()?;
        let log_file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let log_offset = log_file.metadata()?.len();
        let output = Output::open(log)?;
        let mut child = launch(ports, log_file).with_context(|| format!("spawning {what}"))?;
        match wait_ready(&mut child, what, &output, log_offset, || ready(ports)) {
            Ok(()) => return Ok((child, ports)),
            Err(LaunchError::PortInUse(error)) => {
                kill_group_and_reap(&mut child);
                last_error = Some(error.context(format!(
                    "{what}: port {ports:?} was taken (attempt {attempt} of {PORT_ATTEMPTS})"
                )));
            }
            Err(LaunchError::Fatal(error)) => {
                kill_group_and_reap(&mut child);
                return Err(error);
            }
        }
    }
    Err(last_error.unwrap_or_else(|| anyhow!("{what}: no launch attempt was made")))
}

/// Polls every [`READY_POLL_INTERVAL_MS`] until `ready()` holds, the child
/// exits, or [`READY_TIMEOUT_MS`] passes.
fn wait_ready(
    child: &mut Child,
    what: &str,
    output: &Output,
    log_offset: u64,
    mut ready: impl FnMut() -> bool,
) -> Result<(), LaunchError> {
    let deadline = Instant::now() + Duration::from_millis(READY_TIMEOUT_MS);
    loop {
        if let Some(status) = child.try_wait().context("waiting for server process")? {
            let error = anyhow!(
                "{what} exited during startup ({status}); {}",
                output.describe(log_offset, what)
            );
            let printed = output.read(log_offset).to_ascii_lowercase();
            return Err(if printed.contains(PORT_IN_USE_MARKER) {
                LaunchError::PortInUse(error)
            } else {
                LaunchError::Fatal(error)
            });
        }
        if ready() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(LaunchError::Fatal(anyhow!(
                "{what} did not accept connections within {} s; {}",
                READY_TIMEOUT_MS / 1000,
                output.describe(log_offset, what)
            )));
        }
        thread::sleep(Duration::from_millis(READY_POLL_INTERVAL_MS));
    }
}

/// Makes `root` an absolute, empty folder with mode 0755, creating it and any
/// missing parents (also 0755, whatever the umask).
///
/// A root that already has something in it is refused: the stack deletes its
/// root when it stops, so it must never adopt a folder with someone's files.
pub(crate) fn prepare_root(root: &Path) -> Result<PathBuf> {
    let root = std::path::absolute(root).with_context(|| format!("resolving devstack root {}", root.display()))?;
    if root.exists() {
        let mut entries = fs::read_dir(&root)
            .with_context(|| format!("devstack root {} is not a readable folder", root.display()))?;
        if entries.next().is_some() {
            bail!(
                "devstack root {} already exists and is not empty; pass a fresh folder \
                 (it is deleted when the service stops)",
                root.display()
            );
        }
    } else {
        let missing: Vec<&Path> = root.ancestors().take_while(|dir| !dir.exists()).collect();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(ROOT_DIR_MODE)
            .create(&root)
            .with_context(|| format!("creating devstack root {}", root.display()))?;
        for dir in missing {
            set_mode(dir, ROOT_DIR_MODE)?;
        }
    }
    set_mode(&root, ROOT_DIR_MODE)?;
    Ok(root)
}

/// Checks that `account` can traverse every folder from `/` down to `dir`,
/// since the server runs as that user and must reach its data folder.
pub(crate) fn check_traversable(dir: &Path, account: Account, user: &str) -> Result<()> {
    for folder in dir.ancestors() {
        let meta = fs::metadata(folder).with_context(|| format!("inspecting {}", folder.display()))?;
        let mode = meta.mode();
        let traversable = mode & 0o001 != 0
            || (meta.uid() == account.uid && mode & 0o100 != 0)
            || (meta.gid() == account.gid && mode & 0o010 != 0);
        if !traversable {
            bail!(
                "{} (mode {:o}) cannot be traversed by the `{user}` user that PostgreSQL runs as \
                 (it refuses to run as root); run `chmod o+x {}` or use a root folder under \
                 std::env::temp_dir()",
                folder.display(),
                mode & 0o7777,
                folder.display()
            );
        }
    }
    Ok(())
}

/// Creates a private data folder (0700, as PostgreSQL demands) owned by `owner`.
pub(crate) fn create_data_dir(dir: &Path, owner: Option<Account>) -> Result<()> {
    const DATA_DIR_MODE: u32 = 0o700;
    fs::DirBuilder::new()
        .mode(DATA_DIR_MODE)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    set_mode(dir, DATA_DIR_MODE)?;
    if let Some(account) = owner {
        std::os::unix::fs::chown(dir, Some(account.uid), Some(account.gid))
            .with_context(|| format!("chown {} to uid {}", dir.display(), account.uid))?;
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

/// Deletes a stack's root folder; failures are reported on stderr because
/// this runs from `Drop`, where there is no caller to return them to.
pub(crate) fn remove_root(root: &Path) {
    if let Err(error) = fs::remove_dir_all(root)
        && error.kind() != std::io::ErrorKind::NotFound
    {
        eprintln!("tally-devstack: could not remove {}: {error}", root.display());
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, TcpListener, TcpStream};

    use super::*;
    use crate::free_port;

    #[test]
    fn a_server_whose_port_was_taken_is_started_again_on_a_fresh_port() {
        let squatter = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let taken = squatter.local_addr().unwrap().port();
        let root =
            prepare_root(&std::env::temp_dir().join(format!("tally-devstack-unit-port-retry-{}", std::process::id())))
                .unwrap();
        let binary = crate::binaries::nats_server().unwrap();

        let mut attempts = 0;
        let (mut child, port) = start_server(
            "nats-server",
            &root.join("nats.log"),
            || {
                attempts += 1;
                Ok(if attempts == 1 { taken } else { free_port()? })
            },
            |port, log| {
                let mut command = Command::new(&binary);
                command
                    .args(["-a", "127.0.0.1", "-p", &port.to_string()])
                    .stdout(log.try_clone()?)
                    .stderr(log);
                Ok(sys::spawn(command)?)
            },
            |port| TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok() && port != taken,
        )
        .unwrap();

        assert_eq!(attempts, 2);
        assert_ne!(port, taken);
        shutdown(&mut child, sys::SIGTERM);
        remove_root(&root);
    }

    #[test]
    fn a_tool_whose_folder_is_deleted_while_it_runs_is_reported_with_what_it_printed() {
        let dir =
            prepare_root(&std::env::temp_dir().join(format!("tally-devstack-unit-deleted-{}", std::process::id())))
                .unwrap();
        let log = dir.join("tool.log");
        let mut command = Command::new("sh");
        command.args(["-c", "echo could not write the data folder >&2; sleep 0.5; exit 1"]);
        let remover = {
            let dir = dir.clone();
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(200));
                fs::remove_dir_all(&dir).unwrap();
            })
        };
        let error = run_logged(command, &log, Duration::from_secs(10), "tool")
            .unwrap_err()
            .to_string();
        remover.join().unwrap();
        assert!(error.contains("was deleted while tool ran"), "{error}");
        assert!(error.contains("could not write the data folder"), "{error}");
    }

    #[test]
    fn a_folder_others_cannot_traverse_is_reported_with_a_fix() {
        let dir = std::env::temp_dir().join(format!("tally-devstack-unit-private-{}", std::process::id()));
        fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        set_mode(&dir, 0o700).unwrap();
        let stranger = Account {
            uid: 4_000_000,
            gid: 4_000_000,
        };
        let error = check_traversable(&dir, stranger, "postgres").unwrap_err().to_string();
        fs::remove_dir(&dir).unwrap();
        assert!(error.contains("chmod o+x"), "{error}");
        assert!(error.contains(&dir.display().to_string()), "{error}");
    }
}
