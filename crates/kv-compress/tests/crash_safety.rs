//! Crash safety and concurrent writers, on the real binary.
//!
//! - `kill -9` at seeded random moments while compressing a 48 MB cache over
//!   an existing output: the output path then holds the previous file byte
//!   for byte or the complete new one, never a part; the input is unchanged.
//!   A killed run may leave its temp file (`.kv-compress-*.tmp`, see
//!   docs/reliability.md) beside the output, and nothing else.
//! - Two processes compressing different inputs to one output path at once
//!   leave exactly one of the two complete outputs.
//! - Files claiming terabytes fail cleanly (exit 1, one error line) under a
//!   256 MiB address-space limit in which a valid cache still compresses: the
//!   binary never tries to allocate what a file merely claims.

#[path = "../../../fuzz/src/checksums.rs"]
mod checksums;
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use kvformat::CacheDtype;

/// 24 layers x key/value of [1, 4, 1024, 64] F32: 48 MB.
const LAYERS: usize = 24;
const SHAPE: [usize; 4] = [1, 4, 1024, 64];
const KILLS: u64 = 12;
/// Kills meant to land mid-write come this soon after the temp file appears.
const WRITE_WINDOW: Duration = Duration::from_millis(15);

fn compress_command(input: &Path, output: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kv-compress"));
    command
        .args(["-input", s(input), "-output", s(output)])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

/// The complete output of compressing `input` (deterministic), made apart.
fn reference_output(input: &Path, scratch: &Path) -> Vec<u8> {
    let reference = scratch.join("reference.safetensors");
    assert!(compress_command(input, &reference)
        .status()
        .unwrap()
        .success());
    let restored = scratch.join("reference.restored.safetensors");
    run_json(&[
        "-decompress",
        "-input",
        s(&reference),
        "-output",
        s(&restored),
    ]);
    std::fs::read(&reference).unwrap()
}

/// Whether `name` is the temp file a killed writer leaves (docs/reliability.md).
fn is_writer_temp_file(name: &str) -> bool {
    name.starts_with(".kv-compress-") && name.ends_with(".tmp")
}

/// Seeded delays (xorshift), uniform in `[0, limit)`.
fn delays(seed: u64, limit: Duration) -> impl Iterator<Item = Duration> {
    let mut state = seed | 1;
    std::iter::repeat_with(move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        limit.mul_f64((state >> 11) as f64 / (1u64 << 53) as f64)
    })
}

fn names_in(dir: &Path) -> Vec<String> {
    files_in(dir)
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn kill_9_at_random_moments_leaves_the_old_or_the_complete_new_output() {
    let inputs = tempfile::tempdir().unwrap();
    let input = inputs.path().join("cache.safetensors");
    write_kv_cache(&input, CacheDtype::F32, LAYERS, &SHAPE);
    let input_bytes = std::fs::read(&input).unwrap();
    let new_output = reference_output(&input, inputs.path());

    // The previous output: the same cache packed with another group size.
    let work = tempfile::tempdir().unwrap();
    let output = work.path().join("packed.safetensors");
    let mut previous = kv_compress(&[
        "-input",
        s(&input),
        "-output",
        s(&output),
        "-group-size",
        "32",
    ]);
    assert!(previous.status.success(), "{}", stderr(&previous));
    previous.stdout = std::fs::read(&output).unwrap();
    assert_ne!(previous.stdout, new_output);

    let started = Instant::now();
    assert!(
        compress_command(&input, &work.path().join("timing.safetensors"))
            .status()
            .unwrap()
            .success()
    );
    let full_run = started.elapsed();
    std::fs::remove_file(work.path().join("timing.safetensors")).unwrap();

    // Half the kills at random moments of the whole run; half at random
    // moments after the temp file appears, so some surely land mid-write.
    let from_start = delays(0x6b69_6c6c, full_run.mul_f64(1.2))
        .take(KILLS as usize / 2)
        .map(|d| (false, d));
    let mid_write = delays(0x7772_6974, WRITE_WINDOW)
        .take(KILLS as usize / 2)
        .map(|d| (true, d));
    let (mut kept_old, mut got_new, mut temp_files) = (0, 0, 0);
    for (after_temp_file, delay) in from_start.chain(mid_write) {
        let mut child = compress_command(&input, &output).spawn().unwrap();
        if after_temp_file {
            while !names_in(work.path()).iter().any(|n| is_writer_temp_file(n))
                && child.try_wait().unwrap().is_none()
            {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL; an error means it had already exited.
        child.wait().unwrap();

        let now = std::fs::read(&output).unwrap();
        assert!(
            now == previous.stdout || now == new_output,
            "killed after {delay:?}: output is neither old nor new"
        );
        if now == new_output {
            got_new += 1;
            // Back to the old file, so later kills can tell old from new.
            std::fs::write(&output, &previous.stdout).unwrap();
        } else {
            kept_old += 1;
        }
        for name in names_in(work.path()) {
            if is_writer_temp_file(&name) {
                temp_files += 1;
                std::fs::remove_file(work.path().join(&name)).unwrap();
            } else {
                assert_eq!(name, "packed.safetensors", "unexpected file left behind");
            }
        }
        assert!(
            std::fs::read(&input).unwrap() == input_bytes,
            "the input was modified"
        );
    }
    eprintln!("{KILLS} kills (run takes {full_run:?}): {kept_old} kept the old output, {got_new} completed, {temp_files} left a temp file");
    assert!(
        temp_files > 0,
        "no kill landed while the output was being written"
    );
}

#[test]
fn two_writers_to_one_output_leave_one_complete_file() {
    let inputs = tempfile::tempdir().unwrap();
    let input_a = inputs.path().join("a.safetensors");
    let input_b = inputs.path().join("b.safetensors");
    write_kv_cache(&input_a, CacheDtype::F16, 8, &SHAPE);
    write_kv_cache(&input_b, CacheDtype::F32, 6, &SHAPE);
    let expected_a = reference_output(&input_a, &scratch_dir(inputs.path(), "a"));
    let expected_b = reference_output(&input_b, &scratch_dir(inputs.path(), "b"));
    assert_ne!(expected_a, expected_b);

    let work = tempfile::tempdir().unwrap();
    let output = work.path().join("shared.safetensors");
    for _ in 0..4 {
        let mut a = compress_command(&input_a, &output).spawn().unwrap();
        let mut b = compress_command(&input_b, &output).spawn().unwrap();
        assert!(a.wait().unwrap().success() && b.wait().unwrap().success());
        let written = std::fs::read(&output).unwrap();
        assert!(
            written == expected_a || written == expected_b,
            "the output is neither complete file"
        );
        assert_eq!(
            names_in(work.path()),
            ["shared.safetensors"],
            "a writer left a file behind"
        );
        std::fs::remove_file(&output).unwrap();
    }
}

fn scratch_dir(parent: &Path, name: &str) -> PathBuf {
    let dir = parent.join(name);
    std::fs::create_dir(&dir).unwrap();
    dir
}

/// Runs `kv-compress ARGS` with its address space limited to `limit_kib`.
fn kv_compress_limited(limit_kib: u64, args: &[&str]) -> std::process::Output {
    let script = format!("ulimit -v {limit_kib}; exec \"$0\" \"$@\"");
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_kv-compress"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn files_claiming_terabytes_fail_cleanly_in_256_mib_of_address_space() {
    const LIMIT_KIB: u64 = 256 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let valid = dir.path().join("valid.safetensors");
    write_kv_cache(&valid, CacheDtype::F32, 4, &SHAPE);
    let out = dir.path().join("out.safetensors");
    let control = kv_compress_limited(LIMIT_KIB, &["-input", s(&valid), "-output", s(&out)]);
    assert!(
        control.status.success(),
        "a valid cache must compress within the limit: {}",
        stderr(&control)
    );

    // The LZ4 bomb kept as a fuzz regression, with its checksums made valid.
    let bomb = dir.path().join("bomb.safetensors");
    let regression = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../testdata/fuzz-regressions/packed_decoder/lz4-bomb-raw-len-8TB"
    ))
    .unwrap();
    std::fs::write(&bomb, checksums::with_fixed_checksums(&regression)).unwrap();
    let header = dir.path().join("header.safetensors");
    std::fs::write(&header, [&(1u64 << 40).to_le_bytes()[..], b"{}"].concat()).unwrap();
    let cases: [(&[&str], &str); 2] = [
        (
            &["-decompress", "-input", s(&bomb), "-output", s(&out)],
            "more than LZ4 can expand",
        ),
        (
            &["-input", s(&header), "-output", s(&out)],
            "header length is larger than",
        ),
    ];
    for (args, needle) in cases {
        let output = kv_compress_limited(LIMIT_KIB, args);
        let text = stderr(&output);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {text}");
        assert!(
            text.lines().count() == 1 && text.contains(needle),
            "{args:?}: {text}"
        );
    }
}
