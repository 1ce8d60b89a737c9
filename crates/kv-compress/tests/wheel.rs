//! The Python user's install: `pip install ./crates/kv-compress` into a fresh
//! venv (no system site-packages) builds the maturin wheel and puts
//! `kv-compress` in the venv's `bin/`; with the venv's `bin/` on PATH, as
//! activation puts it, and no `KV_COMPRESS_PATH`, the original bridge's
//! lookup finds that binary, the bridge's calls (`test_kv_compress.py`) pass
//! through it, and the installed `kvformat` reader agrees with its
//! `-decompress` (`test_kvformat_reader.py`). Needs python3 with venv and
//! PyPI (numpy, safetensors, the maturin build backend): without them this
//! fails, it does not skip.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The target directory this test was built in, so the wheel's build reuses
/// the release artifacts instead of compiling kv-compress from scratch.
fn target_dir() -> PathBuf {
    let binary = Path::new(env!("CARGO_BIN_EXE_kv-compress"));
    binary
        .ancestors()
        .nth(2)
        .expect("target/<profile>/kv-compress")
        .to_path_buf()
}

/// Runs `program args` in `env`, failing the test with its output on error.
fn run(program: &Path, args: &[&str], path: &OsString, what: &str) -> String {
    let output = Command::new(program)
        .args(args)
        .env("PATH", path)
        .env("CARGO_TARGET_DIR", target_dir())
        .env_remove("KV_COMPRESS_PATH")
        .env_remove("KV_COMPRESS_BIN")
        .env_remove("PYTHONPATH")
        .env_remove("PYTHONHOME")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {}: {e}", program.display()));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{what} failed:\n{stdout}\n{stderr}"
    );
    stdout
}

#[test]
fn pip_installed_wheel_serves_the_bridge_and_the_reader() {
    let dir = tempfile::tempdir().unwrap();
    let venv = dir.path().join("venv");
    let system_path = std::env::var_os("PATH").unwrap_or_default();
    run(
        Path::new("python3"),
        &["-m", "venv", venv.to_str().unwrap()],
        &system_path,
        "python3 -m venv",
    );
    let bin = venv.join("bin");
    let python = bin.join("python");
    let mut path = OsString::from(&bin);
    path.push(":");
    path.push(&system_path);

    let crate_dir = env!("CARGO_MANIFEST_DIR");
    run(
        &python,
        &["-m", "pip", "install", "--quiet", crate_dir],
        &path,
        "pip install ./crates/kv-compress",
    );
    // The wheel needs numpy alone; safetensors is the bridge suite's own dependency.
    run(
        &python,
        &["-m", "pip", "install", "--quiet", "safetensors"],
        &path,
        "pip install safetensors",
    );

    let located = run(
        &python,
        &[
            "-c",
            "import shutil, kvformat; print(shutil.which('kv-compress')); print(kvformat.__file__)",
        ],
        &path,
        "locating kv-compress and kvformat",
    );
    let mut lines = located.lines().map(Path::new);
    assert_eq!(
        lines.next(),
        Some(bin.join("kv-compress").as_path()),
        "PATH lookup: {located}"
    );
    assert!(
        lines.next().is_some_and(|p| p.starts_with(&venv)),
        "kvformat not from the venv: {located}"
    );

    let suites = Path::new(crate_dir).join("../../tests/python");
    for suite in ["test_kv_compress.py", "test_kvformat_reader.py"] {
        let script = suites.join(suite);
        let stdout = run(&python, &[script.to_str().unwrap()], &path, suite);
        assert!(stdout.trim_end().ends_with(" passed"), "{suite}:\n{stdout}");
    }
}
