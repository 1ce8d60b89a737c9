//! Sharding (issue #22): `--shard I/N` slices run as separate processes and
//! merged, and `--devices cpu,cpu` (a worker process per device), report
//! exactly what a single run reports, times aside; a failing worker fails
//! the run with one line naming it and leaves no output behind.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// `json` without its times: the `timing`/`timings` objects, `wall_seconds`
/// and kv-compress's `processing_time_ms`.
fn without_times(mut json: serde_json::Value) -> serde_json::Value {
    if let Some(object) = json.as_object_mut() {
        for key in ["timing", "timings", "wall_seconds", "processing_time_ms"] {
            object.remove(key);
        }
        for value in object.values_mut() {
            *value = without_times(value.take());
        }
    } else if let Some(array) = json.as_array_mut() {
        for value in array.iter_mut() {
            *value = without_times(value.take());
        }
    }
    json
}

/// Windows of the run: 7, so that 3 shards and 2 workers split unevenly.
const WINDOWS: &str = "7";

struct Fixture {
    dir: tempfile::TempDir,
    model_dir: PathBuf,
    prose: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let model_dir = tiny_model(dir.path()).hf_dir;
        Fixture {
            dir,
            model_dir,
            prose: prose_path(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs kv-validate over the fixture's windows with `extra`.
    fn run(&self, extra: &[&str], compressor: &Path) -> std::process::Output {
        let mut args = short_run_args(
            self.model_dir.to_str().unwrap(),
            self.prose.to_str().unwrap(),
            WINDOWS,
        );
        args.extend(extra);
        kv_validate(&args, compressor)
    }

    /// The `--json` report of a single run, times aside.
    fn single_run(&self, compressor: &Path) -> serde_json::Value {
        let json = self.path("single.json");
        let output = self.run(&["--json", json.to_str().unwrap()], compressor);
        assert!(matches!(output.status.code(), Some(0 | 1)), "{output:?}");
        without_times(read_json(&json))
    }
}

#[test]
fn shards_run_apart_and_merged_report_the_single_run() {
    let fixture = Fixture::new();
    let compressor = kv_compress();
    let single = fixture.single_run(&compressor);
    let mut files = Vec::new();
    for shard in 0..3 {
        let records = fixture.path(&format!("shard-{shard}.json"));
        let shard_arg = format!("{shard}/3");
        let mut args = vec![
            "--shard",
            &shard_arg,
            "--records",
            records.to_str().unwrap(),
        ];
        // A cluster node with several devices runs its shard over them.
        if shard == 0 {
            args.extend(["--devices", "cpu,cpu"]);
        }
        expect_success(&fixture.run(&args, &compressor));
        let windows: Vec<u64> = read_json(&records)["windows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["index"].as_u64().unwrap())
            .collect();
        // 7 windows in 3 balanced shards: 0..3, 3..5, 5..7.
        let expected: Vec<u64> = [0..3, 3..5, 5..7][shard].clone().collect();
        assert_eq!(windows, expected, "shard {shard}");
        files.push(records.to_str().unwrap().to_string());
    }
    let merged = fixture.path("merged.json");
    let mut args = vec!["merge"];
    args.extend(files.iter().map(String::as_str));
    args.extend(["--json", merged.to_str().unwrap()]);
    let output = kv_validate(&args, &compressor);
    assert!(matches!(output.status.code(), Some(0 | 1)), "{output:?}");
    assert_eq!(without_times(read_json(&merged)), single);
}

#[test]
fn cpu_workers_report_the_single_run() {
    let fixture = Fixture::new();
    let compressor = kv_compress();
    let single = fixture.single_run(&compressor);
    let json = fixture.path("workers.json");
    let records = fixture.path("workers-records.json");
    let output = fixture.run(
        &[
            "--devices",
            "cpu,cpu,cpu",
            "--json",
            json.to_str().unwrap(),
            "--records",
            records.to_str().unwrap(),
        ],
        &compressor,
    );
    assert!(matches!(output.status.code(), Some(0 | 1)), "{output:?}");
    assert_eq!(without_times(read_json(&json)), single);
    assert_eq!(read_json(&records)["windows"].as_array().unwrap().len(), 7);
}

#[test]
fn a_failing_worker_fails_the_run_naming_it_and_leaves_no_output() {
    let fixture = Fixture::new();
    // The first decompression anywhere fails; the other worker's succeed,
    // so one worker fails while the other still runs.
    let lock = fixture.path("failed-once");
    let compressor = scripted_compressor(
        fixture.dir.path(),
        "fails-once",
        &format!(
            "if mkdir {} 2>/dev/null; then echo 'scripted failure' >&2; exit 3; fi",
            lock.display()
        ),
    );
    let scratch = fixture.path("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let json = fixture.path("report.json");
    let records = fixture.path("records.json");
    let output = fixture.run(
        &[
            "--devices",
            "cpu,cpu",
            "--scratch-dir",
            scratch.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
            "--records",
            records.to_str().unwrap(),
        ],
        &compressor,
    );
    let error = expect_error(&output);
    assert!(
        error.contains("(device cpu) failed:") && error.starts_with("error: worker "),
        "{error}"
    );
    assert!(error.contains("scripted failure"), "{error}");
    assert!(!json.exists() && !records.exists(), "an output was written");
    let left: Vec<_> = std::fs::read_dir(&scratch).unwrap().collect();
    assert!(left.is_empty(), "scratch files left: {left:?}");
}

/// The parent dies of the signal; its workers get SIGTERM from the kernel
/// (PR_SET_PDEATHSIG), kill their kv-compress and remove their files.
#[test]
fn a_signal_to_the_parent_stops_the_workers_which_clean_up() {
    let fixture = Fixture::new();
    // Decompression hangs, so the workers are mid-run when the signal comes.
    let compressor = scripted_compressor(fixture.dir.path(), "hangs", "sleep 60");
    let scratch = fixture.path("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let mut args = short_run_args(
        fixture.model_dir.to_str().unwrap(),
        fixture.prose.to_str().unwrap(),
        WINDOWS,
    );
    args.extend(["--devices", "cpu,cpu", "--scratch-dir"]);
    args.push(scratch.to_str().unwrap());
    let mut parent = std::process::Command::new(env!("CARGO_BIN_EXE_kv-validate"))
        .args(&args)
        .env("KV_COMPRESS_PATH", &compressor)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The parent's directory holds the workers' records and scratch.
    let entries = || std::fs::read_dir(&scratch).unwrap().count();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while entries() < 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_secs(3));
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe {
        libc::kill(parent.id() as i32, libc::SIGTERM);
    }
    parent.wait().unwrap();
    // The workers get SIGTERM as their parent dies and remove their files.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while entries() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let left: Vec<_> = std::fs::read_dir(&scratch).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
