//! Issue 10's kv-validate items, through the binary: a compressor that hangs,
//! floods its pipes or is interrupted by a signal is killed with everything
//! it started and leaves no scratch directory; nothing measured is not a
//! pass; errors stay one line under RUST_BACKTRACE; the JSON report gets a
//! plain file's mode.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// 2 back-to-back windows of 32 context + 16 targets on the prose fixture.
fn small_run_args(model_dir: &Path) -> Vec<String> {
    let prose = prose_path();
    short_run_args(model_dir.to_str().unwrap(), prose.to_str().unwrap(), "2")
        .into_iter()
        .map(String::from)
        .collect()
}

/// A compressor that records its pid and its child's in `dir/pids`, then
/// waits forever on a `sleep` it started (a grandchild of kv-validate).
fn hanging_compressor(dir: &Path) -> PathBuf {
    let pids = dir.join("pids");
    write_script(
        dir,
        "hanging-kv-compress",
        &format!(
            "#!/bin/sh\necho $$ >> '{0}'\nsleep 1000 &\necho $! >> '{0}'\nwait\n",
            pids.display()
        ),
    )
}

/// The pids `hanging_compressor` recorded, once both are there.
fn recorded_pids(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("pids"))
        .unwrap_or_default()
        .lines()
        .map(|line| line.trim().parse().unwrap())
        .collect()
}

/// Whether `pid` has ended: no such process, or a zombie (dead, waiting
/// for whoever reaps orphans).
fn ended(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(") ")
            .next()
            .is_some_and(|rest| rest.starts_with('Z')),
    }
}

/// Kills the processes a test's compressor recorded, even when the test
/// fails, so no `sleep 1000` outlives it.
struct KillOnDrop(PathBuf);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for pid in recorded_pids(&self.0) {
            let _ = Command::new("kill")
                .args(["-9", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Asserts that every recorded process ends within a second.
fn assert_all_ended(pids: &[i32]) {
    let deadline = Instant::now() + Duration::from_secs(1);
    while !pids.iter().all(|&pid| ended(pid)) {
        assert!(
            Instant::now() < deadline,
            "still running: {:?}",
            pids.iter().filter(|&&pid| !ended(pid)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Entries of `tmp` that are kv-validate's scratch directories (`kv-validate-*`).
fn scratch_dirs_left(tmp: &Path) -> Vec<String> {
    std::fs::read_dir(tmp)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("kv-validate-"))
        .collect()
}

/// `args` with the scratch directory in `scratch`.
fn with_scratch_in(args: &[String], scratch: &Path) -> Vec<String> {
    let mut args = args.to_vec();
    args.extend(["--scratch-dir".into(), scratch.to_str().unwrap().into()]);
    args
}

/// Runs kv-validate with `args`, `compressor` and its scratch directory in
/// `scratch` (its temp directory too, for anything else it might put there).
fn run_with_scratch_in(args: &[String], compressor: &Path, scratch: &Path) -> std::process::Output {
    let args = with_scratch_in(args, scratch);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    kv_validate_with_env(
        &args,
        &[
            ("KV_COMPRESS_PATH", compressor.as_os_str()),
            ("TMPDIR", scratch.as_os_str()),
        ],
    )
}

#[test]
fn a_hung_compressor_is_killed_at_the_timeout_with_its_children_and_scratch_dir() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let _cleanup = KillOnDrop(dir.path().to_path_buf());
    let model = tiny_model(dir.path());
    let compressor = hanging_compressor(dir.path());
    let mut args = small_run_args(&model.hf_dir);
    args.extend(["--compress-timeout".into(), "2".into()]);

    let started = Instant::now();
    let output = run_with_scratch_in(&args, &compressor, tmp.path());
    let elapsed = started.elapsed();
    let error = expect_error(&output);
    assert!(
        error.contains("did not finish within 2 s")
            && error.contains("--compress-timeout")
            && error.contains("hanging-kv-compress"),
        "{error}"
    );
    assert!(elapsed < Duration::from_secs(15), "took {elapsed:?}");
    // With windows in flight together (--pipeline-depth, default 3) more
    // than one window's compressor may have started before the first timed
    // out: each ran with its sleep, and every one of them must be gone.
    let pids = recorded_pids(dir.path());
    assert!(
        pids.len() >= 2,
        "the compressor and its sleep ran: {pids:?}"
    );
    assert_all_ended(&pids);
    assert_eq!(scratch_dirs_left(tmp.path()), Vec::<String>::new());
}

/// Starts kv-validate on the hanging compressor, waits until the compressor
/// and its child run, sends `signal` (a `kill` name), and returns how
/// kv-validate ended, its stderr and the compressor's pids.
fn interrupt_a_hung_compressor(signal: &str) -> (ExitStatus, String, Vec<i32>, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let _cleanup = KillOnDrop(dir.path().to_path_buf());
    let model = tiny_model(dir.path());
    let compressor = hanging_compressor(dir.path());
    let mut child: Child = Command::new(env!("CARGO_BIN_EXE_kv-validate"))
        .args(with_scratch_in(&small_run_args(&model.hf_dir), tmp.path()))
        .env("KV_COMPRESS_PATH", &compressor)
        .env("TMPDIR", tmp.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while recorded_pids(dir.path()).len() < 2 {
        assert!(Instant::now() < deadline, "the compressor never started");
        assert!(
            child.try_wait().unwrap().is_none(),
            "kv-validate ended early"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        !scratch_dirs_left(tmp.path()).is_empty(),
        "the scratch directory exists while the compressor runs"
    );
    let sent = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("kv-validate did not stop on SIG{signal}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let pids = recorded_pids(dir.path());
    let left = scratch_dirs_left(tmp.path());
    (status, stderr, pids, left)
}

fn assert_stopped_cleanly(signal: &str, number: i32) {
    use std::os::unix::process::ExitStatusExt;
    let (status, stderr, pids, left) = interrupt_a_hung_compressor(signal);
    assert_eq!(
        status.signal(),
        Some(number),
        "dies of the signal: {status:?}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!("stopped by SIG{signal}")),
        "{stderr}"
    );
    assert_all_ended(&pids);
    assert_eq!(left, Vec::<String>::new());
}

#[test]
fn sigterm_kills_the_compressor_group_and_removes_the_scratch_dir() {
    assert_stopped_cleanly("TERM", 15);
}

#[test]
fn ctrl_c_kills_the_compressor_group_and_removes_the_scratch_dir() {
    assert_stopped_cleanly("INT", 2);
}

/// A compressor like `identity_compressor` that first writes `flood` (shell
/// code) to stdout or stderr.
fn flooding_compressor(dir: &Path, flood: &str) -> PathBuf {
    write_script(
        dir,
        "flooding-kv-compress",
        &format!(
            r#"#!/bin/sh
while [ $# -gt 0 ]; do
  case "$1" in
    -input) input=$2; shift ;;
    -output) output=$2; shift ;;
  esac
  shift
done
cp "$input" "$output" || exit 1
{flood}
size=$(wc -c < "$input")
printf '{{"compression_ratio": 1.0, "original_size_bytes": %d, "compressed_size_bytes": %d, "rmse": 0.0, "snr_db": 100.0, "cosine_similarity": 1.0, "max_error": 0.0, "quality_level": "EXCELLENT", "processing_time_ms": 1.0, "quality_passed": true, "violations": []}}\n' "$size" "$size"
"#
        ),
    )
}

#[test]
fn a_compressor_flooding_stdout_is_an_error_naming_it() {
    // 3 MB of spaces before the JSON: still valid JSON, so only the cap stops it.
    let dir = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let compressor = flooding_compressor(dir.path(), "head -c 3000000 /dev/zero | tr '\\0' ' '");
    let output = run_with_scratch_in(&small_run_args(&model.hf_dir), &compressor, tmp.path());
    let error = expect_error(&output);
    assert!(
        error.contains("flooding-kv-compress") && error.contains("more than 1024 KiB on stdout"),
        "{error}"
    );
    assert_eq!(scratch_dirs_left(tmp.path()), Vec::<String>::new());
}

#[test]
fn a_failing_compressor_flooding_stderr_gives_a_bounded_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let compressor = write_script(
        dir.path(),
        "loud-kv-compress",
        "#!/bin/sh\necho 'Error: the first words'>&2\nhead -c 5000000 /dev/zero | tr '\\0' x >&2\nexit 1\n",
    );
    let args = small_run_args(&model.hf_dir);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let error = expect_error(&kv_validate(&args, &compressor));
    assert!(error.len() < 16 << 10, "{} bytes", error.len());
    assert!(
        error.contains("Error: the first words")
            && error.contains("more bytes of stderr not shown"),
        "{}",
        &error[..500]
    );
}

/// A compressor that must never be asked: it prints garbage.
fn garbage_compressor(dir: &Path) -> PathBuf {
    write_script(dir, "garbage-kv-compress", "#!/bin/sh\necho garbage\n")
}

#[test]
fn one_target_per_window_measures_nothing_and_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let prose = prose_path();
    let args = [
        "--model-dir",
        model.hf_dir.to_str().unwrap(),
        "--text-file",
        prose.to_str().unwrap(),
        "--context",
        "32",
        "--targets",
        "1",
        "--max-windows",
        "3",
        "--quiet",
    ];
    let compressor = garbage_compressor(dir.path());
    let error = expect_error(&kv_validate(&args, &compressor));
    assert!(
        error.contains("none of the 3 window(s)")
            && error.contains("nothing would be measured")
            && error.contains("--targets 2"),
        "{error}"
    );
    // The same for a sweep.
    let mut sweep = args.to_vec();
    sweep.extend(["--variant", "int8=-bits 8"]);
    let error = expect_error(&kv_validate(&sweep, &compressor));
    assert!(error.contains("nothing would be measured"), "{error}");
}

#[test]
fn a_single_sliding_window_has_no_context_and_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let prose = prose_path();
    let args = [
        "--model-dir",
        model.hf_dir.to_str().unwrap(),
        "--text-file",
        prose.to_str().unwrap(),
        "--max-windows",
        "1",
        "--quiet",
    ];
    let error = expect_error(&kv_validate(&args, &garbage_compressor(dir.path())));
    assert!(
        error.contains("none of the 1 window(s)") && error.contains("--max-windows 2"),
        "{error}"
    );
}

/// Stderr of a run that must fail with one error line and no backtrace,
/// with RUST_BACKTRACE=1 set.
fn one_line_error_under_backtrace(args: &[&str], dir: &Path) -> String {
    let compressor = identity_compressor(dir);
    let output = kv_validate_with_env(
        args,
        &[
            ("KV_COMPRESS_PATH", compressor.as_os_str()),
            ("RUST_BACKTRACE", OsStr::new("1")),
        ],
    );
    let error = expect_error(&output);
    for trace in ["backtrace", "stack backtrace", ".rs:", " 0: "] {
        assert!(!error.contains(trace), "{trace:?} in {error}");
    }
    error
}

#[test]
fn gguf_errors_are_one_line_with_the_cause_once_under_rust_backtrace() {
    let dir = tempfile::tempdir().unwrap();
    let files = tiny_model(dir.path());
    // Not a GGUF: candle's error for the magic.
    let garbage = dir.path().join("garbage.gguf");
    std::fs::write(&garbage, [0x42u8; 64]).unwrap();
    let error = one_line_error_under_backtrace(
        &["--gguf", garbage.to_str().unwrap(), "--quiet"],
        dir.path(),
    );
    assert!(
        error.contains("garbage.gguf: not a readable GGUF file"),
        "{error}"
    );
    assert_eq!(error.matches("unknown magic").count(), 1, "{error}");
    // A header cut short: an I/O error from inside candle, once.
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &std::fs::read(&files.gguf).unwrap()[..6]).unwrap();
    let error =
        one_line_error_under_backtrace(&["--gguf", cut.to_str().unwrap(), "--quiet"], dir.path());
    assert_eq!(
        error.matches("failed to fill whole buffer").count(),
        1,
        "{error}"
    );
    // Tensors cut short: the weights error, past the metadata.
    let bytes = std::fs::read(&files.gguf).unwrap();
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let error = one_line_error_under_backtrace(
        &["--gguf", truncated.to_str().unwrap(), "--quiet"],
        dir.path(),
    );
    assert!(
        error.contains("truncated.gguf: cannot load weights"),
        "{error}"
    );
}

#[test]
fn hf_weight_errors_are_one_line_under_rust_backtrace() {
    // A tensor missing from model.safetensors: candle's lookup error.
    let dir = tempfile::tempdir().unwrap();
    let files = tiny_model(dir.path());
    let weights = files.hf_dir.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<_> = tensors
        .tensors()
        .into_iter()
        .filter(|(name, _)| name != "model.norm.weight")
        .collect();
    std::fs::write(&weights, safetensors::serialize(kept, None).unwrap()).unwrap();
    let error = one_line_error_under_backtrace(
        &["--model-dir", files.hf_dir.to_str().unwrap(), "--quiet"],
        dir.path(),
    );
    assert!(
        error.contains("model.safetensors") && error.contains("model.norm.weight"),
        "{error}"
    );
}

#[cfg(unix)]
#[test]
fn the_json_report_gets_the_mode_a_plain_create_would() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let reference = dir.path().join("created");
    std::fs::File::create(&reference).unwrap();
    let json = dir.path().join("report.json");
    let output = kv_validate(
        &["--quick-test", "--quiet", "--json", json.to_str().unwrap()],
        &kv_compress(),
    );
    expect_success(&output);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode(&json),
        mode(&reference),
        "not the private 0600 of a temp file"
    );
    assert_eq!(read_json(&json)["passed"], true);
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|name| name.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
