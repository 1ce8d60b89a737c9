//! Issue 10 ("Reliability II") on the real binary: inputs truncated while
//! read, outputs that are FIFOs or symlinks, sidecars as inputs and outputs,
//! failures after the output is written, concurrent writers of one pair,
//! allocation failure, and termination signals.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use kvformat::codec::CodecParams;
use kvformat::packed::{pack_tensor, write_packed, PackedFile};
use kvformat::{sidecar_path, write_cache, CacheDtype, CacheTensor, Sidecar};

/// 24 layers x key/value of [1, 4, 1024, 64] F32: 48 MB, long enough to
/// interrupt (the same cache crash_safety.rs kills).
const LAYERS: usize = 24;
const SHAPE: [usize; 4] = [1, 4, 1024, 64];

fn sidecar_for(layers: usize, model: &str) -> Sidecar {
    Sidecar {
        num_layers: layers,
        num_kv_heads: SHAPE[1],
        seq_len: SHAPE[2],
        head_dim: SHAPE[3],
        dtype: "float32".into(),
        model_name: model.into(),
    }
}

/// A cache of `layers` layers of SHAPE with its sidecar.
fn cache_with_sidecar(path: &Path, layers: usize, model: &str) {
    write_kv_cache(path, CacheDtype::F32, layers, &SHAPE);
    sidecar_for(layers, model)
        .write(&sidecar_path(path))
        .unwrap();
}

fn is_temp_file(path: &Path) -> bool {
    let name = path.file_name().unwrap().to_string_lossy();
    name.starts_with(".kv-compress-") && name.ends_with(".tmp")
}

fn temp_files_in(dir: &Path) -> Vec<PathBuf> {
    files_in(dir)
        .into_iter()
        .filter(|p| is_temp_file(p))
        .collect()
}

/// Asserts exit 1 and one `Error:` line containing `needle`.
fn assert_one_line_error(output: &std::process::Output, needle: &str) {
    let text = stderr(output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.starts_with("Error: ") && text.lines().count() == 1 && text.contains(needle),
        "{text:?} lacks {needle:?}"
    );
}

fn command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kv-compress"));
    command
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

#[test]
fn an_input_truncated_mid_run_is_a_clean_error_not_sigbus() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("growing.safetensors");
    write_kv_cache(&input, CacheDtype::F32, LAYERS, &SHAPE);
    let bytes = std::fs::read(&input).unwrap();
    let output = dir.path().join("out.safetensors");
    let started = Instant::now();
    let run = command(&["-input", s(&input), "-output", s(&output), "-reconstruct"])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    let full_run = started.elapsed();
    let mut truncated_mid_read = 0;
    // At least 8 runs; then more (up to 48) until one truncation has landed
    // during a read: the moment is a guess from one timed run, and a loaded
    // machine moves it, so a fixed count would make this test flaky.
    for i in 1..=48u32 {
        if i > 8 && truncated_mid_read > 0 {
            break;
        }
        std::fs::write(&input, &bytes).unwrap();
        let mode = if i % 2 == 0 {
            "-reconstruct"
        } else {
            "-metrics-only"
        };
        let child = command(&["-input", s(&input), "-output", s(&output), mode])
            .spawn()
            .unwrap();
        // Truncate at moments spread over the run, as log rotation would.
        std::thread::sleep(full_run.mul_f64(f64::from(i % 10 + 1) / 12.0));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&input)
            .unwrap()
            .set_len(4096)
            .unwrap();
        let result = child.wait_with_output().unwrap();
        let text = stderr(&result);
        assert!(
            result.status.signal().is_none(),
            "killed by signal {:?}: {text}",
            result.status.signal()
        );
        if !result.status.success() {
            assert_one_line_error(&result, "growing.safetensors");
            truncated_mid_read += usize::from(text.contains("shrank while being read"));
        }
        assert!(
            temp_files_in(dir.path()).is_empty(),
            "a temp file was left behind"
        );
    }
    assert!(
        truncated_mid_read > 0,
        "no truncation landed while the input was being read"
    );
}

#[test]
fn a_fifo_output_is_written_through_and_stays_a_fifo() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("kv.safetensors");
    cache_with_sidecar(&input, 2, "m");
    let reference = dir.path().join("reference.safetensors");
    run_json(&["-input", s(&input), "-output", s(&reference)]);
    let fifo = dir.path().join("out.fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read(fifo).unwrap())
    };
    run_json(&["-input", s(&input), "-output", s(&fifo)]);
    assert!(
        std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo(),
        "the FIFO was replaced by a file"
    );
    assert_eq!(
        reader.join().unwrap(),
        std::fs::read(&reference).unwrap(),
        "the reader got other bytes"
    );
    assert!(
        !sidecar_path(&fifo).exists(),
        "no sidecar is written beside a FIFO"
    );
    assert!(temp_files_in(dir.path()).is_empty());
}

#[test]
fn a_symlink_output_is_kept_and_its_target_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let input = dir.path().join("kv.safetensors");
    cache_with_sidecar(&input, 2, "m");
    let reference = dir.path().join("reference.safetensors");
    run_json(&["-input", s(&input), "-output", s(&reference)]);
    let target = elsewhere.path().join("real.safetensors");
    std::fs::write(&target, b"old").unwrap();
    let link = dir.path().join("link.safetensors");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    run_json(&["-input", s(&input), "-output", s(&link)]);
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink(),
        "the link was replaced"
    );
    assert_eq!(
        std::fs::read(&target).unwrap(),
        std::fs::read(&reference).unwrap()
    );
    assert!(temp_files_in(dir.path()).is_empty() && temp_files_in(elsewhere.path()).is_empty());
}

#[test]
fn no_output_or_its_sidecar_may_be_an_input_or_its_sidecar() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("kv.safetensors");
    cache_with_sidecar(&input, 2, "m");
    let input_sidecar = std::fs::read(sidecar_path(&input)).unwrap();
    // -output is the input's sidecar.
    let output = command(&["-input", s(&input), "-output", s(&sidecar_path(&input))])
        .output()
        .unwrap();
    // A usage error: exit 2, the output and the input's sidecar named with their roles.
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("(-output) is the same file as"));
    assert!(stderr(&output).contains("(-input's sidecar)"));
    assert_eq!(
        std::fs::read(sidecar_path(&input)).unwrap(),
        input_sidecar,
        "the input's sidecar was clobbered"
    );
    // A packed input whose name is the output's sidecar path.
    let packed = dir.path().join("restored.metadata.json");
    run_json(&["-input", s(&input), "-output", s(&packed)]);
    let packed_bytes = std::fs::read(&packed).unwrap();
    let restored = dir.path().join("restored.safetensors");
    let output = command(&["-decompress", "-input", s(&packed), "-output", s(&restored)])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("restored.metadata.json (-output's sidecar)"));
    assert_eq!(
        std::fs::read(&packed).unwrap(),
        packed_bytes,
        "the packed input was overwritten"
    );
    assert!(!restored.exists());
}

#[test]
fn a_failed_sidecar_write_leaves_the_old_pair() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("kv.safetensors");
    cache_with_sidecar(&input, 2, "m");
    // The output's name fits the file system's 255 bytes; its sidecar's does not.
    let output = dir.path().join(format!("{}.s", "o".repeat(250)));
    std::fs::write(&output, b"old output").unwrap();
    let run = command(&["-input", s(&input), "-output", s(&output)])
        .output()
        .unwrap();
    assert_one_line_error(&run, ".metadata.json");
    assert!(
        !stderr(&run).contains(".kv-compress-"),
        "the message names a temp file: {}",
        stderr(&run)
    );
    assert_eq!(
        std::fs::read(&output).unwrap(),
        b"old output",
        "the output was replaced by a failed run"
    );
    assert!(temp_files_in(dir.path()).is_empty());
}

#[test]
fn an_unwritable_stdout_leaves_the_old_output() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("kv.safetensors");
    cache_with_sidecar(&input, 2, "m");
    let output = dir.path().join("out.safetensors");
    std::fs::write(&output, b"old output").unwrap();
    // A pipe nobody reads: its read end is closed before the report is written.
    let mut child = command(&["-input", s(&input), "-output", s(&output)])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let run = child.wait_with_output().unwrap();
    assert_one_line_error(&run, "cannot write the report to stdout");
    assert_eq!(std::fs::read(&output).unwrap(), b"old output");
    assert!(!sidecar_path(&output).exists());
    assert!(temp_files_in(dir.path()).is_empty());
}

#[test]
fn concurrent_writers_leave_a_pair_from_one_run() {
    // Two caches of one size and values, told apart by their model name (in
    // the packed file's carried metadata and in the sidecar), so the two runs
    // take the same time and their renames interleave.
    let dir = tempfile::tempdir().unwrap();
    let values = normal_values(SHAPE.iter().product(), 1);
    let names: Vec<String> = (0..3)
        .flat_map(|i| ["key", "value"].map(|k| format!("layer_{i}_{k}")))
        .collect();
    let inputs: Vec<PathBuf> = ["model-a", "model-b"]
        .iter()
        .map(|model| {
            let path = dir.path().join(format!("{model}.safetensors"));
            let tensors: Vec<CacheTensor<'_>> = names
                .iter()
                .map(|name| CacheTensor {
                    name,
                    dtype: CacheDtype::F32,
                    shape: &SHAPE,
                    values: &values,
                })
                .collect();
            write_cache(
                &path,
                &tensors,
                &BTreeMap::from([("model_name".to_string(), model.to_string())]),
            )
            .unwrap();
            sidecar_for(3, model).write(&sidecar_path(&path)).unwrap();
            path
        })
        .collect();
    let work = tempfile::tempdir().unwrap();
    let output = work.path().join("shared.safetensors");
    for round in 0..16 {
        let children: Vec<_> = inputs
            .iter()
            .map(|input| {
                command(&["-input", s(input), "-output", s(&output)])
                    .spawn()
                    .unwrap()
            })
            .collect();
        for child in children {
            assert!(child.wait_with_output().unwrap().status.success());
        }
        let packed = PackedFile::open(&output).unwrap();
        let sidecar = Sidecar::read(&sidecar_path(&output)).unwrap();
        assert_eq!(
            Some(&sidecar.model_name),
            packed.manifest().input_metadata.get("model_name"),
            "round {round}: the output of one run beside the sidecar of the other"
        );
        assert_eq!(
            files_in(work.path()).len(),
            2,
            "a writer left a file behind"
        );
    }
}

#[test]
fn decompress_checks_the_sidecar_it_copies() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("kv.safetensors");
    cache_with_sidecar(&input, 2, "m");
    let packed = dir.path().join("kv.int4.safetensors");
    run_json(&["-input", s(&input), "-output", s(&packed)]);
    sidecar_for(5, "m").write(&sidecar_path(&packed)).unwrap();
    let restored = dir.path().join("restored.safetensors");
    let run = command(&["-decompress", "-input", s(&packed), "-output", s(&restored)])
        .output()
        .unwrap();
    assert_one_line_error(
        &run,
        "kv.int4.metadata.json: sidecar metadata: disagrees with",
    );
    assert!(!restored.exists() && !sidecar_path(&restored).exists());
}

#[test]
fn a_cache_the_packed_reader_would_refuse_is_refused_up_front() {
    let dir = tempfile::tempdir().unwrap();
    // ~50 MB of input metadata: the packed header would hold it twice.
    let input = dir.path().join("meta.safetensors");
    let header = format!(
        r#"{{"__metadata__":{{"note":"{}"}},"layer_0_key":{{"dtype":"F32","shape":[1,1,1,64],"data_offsets":[0,256]}}}}"#,
        "x".repeat(50_000_000)
    );
    std::fs::write(&input, raw_safetensors(&header, &[0; 256])).unwrap();
    let output = dir.path().join("out.safetensors");
    let run = command(&["-input", s(&input), "-output", s(&output)])
        .output()
        .unwrap();
    assert_one_line_error(
        &run,
        "stored twice, more than the 100000000-byte header limit",
    );
    assert!(!output.exists());
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
fn a_small_lz4_payload_claiming_more_than_memory_holds_is_an_error_naming_the_bytes() {
    // A 2-bit payload of 2^27 values: valid f16 scales of 1.0 and codes,
    // 21 MB raw that LZ4 stores in ~80 KB; decoding wants 512 MiB of f32,
    // more than the 256 MiB address space allows.
    const VALUES: usize = 1 << 27;
    let params = CodecParams {
        bits: 2,
        ..CodecParams::adr002(64)
    };
    let small: Vec<f32> = (0..64).map(|i| (i as f32 * 0.1).sin()).collect();
    let (mut tensor, _) = pack_tensor(
        "layer_0_key",
        CacheDtype::F32,
        &[1, 1, 1, 64],
        &small,
        &params,
    )
    .unwrap();
    let mut raw = Vec::with_capacity(VALUES / 64 * 2 + VALUES / 4);
    for _ in 0..VALUES / 64 {
        raw.extend(0x3C00u16.to_le_bytes());
    }
    raw.resize(VALUES / 64 * 2 + VALUES / 4, 0x1B);
    tensor.stored = lz4_flex::block::compress(&raw);
    tensor.entry.shape = vec![1, 1, VALUES / 64, 64];
    tensor.entry.lz4 = true;
    tensor.entry.raw_len = raw.len();
    tensor.entry.stored_len = tensor.stored.len();
    tensor.entry.crc32 = crc32fast::hash(&tensor.stored);
    let dir = tempfile::tempdir().unwrap();
    let packed = dir.path().join("bomb.safetensors");
    write_packed(&packed, &[tensor], &BTreeMap::new()).unwrap();
    assert!(std::fs::metadata(&packed).unwrap().len() < 1 << 20);
    let restored = dir.path().join("restored.safetensors");
    let run = kv_compress_limited(
        256 * 1024,
        &["-decompress", "-input", s(&packed), "-output", s(&restored)],
    );
    assert_one_line_error(&run, &format!("cannot allocate {} bytes", VALUES * 4));
    assert!(!restored.exists() && temp_files_in(dir.path()).is_empty());
}

#[test]
fn sigterm_and_ctrl_c_remove_the_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("kv.safetensors");
    write_kv_cache(&input, CacheDtype::F32, LAYERS, &SHAPE);
    let work = tempfile::tempdir().unwrap();
    let output = work.path().join("out.safetensors");
    std::fs::write(&output, b"old output").unwrap();
    for signal in ["TERM", "INT"] {
        let mut child = command(&["-input", s(&input), "-output", s(&output), "-reconstruct"])
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while temp_files_in(work.path()).is_empty()
            && child.try_wait().unwrap().is_none()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_micros(200));
        }
        assert!(
            !temp_files_in(work.path()).is_empty(),
            "the run ended before its temp file appeared"
        );
        assert!(Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()
            .unwrap()
            .success());
        let status = child.wait().unwrap();
        let expected = if signal == "TERM" { 15 } else { 2 };
        assert_eq!(status.signal(), Some(expected), "SIG{signal}: {status:?}");
        assert!(
            temp_files_in(work.path()).is_empty(),
            "SIG{signal} left a temp file"
        );
        assert_eq!(std::fs::read(&output).unwrap(), b"old output");
    }
}
