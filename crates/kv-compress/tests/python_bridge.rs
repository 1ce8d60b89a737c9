//! Runs tests/python/test_kv_compress.py against this build's binary: the
//! original bridge's view of kv-compress, checked with Python safetensors and
//! an independent numpy ADR-002. Missing python3, numpy or safetensors is a
//! failure, not a skip: the contract is untested without them.

use std::path::Path;
use std::process::Command;

#[test]
fn python_bridge_contract() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/python/test_kv_compress.py");
    let output = Command::new("python3")
        .arg(&script)
        .env("KV_COMPRESS_BIN", env!("CARGO_BIN_EXE_kv-compress"))
        .output()
        .unwrap_or_else(|e| panic!("python3 is required to run {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if stderr.contains("ModuleNotFoundError") {
        panic!("the Python test needs numpy and safetensors: `pip install numpy safetensors`\n{stderr}");
    }
    assert!(output.status.success(), "{} failed:\n{stdout}\n{stderr}", script.display());
    assert!(stdout.trim_end().ends_with(" passed"), "{stdout}");
}
