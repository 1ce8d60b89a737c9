//! The one error type of `kvformat`. Every variant names the file (and the
//! tensor, where there is one) so a CLI can print it as a single line.

use std::path::PathBuf;

use crate::codec::CodecError;

/// What went wrong with one tensor of a file.
#[derive(Debug, thiserror::Error)]
pub enum TensorProblem {
    #[error("unsupported dtype {0} (expected F32, F16 or BF16)")]
    UnsupportedDtype(String),
    #[error("non-finite value {value} at flat index {index}")]
    NonFinite { index: usize, value: f32 },
    #[error("{0}")]
    Codec(#[from] CodecError),
    #[error("the codec reconstructed value {index} as {value}, which is not finite (a codec bug: please report it)")]
    ReconstructionNotFinite { index: usize, value: f32 },
    #[error("checksum mismatch (stored crc32 {expected:08x}, data has {actual:08x}): the file is corrupted")]
    ChecksumMismatch { expected: u32, actual: u32 },
    #[error("stored as {dtype} {shape:?}, but the manifest says U8 [{stored_len}]")]
    StoredShapeMismatch {
        dtype: String,
        shape: Vec<usize>,
        stored_len: usize,
    },
    #[error(
        "decoded value {index} is {value}, not finite: the stored scales are corrupt or hostile"
    )]
    DecodedNotFinite { index: usize, value: f32 },
    #[error("cannot allocate {bytes} bytes for it: {what} does not fit in this machine's (or this process's) memory")]
    OutOfMemory { bytes: usize, what: &'static str },
    #[error("LZ4 payload does not decompress to {raw_len} bytes: {reason}")]
    Lz4 { raw_len: usize, reason: String },
    #[error("data offsets overlap, leave a gap or run out of range")]
    BadOffsets,
    #[error("shape x dtype does not match the tensor's byte length")]
    SizeMismatch,
    #[error("manifest entry is implausible: {0}")]
    BadManifestEntry(String),
    #[error("missing from the file but listed in the manifest")]
    MissingTensor,
    #[error("present in the file but not in the manifest")]
    UnlistedTensor,
}

/// Every failure of reading, checking or writing a KV-cache or packed file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: cannot {action}: {source}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        source: std::io::Error,
    },
    #[error("{}: empty file (not a safetensors file)", path.display())]
    EmptyFile { path: PathBuf },
    /// The safetensors structure (header length, JSON, offsets, sizes) is invalid.
    #[error("{}: invalid safetensors file: {problem}", path.display())]
    Structure { path: PathBuf, problem: String },
    /// The tensor name is quoted and escaped (`{:?}`): a name is untrusted
    /// text, and a newline or terminal escape in it must not break the
    /// one-line error or forge a log line.
    #[error("{}: {tensor:?}: {problem}", path.display())]
    Tensor {
        path: PathBuf,
        tensor: String,
        problem: TensorProblem,
    },
    #[error("{}: not a kv-compress packed file (no kvformat.manifest)", path.display())]
    NotPacked { path: PathBuf },
    #[error("{}: packed file manifest: {problem}", path.display())]
    Manifest { path: PathBuf, problem: String },
    #[error("{}: sidecar metadata: {problem}", path.display())]
    Sidecar { path: PathBuf, problem: String },
    #[error("{}: output directory does not exist", dir.display())]
    OutputDirMissing { dir: PathBuf },
    /// A path the run writes names a file it reads or another output writes
    /// ([`crate::atomic::ensure_no_clobber`]): a usage error, refused before any work.
    #[error(
        "{} ({written_flag}) is the same file as {} ({other_flag}){}",
        written.display(),
        other.display(),
        if *other_is_read {
            ", which this run reads: writing it would destroy the input; choose another path"
        } else {
            ": two outputs cannot share a file; give each its own path"
        }
    )]
    PathClash {
        written: PathBuf,
        written_flag: String,
        other: PathBuf,
        other_flag: String,
        other_is_read: bool,
    },
    /// A file where the output's sidecar goes that is not its old sidecar
    /// ([`crate::sidecar::ensure_old_sidecar_replaceable`]).
    #[error(
        "{}: refusing to replace or remove it: it is where the sidecar of {} goes, but this file {reason}; move or delete it yourself",
        path.display(),
        output.display()
    )]
    ForeignSidecar {
        path: PathBuf,
        output: PathBuf,
        reason: String,
    },
    #[error("{}: is {kind}, not a regular file", path.display())]
    NotRegularFile { path: PathBuf, kind: &'static str },
    #[error("{}: the file shrank while being read (truncated or rewritten by another process?): {source}", path.display())]
    Truncated {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, action: &'static str, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            action,
            source,
        }
    }

    pub fn tensor(
        path: impl Into<PathBuf>,
        tensor: &str,
        problem: impl Into<TensorProblem>,
    ) -> Self {
        Error::Tensor {
            path: path.into(),
            tensor: tensor.to_string(),
            problem: problem.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
