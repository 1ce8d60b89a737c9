//! All-or-nothing file output: write to a temporary file in the target
//! directory, fsync it, then rename it over the target. A crash or an error at
//! any point leaves either the old file or the complete new one, never a part.
//!
//! Outputs that belong together (a cache and its sidecar) are committed as a
//! pair: every member is first [`stage`]d (written to its temp file and
//! fsynced), and only then [`commit`] renames them, in the order given, while
//! holding an exclusive `flock` on each target directory. Concurrent writers
//! of the same pair therefore serialize on the lock and the final pair comes
//! from one run; a run that fails before the commit leaves the old pair. Only
//! `kill -9` (or a power cut) between the renames can leave a mixed pair.
//!
//! Targets that are not regular files are honoured as the Go CLI honoured
//! them: a symlink is kept and its target replaced atomically (the temp file
//! lives beside the target); a FIFO, character device or socket is written
//! through, since renaming over it would replace the device with a file.
//!
//! Temp files in flight are registered, so [`on_termination`], the one
//! signal handler of both binaries, can delete them when SIGINT, SIGTERM or
//! SIGHUP ends the process.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::error::{Error, Result};

/// Write buffer size: large sequential writes, few syscalls.
const WRITE_BUFFER_BYTES: usize = 1 << 20;
/// Most symlinks followed to find a target (Linux's own limit).
const MAX_SYMLINK_HOPS: usize = 40;

/// Paths of the temp files written now, removed by the termination handler.
static IN_FLIGHT: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn in_flight() -> MutexGuard<'static, Vec<PathBuf>> {
    IN_FLIGHT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The directory `path` will be created in; `.` for a bare file name.
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `path` with its final component's symlinks followed, even to a target that
/// does not exist yet: the file a write to `path` must replace.
fn resolve_symlinks(path: &Path) -> Result<PathBuf> {
    let mut current = path.to_path_buf();
    for _ in 0..MAX_SYMLINK_HOPS {
        match std::fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let target = std::fs::read_link(&current)
                    .map_err(|e| Error::io(&current, "read the symlink", e))?;
                current = parent_dir(&current).join(target);
            }
            _ => return Ok(current),
        }
    }
    Err(Error::io(
        path,
        "resolve",
        std::io::Error::other("too many levels of symbolic links"),
    ))
}

/// Whether `path` exists and is something a rename must not replace: a FIFO,
/// a device or a socket (anything but a regular file or a directory).
fn is_special_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|meta| !meta.is_file() && !meta.is_dir())
}

/// Whether a write to `path` goes straight through (see the module doc).
pub fn writes_through(path: &Path) -> bool {
    is_special_file(path)
}

/// Fails when `path`'s directory (its symlink target's, for a symlink) does
/// not exist, naming it.
pub fn ensure_output_dir(path: &Path) -> Result<()> {
    let dir = parent_dir(&resolve_symlinks(path)?);
    if dir.is_dir() {
        Ok(())
    } else {
        Err(Error::OutputDirMissing { dir })
    }
}

/// The file `path` names, existing or not: symlinks followed, directory made
/// canonical. `None` when its directory cannot be resolved.
fn identity(path: &Path) -> Option<PathBuf> {
    let resolved = resolve_symlinks(path).ok()?;
    match resolved.canonicalize() {
        Ok(canonical) => Some(canonical),
        Err(_) => Some(
            parent_dir(&resolved)
                .canonicalize()
                .ok()?
                .join(resolved.file_name()?),
        ),
    }
}

/// Whether `a` and `b` name one file: same resolved path, or same inode (hard links).
fn same_file(a: &Path, b: &Path) -> bool {
    let same_path = matches!((identity(a), identity(b)), (Some(a), Some(b)) if a == b);
    same_path || same_inode(a, b)
}

/// A path a run reads or writes, and the flag (or role) that named it, so a
/// refusal can say which two of the user's arguments collide.
#[derive(Clone, Copy, Debug)]
pub struct NamedPath<'a> {
    pub flag: &'a str,
    pub path: &'a Path,
}

impl<'a> NamedPath<'a> {
    pub fn new(flag: &'a str, path: &'a Path) -> Self {
        NamedPath { flag, path }
    }
}

/// The one rule of both binaries: no path a run writes may name a file it
/// reads, or a file another of its outputs writes. Files are compared by
/// identity, not spelling: symlinks followed, `./x` and `x` alike, a file
/// not yet created by its canonical directory and name, hard links by device
/// and inode. Call it before any work, so a refused run has touched nothing.
pub fn ensure_no_clobber(reads: &[NamedPath<'_>], writes: &[NamedPath<'_>]) -> Result<()> {
    for (index, written) in writes.iter().enumerate() {
        let clash = |other: &NamedPath<'_>, other_is_read: bool| Error::PathClash {
            written: written.path.into(),
            written_flag: written.flag.into(),
            other: other.path.into(),
            other_flag: other.flag.into(),
            other_is_read,
        };
        if let Some(read) = reads.iter().find(|read| same_file(read.path, written.path)) {
            return Err(clash(read, true));
        }
        if let Some(other) = writes[..index]
            .iter()
            .find(|other| same_file(other.path, written.path))
        {
            return Err(clash(other, false));
        }
    }
    Ok(())
}

#[cfg(unix)]
fn same_inode(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_inode(_: &Path, _: &Path) -> bool {
    false
}

/// The error of a failed write to the file that will become `path`.
pub fn write_error(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::io(path, "write", e)
}

/// A temp file registered in [`IN_FLIGHT`]; dropping it deletes the file.
struct InFlight(Option<tempfile::TempPath>);

impl InFlight {
    /// Takes the path out for a rename; the caller holds `registry` and
    /// unregisters it.
    fn take(&mut self, registry: &mut Vec<PathBuf>) -> tempfile::TempPath {
        let temp = self.0.take().expect("taken once");
        registry.retain(|p| p.as_path() != &*temp);
        temp
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(temp) = self.0.take() {
            let mut registry = in_flight();
            registry.retain(|p| p.as_path() != &*temp);
            drop(temp);
        }
    }
}

/// One member of a pending commit.
enum Pending {
    /// A finished, fsynced temp file to rename onto the target.
    Temp(InFlight),
    /// Already written through to a special file: nothing to rename.
    WrittenThrough,
    /// No new file: a stale one at the target (e.g. the old output's sidecar)
    /// is removed, so the pair left behind is all from this run.
    Remove,
}

/// An output written but not yet in place; see [`stage`] and [`commit`].
/// Dropping it uncommitted removes its temp file.
pub struct Staged {
    /// The file to replace (a symlink's target, not the link).
    target: PathBuf,
    pending: Pending,
}

impl Staged {
    /// Whether it went straight to a special file (nothing left to commit).
    pub fn wrote_through(&self) -> bool {
        matches!(self.pending, Pending::WrittenThrough)
    }

    /// Commits to: remove the regular file at `path`, if there is one.
    pub fn removal(path: &Path) -> Result<Staged> {
        Ok(Staged {
            target: resolve_symlinks(path)?,
            pending: Pending::Remove,
        })
    }
}

/// Runs `fill` on a buffered writer to a temp file beside `path` (its symlink
/// target's directory for a symlink), then fsyncs it; [`commit`] puts it in
/// place. A special file is written through at once. If `fill` fails nothing
/// is left behind.
pub fn stage<F>(path: &Path, fill: F) -> Result<Staged>
where
    F: FnOnce(&mut BufWriter<&File>) -> Result<()>,
{
    if is_special_file(path) {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| Error::io(path, "open", e))?;
        let mut writer = BufWriter::with_capacity(WRITE_BUFFER_BYTES, &file);
        fill(&mut writer)?;
        writer.flush().map_err(write_error(path))?;
        return Ok(Staged {
            target: path.into(),
            pending: Pending::WrittenThrough,
        });
    }
    ensure_output_dir(path)?;
    let target = resolve_symlinks(path)?;
    let dir = parent_dir(&target);
    let mut builder = tempfile::Builder::new();
    builder.prefix(".kv-compress-").suffix(".tmp");
    // A temp file is 0600 by default; the output must get the mode a plain
    // `File::create` would give it (0666 less the umask), or a cache written
    // for another user or service is unreadable to it.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    let (file, temp) = {
        // Registered under the lock, so a termination handler cannot miss it.
        let mut registry = in_flight();
        // The user asked for `path`: name it, not the temp file (tempfile's
        // error carries the temp file's name).
        let temp = builder.tempfile_in(&dir).map_err(|e| {
            Error::io(
                path,
                "create it (its directory refuses a new file)",
                bare(e),
            )
        })?;
        registry.push(temp.path().to_path_buf());
        let (file, temp) = temp.into_parts();
        (file, InFlight(Some(temp)))
    };
    {
        let mut writer = BufWriter::with_capacity(WRITE_BUFFER_BYTES, &file);
        fill(&mut writer)?;
        writer.flush().map_err(write_error(&target))?;
    }
    file.sync_all()
        .map_err(|e| Error::io(&target, "fsync the new", e))?;
    Ok(Staged {
        target,
        pending: Pending::Temp(temp),
    })
}

/// Puts staged outputs in place, renaming them in the order given, under an
/// exclusive `flock` of every target directory (taken in sorted order, so
/// two writers never deadlock), then makes the renames durable.
pub fn commit(staged: Vec<Staged>) -> Result<()> {
    let mut dirs: Vec<PathBuf> = staged
        .iter()
        .filter(|s| !matches!(s.pending, Pending::WrittenThrough))
        .map(|s| parent_dir(&s.target))
        .collect();
    dirs.sort();
    dirs.dedup();
    // Held until the end of the function; a directory that cannot be opened
    // or locked (some file systems) only loses the serialization.
    let locked: Vec<File> = dirs
        .iter()
        .filter_map(|dir| File::open(dir).ok())
        .inspect(lock_exclusive)
        .collect();
    // The termination handler waits for a commit in progress, so a signal
    // cannot land between the renames of a pair.
    let mut registry = in_flight();
    let mut members = staged.into_iter();
    let mut result = Ok(());
    for mut member in members.by_ref() {
        match &mut member.pending {
            Pending::Temp(in_flight) => {
                let temp = in_flight.take(&mut registry);
                if let Err(e) = temp.persist(&member.target) {
                    result = Err(Error::io(
                        &member.target,
                        "rename the finished file onto",
                        bare(e.error),
                    ));
                    break;
                }
            }
            Pending::WrittenThrough => {}
            Pending::Remove => {
                if std::fs::symlink_metadata(&member.target).is_ok_and(|m| m.is_file()) {
                    if let Err(e) = std::fs::remove_file(&member.target) {
                        result = Err(Error::io(&member.target, "remove the stale", e));
                        break;
                    }
                }
            }
        }
    }
    // Unlocked before the members not committed are dropped: their drop
    // unregisters (and deletes) their temp files under the same lock.
    drop(registry);
    drop(members);
    result?;
    // Make the renames durable; a directory that cannot be synced does not
    // make the finished files wrong.
    for dir in &locked {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// `error` without the path a library may have appended (tempfile names its
/// temp file): errors name the user's paths only.
fn bare(error: std::io::Error) -> std::io::Error {
    match error.raw_os_error() {
        Some(code) => std::io::Error::from_raw_os_error(code),
        None => std::io::Error::from(error.kind()),
    }
}

#[cfg(unix)]
fn lock_exclusive(dir: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a file descriptor we own; released when it is closed.
    unsafe {
        libc::flock(dir.as_raw_fd(), libc::LOCK_EX);
    }
}

#[cfg(not(unix))]
fn lock_exclusive(_: &File) {}

/// Runs `fill` on a buffered writer to a temp file beside `path`, then makes
/// it `path` atomically. If `fill` fails the temp file is removed.
pub fn write_atomically<F>(path: &Path, fill: F) -> Result<()>
where
    F: FnOnce(&mut BufWriter<&File>) -> Result<()>,
{
    commit(vec![stage(path, fill)?])
}

/// Makes a write beyond the file-size limit (`ulimit -f`) an error instead of
/// a death: SIGXFSZ is ignored, so `write` fails with EFBIG and the ordinary
/// error path removes the temp file and names the output. (Catching it
/// instead would not do: it is sent to the thread that wrote, which may hold
/// any lock, and its default action kills before anything is cleaned.)
/// Children inherit the ignored disposition, so a kv-compress that
/// kv-validate spawns behaves alike.
#[cfg(unix)]
pub fn survive_file_size_limit() -> std::io::Result<()> {
    // SAFETY: setting a signal's disposition to SIG_IGN.
    if unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) } == libc::SIG_ERR {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(not(unix))]
pub fn survive_file_size_limit() -> std::io::Result<()> {
    Ok(())
}

/// Removes this process's temp files when SIGINT, SIGTERM or SIGHUP arrives,
/// then lets the signal end the process (and survives SIGXFSZ,
/// [`survive_file_size_limit`]): [`on_termination`] with nothing
/// else to undo (kv-compress).
pub fn remove_temp_files_on_termination() -> std::io::Result<()> {
    survive_file_size_limit()?;
    on_termination(|_| {})
}

/// The one handler of SIGINT, SIGTERM and SIGHUP, for both binaries: on the
/// first, `cleanup(signal)` undoes what only the caller knows of (kv-validate
/// kills its children and removes its scratch directories), then this
/// process's temp files are removed, then the signal ends the process as it
/// would have (exit status 128 + signal). Call it first thing in `main`,
/// before any thread starts: the signals are blocked in every thread and
/// taken by one thread of ours (`sigwait`), so the cleanup runs as ordinary
/// code, not in a signal handler. `kill -9` cannot be caught: it may leave a
/// temp file. Children started with `std::process` begin with no signal
/// blocked.
#[cfg(unix)]
pub fn on_termination(cleanup: impl FnOnce(libc::c_int) + Send + 'static) -> std::io::Result<()> {
    const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];
    // SAFETY: plain libc calls on a sigset_t we own.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in SIGNALS {
            libc::sigaddset(&mut set, signal);
        }
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        set
    };
    std::thread::Builder::new()
        .name("kv-signals".into())
        .spawn(move || {
            let mut signal: libc::c_int = 0;
            // SAFETY: `set` is a valid sigset_t; `signal` a valid out pointer.
            if unsafe { libc::sigwait(&set, &mut signal) } != 0 {
                return;
            }
            cleanup(signal);
            let registry = in_flight();
            for path in registry.iter() {
                let _ = std::fs::remove_file(path);
            }
            // SAFETY: restores the default action and re-raises the signal in this
            // thread, where it is then unblocked: the process ends as if it had
            // never been caught. The registry stays locked: no new temp file.
            unsafe {
                libc::signal(signal, libc::SIG_DFL);
                libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
                libc::raise(signal);
            }
            std::process::exit(128 + signal);
        })?;
    Ok(())
}

#[cfg(not(unix))]
pub fn on_termination(_cleanup: impl FnOnce(i32) + Send + 'static) -> std::io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_write_leaves_no_file_behind() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.bin");
        let result = write_atomically(&target, |w| {
            w.write_all(b"partial").map_err(write_error(&target))?;
            Err(write_error(&target)(std::io::Error::other(
                "simulated failure",
            )))
        });
        assert!(result.is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn successful_write_replaces_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.bin");
        std::fs::write(&target, b"old").unwrap();
        write_atomically(&target, |w| {
            w.write_all(b"new contents").map_err(write_error(&target))
        })
        .unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"new contents");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn output_gets_the_mode_a_plain_create_would() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let reference = dir.path().join("created.bin");
        std::fs::File::create(&reference).unwrap();
        let target = dir.path().join("out.bin");
        write_atomically(&target, |w| w.write_all(b"x").map_err(write_error(&target))).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&target), mode(&reference));
        assert_ne!(
            mode(&target),
            0o600,
            "the temp file's private mode leaked into the output"
        );
    }

    #[test]
    fn missing_directory_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("nope").join("out.bin");
        let error = write_atomically(&target, |_| Ok(())).unwrap_err();
        assert!(error.to_string().contains("nope"), "{error}");
        assert!(matches!(error, Error::OutputDirMissing { .. }));
    }

    fn read(path: &Path) -> NamedPath<'_> {
        NamedPath::new("-input", path)
    }

    fn written(path: &Path) -> NamedPath<'_> {
        NamedPath::new("-output", path)
    }

    #[test]
    fn hard_link_to_input_is_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in");
        let link = dir.path().join("link");
        std::fs::write(&input, b"x").unwrap();
        std::fs::hard_link(&input, &link).unwrap();
        assert!(ensure_no_clobber(&[read(&input)], &[written(&link)]).is_err());
        let other = dir.path().join("other");
        assert!(ensure_no_clobber(&[read(&input)], &[written(&other)]).is_ok());
    }

    #[test]
    fn a_write_may_not_name_any_read_even_before_it_exists() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.safetensors");
        std::fs::write(&input, b"x").unwrap();
        let input_sidecar = dir.path().join("in.metadata.json");
        let output = dir.path().join("sub/../in.metadata.json");
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let reads = [
            read(&input),
            NamedPath::new("the input's sidecar", &input_sidecar),
        ];
        let error = ensure_no_clobber(&reads, &[written(&output)]).unwrap_err();
        assert!(
            matches!(&error, Error::PathClash { other_is_read: true, other_flag, .. } if other_flag == "the input's sidecar"),
            "{error}"
        );
        let twice = dir.path().join("out");
        let dotted = dir.path().join(".").join("out");
        let error = ensure_no_clobber(
            &[read(&input)],
            &[written(&twice), NamedPath::new("--json", &dotted)],
        )
        .unwrap_err();
        assert!(
            matches!(
                error,
                Error::PathClash {
                    other_is_read: false,
                    ..
                }
            ),
            "{error}"
        );
        let message = error.to_string();
        assert!(
            message.contains("--json") && message.contains("-output"),
            "{message}"
        );
        assert!(ensure_no_clobber(&reads, &[written(&twice)]).is_ok());
    }

    #[cfg(unix)]
    #[test]
    fn a_symlink_to_an_input_is_the_input() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("model.gguf");
        std::fs::write(&input, b"weights").unwrap();
        let link = dir.path().join("report.json");
        std::os::unix::fs::symlink("model.gguf", &link).unwrap();
        let error = ensure_no_clobber(&[read(&input)], &[written(&link)]).unwrap_err();
        assert!(error.to_string().contains("model.gguf"), "{error}");
        // And the other way round: the input named through a link.
        let out = dir.path().join("out.json");
        let in_link = dir.path().join("in-link");
        std::os::unix::fs::symlink(&out, &in_link).unwrap();
        std::fs::write(&out, b"{}").unwrap();
        assert!(ensure_no_clobber(&[read(&in_link)], &[written(&out)]).is_err());
    }

    #[cfg(unix)]
    #[test]
    fn a_symlink_is_kept_and_its_target_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let target = elsewhere.path().join("real.bin");
        std::fs::write(&target, b"old").unwrap();
        let link = dir.path().join("link.bin");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        write_atomically(&link, |w| w.write_all(b"new").map_err(write_error(&link))).unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        // A dangling link gets its target created.
        let dangling = dir.path().join("dangling.bin");
        std::os::unix::fs::symlink("made.bin", &dangling).unwrap();
        write_atomically(&dangling, |w| {
            w.write_all(b"made").map_err(write_error(&dangling))
        })
        .unwrap();
        assert_eq!(std::fs::read(dir.path().join("made.bin")).unwrap(), b"made");
        assert!(std::fs::symlink_metadata(&dangling)
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn an_uncommitted_stage_leaves_the_old_file_and_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.bin");
        std::fs::write(&target, b"old").unwrap();
        let staged = stage(&target, |w| {
            w.write_all(b"new").map_err(write_error(&target))
        })
        .unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            2,
            "the temp file is there while staged"
        );
        drop(staged);
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
