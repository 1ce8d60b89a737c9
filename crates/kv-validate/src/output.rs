//! The one way kv-validate writes a file — the JSON report, the sweep's CSV
//! and its SVG plot: through `kvformat::atomic` (docs/architecture.md,
//! invariant 2), so a reader sees the old file or the whole new one, and the
//! new one gets the mode a plain `File::create` would give it.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// Why an output file could not be written; kvformat's error names the file.
/// Boxed: kvformat's error is large, and this one is rare.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error(transparent)]
    Write(Box<kvformat::Error>),
    #[error("{}: cannot serialize the report as JSON: {source}", path.display())]
    Json {
        path: std::path::PathBuf,
        source: serde_json::Error,
    },
}

/// The files one command reads and writes, each with the flag that named
/// it, for the rule of both binaries that no output may be an input or
/// another output (`kvformat::atomic::ensure_no_clobber`). Built from the
/// command line and checked before any work.
#[derive(Debug, Default)]
pub struct FilePlan {
    reads: Vec<(String, PathBuf)>,
    writes: Vec<(String, PathBuf)>,
}

impl FilePlan {
    /// `path`, when given, is read (its flag or role: `--text-file`).
    pub fn read(&mut self, flag: &str, path: Option<&Path>) -> &mut Self {
        self.reads
            .extend(path.map(|path| (flag.to_string(), path.to_path_buf())));
        self
    }

    /// Every one of `paths` is read.
    pub fn read_all(&mut self, flag: &str, paths: &[PathBuf]) -> &mut Self {
        for path in paths {
            self.read(flag, Some(path));
        }
        self
    }

    /// `path`, when given, is written.
    pub fn write(&mut self, flag: &str, path: Option<&Path>) -> &mut Self {
        self.writes
            .extend(path.map(|path| (flag.to_string(), path.to_path_buf())));
        self
    }

    /// Fails, naming both paths and flags, when an output is an input or
    /// another output.
    pub fn check(&self) -> Result<(), OutputError> {
        kvformat::atomic::ensure_no_clobber(&named(&self.reads), &named(&self.writes))
            .map_err(|error| OutputError::Write(Box::new(error)))
    }
}

fn named(files: &[(String, PathBuf)]) -> Vec<kvformat::atomic::NamedPath<'_>> {
    files
        .iter()
        .map(|(flag, path)| kvformat::atomic::NamedPath::new(flag, path))
        .collect()
}

/// Writes `contents` to `path` atomically (temporary file beside it, fsync, rename).
pub fn write_atomically(path: &Path, contents: impl AsRef<[u8]>) -> Result<(), OutputError> {
    kvformat::atomic::write_atomically(path, |writer| {
        writer
            .write_all(contents.as_ref())
            .map_err(kvformat::atomic::write_error(path))
    })
    .map_err(|error| OutputError::Write(Box::new(error)))
}

/// Writes `value` to `path` as 2-space-indented JSON and a final newline,
/// through [`write_atomically`].
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<(), OutputError> {
    let mut json = serde_json::to_string_pretty(value).map_err(|source| OutputError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    json.push('\n');
    write_atomically(path, json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_replaces_the_old_file_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sweep.csv");
        std::fs::write(&path, "stale").unwrap();
        write_atomically(&path, "fresh\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "fresh\n");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn json_is_pretty_with_a_final_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("report.json");
        write_json(&path, &serde_json::json!({ "passed": false, "windows": 1 })).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\n  \"passed\": false,\n  \"windows\": 1\n}\n"
        );
    }

    #[test]
    fn a_missing_directory_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no/such/dir/x.csv");
        let error = write_atomically(&missing, "x").unwrap_err().to_string();
        assert!(error.contains("no/such/dir"), "{error}");
    }

    #[cfg(unix)]
    #[test]
    fn outputs_get_the_mode_a_plain_create_would() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let reference = dir.path().join("created");
        std::fs::File::create(&reference).unwrap();
        let path = dir.path().join("report.json");
        write_json(&path, &1).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), mode(&reference));
    }
}
