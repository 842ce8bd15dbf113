//! The few operating-system calls that std does not wrap: effective uid, user
//! lookup, signals, and the `pre_exec` hook that ties a child's life to ours.
//!
//! Every child process of this crate is spawned through [`spawn`], so the
//! orphan-prevention policy lives in exactly one place.

// This module is the crate's only `unsafe` code: libc has no safe wrappers for
// geteuid/getpwnam_r/kill/prctl, and `CommandExt::pre_exec` is inherently
// unsafe. Each block is a plain FFI call with no pointers outliving it.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::sync::mpsc;

pub(crate) use libc::{SIGINT, SIGKILL, SIGTERM};

/// Starting size of the buffer handed to `getpwnam_r`; doubled on `ERANGE`.
const PASSWD_BUFFER_INITIAL_BYTES: usize = 4096;
/// Upper bound for that buffer, so a broken NSS module cannot make us loop forever.
const PASSWD_BUFFER_MAX_BYTES: usize = 1 << 20;

/// True when the effective user is root, i.e. PostgreSQL must be run as another user.
pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A system account's numeric ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Account {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
}

/// Looks up a user in the passwd database; `Ok(None)` when it does not exist.
///
/// Uses the re-entrant `getpwnam_r` because tests start stacks from many
/// threads at once and plain `getpwnam` returns a shared static buffer.
pub(crate) fn lookup_user(name: &str) -> io::Result<Option<Account>> {
    let c_name = CString::new(name).map_err(io::Error::other)?;
    let mut buffer: Vec<libc::c_char> = vec![0; PASSWD_BUFFER_INITIAL_BYTES];
    loop {
        // SAFETY: passwd is a plain C struct for which all-zero is a valid value.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the duration of the call and the
        // buffer length matches the buffer; string fields of `entry` point into
        // `buffer`, but we only copy the integer ids out of it.
        let rc = unsafe {
            libc::getpwnam_r(
                c_name.as_ptr(),
                &mut entry,
                buffer.as_mut_ptr(),
                buffer.len(),
                &mut found,
            )
        };
        if rc == libc::ERANGE && buffer.len() < PASSWD_BUFFER_MAX_BYTES {
            buffer.resize(buffer.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        if found.is_null() {
            return Ok(None);
        }
        return Ok(Some(Account {
            uid: entry.pw_uid,
            gid: entry.pw_gid,
        }));
    }
}

/// Sends `signal` to one process.
pub(crate) fn signal_process(pid: u32, signal: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(io::Error::other)?;
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sends `signal` to every process in the group led by `leader` (children are
/// spawned as group leaders, see [`spawn`]), so helpers a child forked (e.g.
/// initdb's single-user backends) are hit too. Postgres server workers call
/// setsid() and so escape the group, but they exit on their own once their
/// postmaster is gone.
pub(crate) fn signal_group(leader: u32, signal: libc::c_int) -> io::Result<()> {
    let pgid = libc::pid_t::try_from(leader).map_err(io::Error::other)?;
    // SAFETY: kill has no memory-safety preconditions; a negative pid addresses a group.
    if unsafe { libc::kill(-pgid, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Live children of `parent`, from /proc (`pid (comm) state ppid ...` in each stat).
pub(crate) fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
                    let _state = fields.next()?;
                    fields.next()?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

struct SpawnRequest {
    command: Command,
    reply: mpsc::Sender<io::Result<Child>>,
}

/// Spawns `command` so that it cannot outlive this process:
///
/// * `PR_SET_PDEATHSIG(SIGKILL)` is set in the child (after std has applied
///   any uid/gid change, which would otherwise clear it);
/// * it becomes the leader of its own process group, so a terminal Ctrl-C
///   reaches only us and we can shut servers down in order, and so a final
///   SIGKILL to the group also takes whatever the child forked into it.
///
/// The parent-death signal fires when the *thread* that forked the child
/// exits, not the process. Test harnesses run each test on its own
/// short-lived thread and may keep a stack in a `static` shared by later
/// tests, so the fork is done by one dedicated thread that lives as long as
/// the process: servers then die exactly when the process does.
pub(crate) fn spawn(mut command: Command) -> io::Result<Child> {
    let parent_pid = libc::pid_t::try_from(std::process::id()).map_err(io::Error::other)?;
    command.process_group(0);
    // SAFETY: the closure runs between fork and exec, so it must be
    // async-signal-safe: prctl and getppid are, and it does not allocate
    // (from_raw_os_error/last_os_error build errors without allocating).
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // If we died between fork and prctl the signal was never sent;
            // re-parenting shows it, so do not exec an orphan.
            if libc::getppid() != parent_pid {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }

    let (reply, response) = mpsc::channel();
    spawner()?
        .send(SpawnRequest { command, reply })
        .map_err(|_| io::Error::other("devstack spawner thread is gone"))?;
    response
        .recv()
        .map_err(|_| io::Error::other("devstack spawner thread dropped a request"))?
}

/// The long-lived thread that performs every fork (see [`spawn`] for why).
fn spawner() -> io::Result<&'static mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    if let Some(sender) = SPAWNER.get() {
        return Ok(sender);
    }
    let (sender, requests) = mpsc::channel::<SpawnRequest>();
    let mut spawned = Ok(());
    let sender = SPAWNER.get_or_init(|| {
        spawned = std::thread::Builder::new()
            .name("devstack-spawner".into())
            .spawn(move || {
                for mut request in requests {
                    // Requesters block on the reply, so this send only
                    // fails if one panicked; nothing useful to do then.
                    let _ = request.reply.send(request.command.spawn());
                }
            })
            .map(drop);
        sender
    });
    spawned?;
    Ok(sender)
}
