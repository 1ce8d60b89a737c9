//! All-or-nothing file output: write to a temporary file in the target
//! directory, fsync it, then rename it over the target. A crash or an error at
//! any point leaves either the old file or the complete new one, never a part.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Write buffer size: large sequential writes, few syscalls.
const WRITE_BUFFER_BYTES: usize = 1 << 20;

/// The directory `path` will be created in; `.` for a bare file name.
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Fails when `path`'s directory does not exist, naming it.
pub fn ensure_output_dir(path: &Path) -> Result<()> {
    let dir = parent_dir(path);
    if dir.is_dir() {
        Ok(())
    } else {
        Err(Error::OutputDirMissing { dir })
    }
}

/// Fails when `output` names the same file as `input` (same canonical path or
/// same inode, so hard links and `./x` vs `x` are caught too).
pub fn ensure_distinct(input: &Path, output: &Path) -> Result<()> {
    let same_path = match (input.canonicalize(), output.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same_path || same_inode(input, output) {
        return Err(Error::OutputIsInput { path: output.into() });
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

/// Runs `fill` on a buffered writer to a temp file beside `path`, then makes
/// it `path` atomically. If `fill` fails the temp file is removed.
pub fn write_atomically<F>(path: &Path, fill: F) -> Result<()>
where
    F: FnOnce(&mut BufWriter<&File>) -> Result<()>,
{
    ensure_output_dir(path)?;
    let dir = parent_dir(path);
    let mut builder = tempfile::Builder::new();
    builder.prefix(".kv-compress-").suffix(".tmp");
    // A temp file is 0600 by default; the output must get the mode a plain
    // `File::create` would give it (0666 less the umask), or a cache written
    // for another user or service is unreadable to it.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    let temp = builder
        .tempfile_in(&dir)
        .map_err(|e| Error::io(&dir, "create a temporary file in", e))?;
    {
        let mut writer = BufWriter::with_capacity(WRITE_BUFFER_BYTES, temp.as_file());
        fill(&mut writer)?;
        writer.flush().map_err(|e| Error::io(temp.path(), "write", e))?;
    }
    temp.as_file().sync_all().map_err(|e| Error::io(temp.path(), "fsync", e))?;
    temp.persist(path).map_err(|e| Error::io(path, "rename the finished file onto", e.error))?;
    // Make the rename itself durable; a directory that cannot be opened or
    // synced (some file systems) does not make the finished file wrong.
    if let Ok(dir) = File::open(&dir) {
        let _ = dir.sync_all();
    }
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
            Err(write_error(&target)(std::io::Error::other("simulated failure")))
        });
        assert!(result.is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn successful_write_replaces_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.bin");
        std::fs::write(&target, b"old").unwrap();
        write_atomically(&target, |w| w.write_all(b"new contents").map_err(write_error(&target))).unwrap();
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
        assert_ne!(mode(&target), 0o600, "the temp file's private mode leaked into the output");
    }

    #[test]
    fn missing_directory_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("nope").join("out.bin");
        let error = write_atomically(&target, |_| Ok(())).unwrap_err();
        assert!(error.to_string().contains("nope"), "{error}");
        assert!(matches!(error, Error::OutputDirMissing { .. }));
    }

    #[test]
    fn hard_link_to_input_is_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in");
        let link = dir.path().join("link");
        std::fs::write(&input, b"x").unwrap();
        std::fs::hard_link(&input, &link).unwrap();
        assert!(ensure_distinct(&input, &link).is_err());
        assert!(ensure_distinct(&input, &dir.path().join("other")).is_ok());
    }
}
