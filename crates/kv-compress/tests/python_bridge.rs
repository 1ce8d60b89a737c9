//! Runs the Python suites against this build's binary: `test_kv_compress.py`
//! is the original bridge's view of kv-compress, checked with Python
//! safetensors and an independent numpy ADR-002; `test_kvformat_reader.py`
//! checks the Python reader the wheel ships (`crates/kv-compress/python`)
//! against `-decompress` for every method. Missing python3, numpy or
//! safetensors is a failure, not a skip: the contract is untested without them.

use std::path::Path;
use std::process::Command;

/// Runs `tests/python/SCRIPT` with this build's kv-compress and the source
/// tree's `kvformat` package; fails unless it ends with "N passed".
fn run_python_suite(script: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("../../tests/python").join(script);
    let output = Command::new("python3")
        .arg(&script)
        .env("KV_COMPRESS_BIN", env!("CARGO_BIN_EXE_kv-compress"))
        .env("PYTHONPATH", root.join("python"))
        .output()
        .unwrap_or_else(|e| panic!("python3 is required to run {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if stderr.contains("ModuleNotFoundError") {
        panic!("the Python test needs numpy and safetensors: `pip install numpy safetensors`\n{stderr}");
    }
    assert!(
        output.status.success(),
        "{} failed:\n{stdout}\n{stderr}",
        script.display()
    );
    assert!(stdout.trim_end().ends_with(" passed"), "{stdout}");
}

#[test]
fn python_bridge_contract() {
    run_python_suite("test_kv_compress.py");
}

#[test]
fn python_reader_matches_decompress_for_every_method() {
    run_python_suite("test_kvformat_reader.py");
}
