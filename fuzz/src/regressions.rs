//! Replays `testdata/fuzz-regressions/<target>/*` through a harness, as the
//! crates' ordinary tests do. Beside an input, `<input>.expected` holds text
//! its error must contain; an input without one must simply not panic.

use std::path::{Path, PathBuf};

/// `testdata/fuzz-regressions` of the repository holding `crate_dir` (a
/// crate's `CARGO_MANIFEST_DIR`, one or two levels below the root).
pub fn regressions_dir(crate_dir: &str) -> PathBuf {
    Path::new(crate_dir)
        .ancestors()
        .map(|dir| dir.join("testdata/fuzz-regressions"))
        .find(|dir| dir.is_dir())
        .expect("testdata/fuzz-regressions exists above the crate")
}

/// The saved inputs of `target` in `regressions`, in name order.
pub fn inputs(regressions: &Path, target: &str) -> Vec<PathBuf> {
    let dir = regressions.join(target);
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_none_or(|ext| ext != "expected"))
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "{} holds no inputs", dir.display());
    inputs
}

/// Runs every saved input of `target` through `harness` (which returns the
/// error text, if any) and checks it against the input's `.expected` text.
pub fn replay(regressions: &Path, target: &str, harness: impl Fn(&[u8]) -> Result<(), String>) {
    for input in inputs(regressions, target) {
        let bytes = std::fs::read(&input).expect("regression input is readable");
        let expected = std::fs::read_to_string(format!("{}.expected", input.display())).ok();
        let outcome = harness(&bytes);
        if let Some(expected) = expected {
            let error = outcome.expect_err(&format!("{} must be rejected", input.display()));
            assert!(
                error.contains(expected.trim()),
                "{}: error {error:?} lacks {:?}",
                input.display(),
                expected.trim()
            );
        }
    }
}
