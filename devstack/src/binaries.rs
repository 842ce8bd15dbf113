//! Locating the installed server binaries, installing the Debian package when
//! they are missing and we are allowed to (root with apt-get).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use anyhow::{Context, Result, bail};

use crate::sys;

/// Where Debian installs one folder of server binaries per major version.
const DEBIAN_POSTGRES_ROOT: &str = "/usr/lib/postgresql";
/// Binaries the Postgres launcher runs; a bin folder must hold all of them.
const POSTGRES_TOOLS: [&str; 4] = ["initdb", "postgres", "pg_basebackup", "pg_isready"];
const POSTGRES_PACKAGE: &str = "postgresql";
const NATS_BINARY: &str = "nats-server";
const NATS_PACKAGE: &str = "nats-server";
/// Folders searched in addition to PATH: a non-root PATH often lacks sbin,
/// which is where Debian puts nats-server.
const EXTRA_BIN_DIRS: [&str; 3] = ["/usr/sbin", "/usr/bin", "/usr/local/bin"];

/// Absolute paths of the PostgreSQL programs we run.
#[derive(Debug, Clone)]
pub(crate) struct PostgresBinaries {
    pub(crate) initdb: PathBuf,
    pub(crate) postgres: PathBuf,
    pub(crate) pg_basebackup: PathBuf,
    pub(crate) pg_isready: PathBuf,
}

/// Finds (or installs) the PostgreSQL server binaries; the answer is cached.
pub(crate) fn postgres() -> Result<&'static PostgresBinaries> {
    static FOUND: OnceLock<PostgresBinaries> = OnceLock::new();
    if let Some(found) = FOUND.get() {
        return Ok(found);
    }
    let dir = match find_postgres_bin_dir() {
        Some(dir) => dir,
        None => {
            install_package(
                POSTGRES_PACKAGE,
                "PostgreSQL server binaries (initdb, postgres, pg_basebackup, pg_isready)",
            )?;
            find_postgres_bin_dir().with_context(|| {
                format!(
                    "installed `{POSTGRES_PACKAGE}` but still found no PostgreSQL bin folder \
                     under {DEBIAN_POSTGRES_ROOT}"
                )
            })?
        }
    };
    Ok(FOUND.get_or_init(|| PostgresBinaries {
        initdb: dir.join("initdb"),
        postgres: dir.join("postgres"),
        pg_basebackup: dir.join("pg_basebackup"),
        pg_isready: dir.join("pg_isready"),
    }))
}

/// Finds (or installs) nats-server; the answer is cached.
pub(crate) fn nats_server() -> Result<PathBuf> {
    program(NATS_BINARY, NATS_PACKAGE)
}

/// Finds `binary` on PATH (or in sbin), installing the Debian `package` that holds it when it
/// is missing and we may; the answer is cached per binary.
pub(crate) fn program(binary: &'static str, package: &'static str) -> Result<PathBuf> {
    static FOUND: Mutex<Vec<(&'static str, PathBuf)>> = Mutex::new(Vec::new());
    let cached = |found: &Mutex<Vec<(&'static str, PathBuf)>>| {
        found
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .find(|(name, _)| *name == binary)
            .map(|(_, path)| path.clone())
    };
    if let Some(path) = cached(&FOUND) {
        return Ok(path);
    }
    let path = match find_in_path(binary) {
        Some(path) => path,
        None => {
            install_package(package, binary)?;
            find_in_path(binary).with_context(|| format!("installed `{package}` but still found no {binary}"))?
        }
    };
    FOUND
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .push((binary, path.clone()));
    Ok(path)
}

/// The highest-versioned /usr/lib/postgresql/*/bin, else `pg_config --bindir`,
/// else the first PATH entry holding all the tools.
fn find_postgres_bin_dir() -> Option<PathBuf> {
    let mut versioned: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir(DEBIAN_POSTGRES_ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.to_owned();
            let key = version
                .split('.')
                .map(str::parse)
                .collect::<Result<Vec<u32>, _>>()
                .ok()?;
            Some((key, entry.path().join("bin")))
        })
        .collect();
    versioned.sort();
    if let Some((_, dir)) = versioned.into_iter().rev().find(|(_, dir)| has_postgres_tools(dir)) {
        return Some(dir);
    }

    if let Ok(output) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if output.status.success() && has_postgres_tools(&dir) {
            return Some(dir);
        }
    }

    search_dirs().find(|dir| has_postgres_tools(dir))
}

fn has_postgres_tools(dir: &Path) -> bool {
    POSTGRES_TOOLS.iter().all(|tool| is_executable(&dir.join(tool)))
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    search_dirs()
        .map(|dir| dir.join(program))
        .find(|path| is_executable(path))
}

fn search_dirs() -> impl Iterator<Item = PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .collect::<Vec<_>>()
        .into_iter()
        .chain(EXTRA_BIN_DIRS.iter().map(PathBuf::from))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// Installs a Debian package when we are root and apt-get exists; otherwise
/// fails with a message naming the package to install.
fn install_package(package: &str, missing: &str) -> Result<()> {
    // Parallel tests may all discover the binary missing at once; dpkg holds
    // a lock, so install one package at a time.
    static APT: Mutex<()> = Mutex::new(());

    let apt_get = find_in_path("apt-get");
    let Some(apt_get) = apt_get.filter(|_| sys::is_root()) else {
        bail!(
            "{missing} not found; install the Debian package `{package}` \
             (sudo apt-get install -y {package})"
        );
    };
    let _serialised = APT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    // Deliberately not spawned through sys::spawn: killing dpkg halfway
    // because the test process died would leave the system broken.
    for args in [vec!["update"], vec!["install", "-y", package]] {
        let output = Command::new(&apt_get)
            .args(&args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .with_context(|| format!("running apt-get {}", args.join(" ")))?;
        if !output.status.success() {
            bail!(
                "{missing} not found and `apt-get {}` failed ({}); install the Debian \
                 package `{package}` by hand.\n{}{}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
    Ok(())
}
