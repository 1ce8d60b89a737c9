//! Opening and reading untrusted inputs safely: only regular files (a FIFO
//! would hang the open, `/dev/zero` never ends, a directory is not data),
//! opened without blocking, and buffers sized by a file allocated fallibly,
//! so a size the machine cannot hold is an error, not an abort.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result, TensorProblem};

/// What a non-regular file is, for the error.
fn kind_of(file_type: std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if file_type.is_fifo() {
            return "a FIFO";
        }
        if file_type.is_char_device() || file_type.is_block_device() {
            return "a device";
        }
        if file_type.is_socket() {
            return "a socket";
        }
    }
    if file_type.is_dir() {
        "a directory"
    } else {
        "not a file"
    }
}

/// Opens `path` for reading; fails unless it is a regular file. The open does
/// not block (`O_NONBLOCK`, which changes nothing for a regular file), so a
/// FIFO with no writer is refused instead of waiting forever.
pub fn open_regular(path: &Path) -> Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NONBLOCK);
    let file = options.open(path).map_err(|e| Error::io(path, "open", e))?;
    let file_type = file
        .metadata()
        .map_err(|e| Error::io(path, "stat", e))?
        .file_type();
    if !file_type.is_file() {
        return Err(Error::NotRegularFile {
            path: path.into(),
            kind: kind_of(file_type),
        });
    }
    Ok(file)
}

/// Reads a whole regular file of at most `cap` bytes; `Ok(None)` when it is
/// larger. A file whose length says so is refused unread; otherwise at most
/// `cap + 1` bytes are read, whatever happens to the file meanwhile.
pub fn read_capped(path: &Path, cap: u64) -> Result<Option<Vec<u8>>> {
    let file = open_regular(path)?;
    if file
        .metadata()
        .map_err(|e| Error::io(path, "stat", e))?
        .len()
        > cap
    {
        return Ok(None);
    }
    let mut bytes = Vec::new();
    file.take(cap + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, "read", e))?;
    Ok((bytes.len() as u64 <= cap).then_some(bytes))
}

/// `len` zeroed values, or the error naming the bytes that could not be had.
pub(crate) fn try_zeroed<T: bytemuck::Zeroable + Clone>(
    len: usize,
    what: &'static str,
) -> Result<Vec<T>, TensorProblem> {
    let mut values = Vec::new();
    try_resize_zeroed(&mut values, len, what)?;
    Ok(values)
}

/// Makes `values` `len` zeros, reusing its allocation where it is large enough.
pub(crate) fn try_resize_zeroed<T: bytemuck::Zeroable + Clone>(
    values: &mut Vec<T>,
    len: usize,
    what: &'static str,
) -> Result<(), TensorProblem> {
    values.clear();
    let bytes = len.saturating_mul(std::mem::size_of::<T>());
    values
        .try_reserve_exact(len)
        .map_err(|_| TensorProblem::OutOfMemory { bytes, what })?;
    values.resize(len, T::zeroed());
    Ok(())
}

/// Makes `values` `len` long without zeroing what it already holds: for a
/// buffer the caller then overwrites whole, reused tensor after tensor (a
/// zero-fill of every value only to overwrite it cost a pass over memory).
/// Values past the old length are zeroed; the rest keep stale contents.
pub(crate) fn try_resize_for_overwrite<T: bytemuck::Zeroable + Clone>(
    values: &mut Vec<T>,
    len: usize,
    what: &'static str,
) -> Result<(), TensorProblem> {
    if len <= values.len() {
        values.truncate(len);
        return Ok(());
    }
    let bytes = len.saturating_mul(std::mem::size_of::<T>());
    values
        .try_reserve_exact(len - values.len())
        .map_err(|_| TensorProblem::OutOfMemory { bytes, what })?;
    values.resize(len, T::zeroed());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_is_named_as_one() {
        let dir = tempfile::tempdir().unwrap();
        let error = open_regular(dir.path()).unwrap_err().to_string();
        assert!(
            error.ends_with("is a directory, not a regular file"),
            "{error}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let name = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        let error = read_capped(&fifo, 1 << 20).unwrap_err().to_string();
        assert!(error.contains("is a FIFO, not a regular file"), "{error}");
    }

    #[test]
    fn at_most_the_cap_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, [7u8; 10]).unwrap();
        assert_eq!(read_capped(&path, 10).unwrap(), Some(vec![7u8; 10]));
        assert_eq!(read_capped(&path, 9).unwrap(), None);
    }

    #[test]
    fn an_impossible_allocation_is_an_error_naming_its_size() {
        let problem = try_zeroed::<f32>(usize::MAX / 8, "the decoded tensor")
            .unwrap_err()
            .to_string();
        assert!(
            problem.contains(&format!("{} bytes", usize::MAX / 8 * 4)),
            "{problem}"
        );
    }
}
