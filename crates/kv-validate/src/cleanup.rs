//! What a signal must not leave behind: the running `kv-compress` and the
//! scratch directories of caches.
//!
//! `kv-compress` runs in a process group of its own ([`GroupChild`]), so
//! everything it starts can be killed at once, and the terminal's Ctrl-C
//! reaches kv-validate alone. [`install_signal_handlers`] adds to the one
//! handler both binaries share (`kvformat::atomic::on_termination`, on an
//! ordinary thread): it kills every registered group and removes every
//! registered [`ScratchDir`]; the handler then removes the temp files of
//! outputs in flight and dies of the signal as if it had not been handled
//! (so a calling shell sees the signal). `kill -9`
//! cannot be handled: it may leave a `kv-validate-*` directory (in
//! `--scratch-dir`) and an orphaned compressor.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// What a signal has to undo, and whether one arrived.
struct Registry {
    /// Set by the signal thread: nothing new is started from then on.
    stopping: bool,
    /// Process groups (ids equal to their leaders' pids) of children not yet
    /// reaped. A reaped leader's pid may be reused, so a group leaves the
    /// registry before its leader is reaped, under this lock.
    groups: Vec<i32>,
    scratch_dirs: Vec<PathBuf>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    stopping: false,
    groups: Vec::new(),
    scratch_dirs: Vec::new(),
});

fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(PoisonError::into_inner)
}

fn stopping_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::Interrupted,
        "kv-validate is stopping on a signal",
    )
}

/// Sends SIGKILL to every process of group `group`. Harmless when the group
/// is gone; callers guarantee its leader is not yet reaped (a zombie keeps
/// the id reserved), so the id cannot name someone else's group.
pub(crate) fn kill_group(group: i32) {
    // -1 would be every process we may signal, -0 our own group.
    if group > 1 {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(-group, libc::SIGKILL);
        }
    }
}

/// Whether child `pid` has exited (`block`: wait until it has), without
/// reaping it: it stays a zombie, holding its pid and group id.
fn leader_exited(pid: i32, block: bool) -> io::Result<bool> {
    let flags = libc::WEXITED | libc::WNOWAIT | if block { 0 } else { libc::WNOHANG };
    loop {
        // SAFETY: a zeroed siginfo_t is a valid out-parameter for waitid(2).
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a live, writable siginfo_t.
        let rc = unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, flags) };
        if rc == 0 {
            // SAFETY: waitid filled `info` (si_pid is 0 when nothing exited yet).
            return Ok(unsafe { info.si_pid() } != 0);
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// A child process leading a process group of its own, registered for the
/// signal handler from its spawn until it is reaped.
pub struct GroupChild {
    child: Child,
    reaped: bool,
}

impl GroupChild {
    /// Spawns `command` as the leader of a new process group; refused once a
    /// signal has arrived.
    pub fn spawn(command: &mut Command) -> io::Result<GroupChild> {
        use std::os::unix::process::CommandExt;
        command.process_group(0);
        // Spawned under the lock: the signal thread either sees the group or
        // has already set `stopping`, never neither.
        let mut registry = registry();
        if registry.stopping {
            return Err(stopping_error());
        }
        let child = command.spawn()?;
        registry.groups.push(Self::pid_of(&child));
        Ok(GroupChild {
            child,
            reaped: false,
        })
    }

    fn pid_of(child: &Child) -> i32 {
        i32::try_from(child.id()).expect("pids fit in pid_t")
    }

    /// The group's id (its leader's pid).
    pub fn group(&self) -> i32 {
        Self::pid_of(&self.child)
    }

    /// The leader's pipes and handle, e.g. to take its stdout.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Kills every process of the group (the leader too).
    pub fn kill_group(&self) {
        kill_group(self.group());
    }

    /// Whether the leader has exited; it is not reaped, so the group can
    /// still be killed safely.
    pub fn has_exited(&self) -> io::Result<bool> {
        leader_exited(self.group(), false)
    }

    /// Waits until the leader has exited, without reaping it.
    pub fn wait_exited(&self) -> io::Result<()> {
        leader_exited(self.group(), true).map(drop)
    }

    /// Unregisters the group and reaps the leader, returning its status.
    pub fn reap(mut self) -> io::Result<ExitStatus> {
        self.unregister_and_reap()
    }

    fn unregister_and_reap(&mut self) -> io::Result<ExitStatus> {
        let group = self.group();
        registry().groups.retain(|&g| g != group);
        self.reaped = true;
        self.child.wait()
    }
}

impl Drop for GroupChild {
    /// An early return (an error, a panic) must not leave the group running.
    fn drop(&mut self) {
        if !self.reaped {
            self.kill_group();
            let _ = self.unregister_and_reap();
        }
    }
}

/// A fresh directory of scratch files (`kv-validate-*`), removed when dropped
/// or when a signal stops kv-validate.
pub struct ScratchDir {
    dir: tempfile::TempDir,
}

impl ScratchDir {
    /// Creates `PREFIX*` in `parent`; refused once a signal has arrived.
    pub fn new(prefix: &str, parent: &Path) -> io::Result<ScratchDir> {
        let mut registry = registry();
        if registry.stopping {
            return Err(stopping_error());
        }
        let dir = tempfile::Builder::new().prefix(prefix).tempdir_in(parent)?;
        registry.scratch_dirs.push(dir.path().to_path_buf());
        Ok(ScratchDir { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        registry().scratch_dirs.retain(|dir| dir != self.dir.path());
        // `TempDir`'s own drop removes the directory.
    }
}

/// Removes `dir`, retrying while a killed process may still add to it.
fn remove_scratch_dir(dir: &Path) {
    for _ in 0..50 {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => return,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Kills the registered groups, waits for their leaders to exit and removes
/// the registered directories. Keeps the registry locked for good: the rest
/// of the process can start nothing and unregister nothing until it exits.
fn stop_everything() {
    let mut registry = registry();
    registry.stopping = true;
    for &group in &registry.groups {
        kill_group(group);
    }
    for &group in &registry.groups {
        let _ = leader_exited(group, true);
    }
    for dir in &registry.scratch_dirs {
        remove_scratch_dir(dir);
    }
    std::mem::forget(registry);
}

/// Handles SIGINT, SIGTERM and SIGHUP for the rest of the process, through
/// kvformat's one handler ([`kvformat::atomic::on_termination`]): on the
/// first, stop everything (`stop_everything`), say so on stderr; the handler
/// then removes the temp files of outputs being written and dies of that signal.
pub fn install_signal_handlers() -> io::Result<()> {
    // A write past `ulimit -f` fails (EFBIG) instead of killing: outputs and
    // scratch files are then cleaned by the ordinary error path.
    kvformat::atomic::survive_file_size_limit()?;
    kvformat::atomic::on_termination(|signal| {
        stop_everything();
        // Not eprintln!: stderr may be a pipe whose reader is gone (a
        // `--devices` worker whose parent died), and a panic here would
        // leave the process alive, its registry locked for good.
        let _ = writeln!(
            io::stderr(),
            "error: stopped by {}; kv-compress killed, scratch files removed",
            signal_name(signal)
        );
    })
}

/// `SIGINT`, `SIGTERM`, `SIGHUP`: the signals the handler takes.
fn signal_name(signal: libc::c_int) -> &'static str {
    match signal {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;

    #[test]
    fn a_killed_group_takes_the_leaders_children_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("sleeper.pid");
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!(
                "sleep 1000 & echo $! > '{}'; wait",
                pid_file.display()
            ))
            .stdout(Stdio::null());
        let child = GroupChild::spawn(&mut command).unwrap();
        let group = child.group();
        assert!(registry().groups.contains(&group));
        while std::fs::read_to_string(&pid_file).map_or(true, |s| !s.ends_with('\n')) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let sleeper: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(!child.has_exited().unwrap());
        child.kill_group();
        child.wait_exited().unwrap();
        let status = child.reap().unwrap();
        assert!(!status.success());
        // The grandchild got the same SIGKILL: gone, or a zombie awaiting init.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{sleeper}/stat"));
            let gone = stat.map_or(true, |s| {
                s.rsplit(") ").next().is_some_and(|r| r.starts_with('Z'))
            });
            if gone {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "sleep {sleeper} survived"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            !registry().groups.contains(&group),
            "unregistered once reaped"
        );
    }

    #[test]
    fn a_scratch_dir_is_registered_while_it_lives() {
        let parent = tempfile::tempdir().unwrap();
        let scratch = ScratchDir::new("kv-validate-test-", parent.path()).unwrap();
        let path = scratch.path().to_path_buf();
        assert!(registry().scratch_dirs.contains(&path));
        drop(scratch);
        assert!(!registry().scratch_dirs.contains(&path));
        assert!(!path.exists());
    }
}
