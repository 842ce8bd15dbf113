//! An ephemeral PostgreSQL primary with an optional streaming hot standby.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::binaries::{self, PostgresBinaries};
use crate::free_port;
use crate::process;
use crate::sys::{self, Account};

/// The system user PostgreSQL runs as when we are root (it refuses to run as root).
pub(crate) const POSTGRES_USER: &str = "postgres";
/// Superuser created by initdb; every URL and tool connects as it.
pub(crate) const SUPERUSER: &str = "postgres";
/// Database pg_isready probes.
const PROBE_DATABASE: &str = "postgres";
/// initdb on a slow disk with fsync on can take a while.
const INITDB_TIMEOUT_MS: u64 = 120_000;
/// A base backup of a fresh cluster is small; this bounds a hung primary.
const BASEBACKUP_TIMEOUT_MS: u64 = 120_000;
/// Connection timeout of a single pg_isready probe (whole seconds, its unit).
const PG_ISREADY_TIMEOUT_S: u32 = 2;
/// Physical slot the replica streams from, so the primary keeps the WAL it
/// still needs even if a checkpoint happens before the replica connects.
const REPLICA_SLOT: &str = "tally_devstack_replica";

/// How to start the cluster.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PgOptions {
    /// Also start a streaming hot standby of the primary.
    pub replica: bool,
    /// `false` turns off fsync, synchronous_commit and full_page_writes, which
    /// makes tests much faster and a crash lose data; use `true` for benchmarks.
    pub durable: bool,
}

/// A running PostgreSQL primary (and replica, if asked for) in its own root
/// folder; stopped and deleted by [`Postgres::stop`] or on drop.
#[derive(Debug)]
pub struct Postgres {
    root: PathBuf,
    primary: Option<Child>,
    replica: Option<Child>,
    primary_port: u16,
    replica_port: Option<u16>,
}

/// What is needed to run a PostgreSQL program against one root folder.
struct Launcher {
    binaries: &'static PostgresBinaries,
    root: PathBuf,
    /// The account to drop to, when we are root.
    account: Option<Account>,
}

impl Postgres {
    /// Creates `root` (and parents), runs initdb in `root/primary`, starts it,
    /// and if `opts.replica` takes `pg_basebackup -R -X stream` into
    /// `root/replica` and starts a hot standby.
    ///
    /// `root` must not exist or be empty: it is deleted when the cluster stops.
    pub fn start(root: &Path, opts: PgOptions) -> Result<Postgres> {
        let binaries = binaries::postgres()?;
        let account = if sys::is_root() {
            let account = sys::lookup_user(POSTGRES_USER)
                .context("looking up the postgres user")?
                .with_context(|| {
                    format!(
                        "running as root, but there is no `{POSTGRES_USER}` system user to run \
                         PostgreSQL as (it refuses to run as root); install the Debian package \
                         `postgresql`, which creates it"
                    )
                })?;
            Some(account)
        } else {
            None
        };
        let root = process::prepare_root(root)?;
        // From here on, dropping `cluster` on an error stops whatever runs and
        // deletes the root.
        let mut cluster = Postgres {
            root: root.clone(),
            primary: None,
            replica: None,
            primary_port: 0,
            replica_port: None,
        };
        if let Some(account) = account {
            process::check_traversable(&root, account, POSTGRES_USER)?;
        }
        let launcher = Launcher {
            binaries,
            root,
            account,
        };

        let primary_dir = launcher.root.join("primary");
        launcher.initdb(&primary_dir, opts)?;
        let (child, port) = launcher.start_server("postgres primary", &primary_dir, "primary.log")?;
        cluster.primary = Some(child);
        cluster.primary_port = port;

        if opts.replica {
            let replica_dir = launcher.root.join("replica");
            launcher.base_backup(&replica_dir, port)?;
            let (child, port) = launcher.start_server("postgres replica", &replica_dir, "replica.log")?;
            cluster.replica = Some(child);
            cluster.replica_port = Some(port);
        }
        Ok(cluster)
    }

    pub fn primary_port(&self) -> u16 {
        self.primary_port
    }

    pub fn replica_port(&self) -> Option<u16> {
        self.replica_port
    }

    /// `postgres://postgres@127.0.0.1:PORT/DATABASE` for the primary.
    pub fn primary_url(&self, database: &str) -> String {
        url(self.primary_port, database)
    }

    /// Like [`Postgres::primary_url`] for the replica, if one was started.
    pub fn replica_url(&self, database: &str) -> Option<String> {
        self.replica_port.map(|port| url(port, database))
    }

    /// The folder holding the data folders and logs (deleted on stop).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Fast shutdown (SIGINT) of the replica, then the primary, each given
    /// [`crate::SHUTDOWN_TIMEOUT_MS`] before SIGKILL; then deletes the root.
    pub fn stop(mut self) {
        self.shutdown();
    }

    /// Idempotent body of [`Postgres::stop`], shared with `Drop`.
    fn shutdown(&mut self) {
        // Replica first: a primary in fast shutdown waits for its WAL senders
        // to deliver the final WAL to connected standbys.
        for mut child in [self.replica.take(), self.primary.take()].into_iter().flatten() {
            process::shutdown(&mut child, sys::SIGINT);
        }
        if !self.root.as_os_str().is_empty() {
            process::remove_root(&self.root);
            self.root = PathBuf::new();
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn url(port: u16, database: &str) -> String {
    format!("postgres://{SUPERUSER}@127.0.0.1:{port}/{database}")
}

/// `url` (`postgres://USER@HOST/DB`, no password: these servers trust loopback) with `user`
/// as its user: how a service connects as its own role.
pub fn with_user(url: &str, user: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a postgres:// URL");
    let host = rest.split_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{user}@{host}")
}

impl Launcher {
    /// A command for a PostgreSQL program, run as the postgres user when we
    /// are root, from the root folder (our own cwd may not be readable by
    /// that user) and without any PG* variables of ours steering it.
    fn command(&self, program: &Path) -> Command {
        let mut command = Command::new(program);
        command
            .current_dir(&self.root)
            .env("HOME", &self.root)
            .stdin(Stdio::null());
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("PG") {
                command.env_remove(name);
            }
        }
        if let Some(account) = self.account {
            command.uid(account.uid).gid(account.gid);
        }
        command
    }

    /// initdb into a fresh `dir`, then our settings and pg_hba.conf.
    fn initdb(&self, dir: &Path, opts: PgOptions) -> Result<()> {
        process::create_data_dir(dir, self.account)?;
        let mut command = self.command(&self.binaries.initdb);
        command
            .arg("-D")
            .arg(dir)
            .args(["-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--locale=C"]);
        if !opts.durable {
            // Skips flushing the new cluster to disk: seconds per test.
            command.arg("--no-sync");
        }
        process::run_logged(
            command,
            &self.root.join("initdb.log"),
            Duration::from_millis(INITDB_TIMEOUT_MS),
            "initdb",
        )?;

        // Both files exist (owned by postgres); appending/truncating keeps the owner.
        let mut conf = OpenOptions::new()
            .append(true)
            .open(dir.join("postgresql.conf"))
            .context("opening postgresql.conf")?;
        conf.write_all(settings(opts).as_bytes())
            .context("writing postgresql.conf")?;
        let mut hba = File::create(dir.join("pg_hba.conf")).context("opening pg_hba.conf")?;
        hba.write_all(PG_HBA.as_bytes()).context("writing pg_hba.conf")?;
        Ok(())
    }

    /// Clones the primary into `dir` as a standby (-R writes standby.signal
    /// and primary_conninfo; -C/-S create and use a replication slot).
    fn base_backup(&self, dir: &Path, primary_port: u16) -> Result<()> {
        // We create it: the postgres user cannot create folders in the root.
        process::create_data_dir(dir, self.account)?;
        let mut command = self.command(&self.binaries.pg_basebackup);
        command
            .args(["-h", "127.0.0.1", "-p", &primary_port.to_string(), "-U", SUPERUSER])
            .arg("-D")
            .arg(dir)
            .args(["-R", "-X", "stream", "-c", "fast", "-C", "-S", REPLICA_SLOT, "-w"]);
        process::run_logged(
            command,
            &self.root.join("basebackup.log"),
            Duration::from_millis(BASEBACKUP_TIMEOUT_MS),
            "pg_basebackup",
        )
    }

    /// Starts `postgres -D dir -p PORT` on a free port (retried if the port
    /// is stolen) and waits until pg_isready reports it accepts connections.
    ///
    /// The port is given on the command line rather than in postgresql.conf:
    /// a retry then needs no config rewrite, and the replica, whose config is
    /// copied from the primary, needs a different port anyway.
    fn start_server(&self, what: &str, dir: &Path, log_name: &str) -> Result<(Child, u16)> {
        process::start_server(
            what,
            &self.root.join(log_name),
            free_port,
            |port, log| {
                let mut command = self.command(&self.binaries.postgres);
                command
                    .arg("-D")
                    .arg(dir)
                    .args(["-p", &port.to_string()])
                    .stdout(log.try_clone()?)
                    .stderr(log);
                Ok(sys::spawn(command)?)
            },
            |port| self.is_ready(port),
        )
    }

    /// True when `pg_isready` says the server accepts connections (a standby
    /// answers "rejecting" until it reaches a consistent state).
    fn is_ready(&self, port: u16) -> bool {
        let mut command = self.command(&self.binaries.pg_isready);
        command
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", SUPERUSER])
            .args(["-d", PROBE_DATABASE, "-q", "-t", &PG_ISREADY_TIMEOUT_S.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        match sys::spawn(command) {
            Ok(mut child) => child.wait().is_ok_and(|status| status.success()),
            Err(_) => false,
        }
    }
}

/// Appended to postgresql.conf; the replica inherits it through the base backup.
fn settings(opts: PgOptions) -> String {
    let mut settings = String::from(
        "\n# --- tally-devstack ---\n\
         listen_addresses = '127.0.0.1'\n\
         # No unix sockets: socket paths under a deep temp folder can exceed 107 bytes.\n\
         unix_socket_directories = ''\n\
         max_connections = 400\n\
         shared_buffers = 256MB\n\
         wal_level = replica\n\
         max_wal_senders = 10\n\
         hot_standby = on\n\
         # stderr is redirected into ROOT/primary.log or ROOT/replica.log.\n\
         log_destination = 'stderr'\n\
         logging_collector = off\n",
    );
    if !opts.durable {
        settings.push_str(
            "# Ephemeral test cluster: speed over crash safety.\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n",
        );
    }
    settings
}

/// Replaces initdb's pg_hba.conf: trust everyone, but only over loopback TCP.
const PG_HBA: &str = "\
# tally-devstack: ephemeral cluster, loopback only.
host all all 127.0.0.1/32 trust
host replication all 127.0.0.1/32 trust
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_settings_turn_off_durability_and_durable_settings_do_not() {
        let fast = settings(PgOptions {
            replica: false,
            durable: false,
        });
        assert!(fast.contains("fsync = off"));
        let durable = settings(PgOptions {
            replica: false,
            durable: true,
        });
        assert!(!durable.contains("fsync"));
        assert!(durable.contains("unix_socket_directories = ''"));
    }

    #[test]
    fn urls_name_the_superuser_the_loopback_address_and_the_database() {
        assert_eq!(url(5555, "tally"), "postgres://postgres@127.0.0.1:5555/tally");
    }
}
