//! The `kv-validate` binary end to end on the tiny generated model: exit
//! codes, the JSON report, and every bad input of issue 3 as one error line.

mod common;

use common::*;

#[test]
fn an_exact_reconstruction_scores_exactly_the_baseline() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let compressor = identity_compressor(dir.path());
    let json = dir.path().join("report.json");
    let (model_dir, prose) = (model.hf_dir.to_str().unwrap(), prose_path());
    let mut args = short_run_args(model_dir, prose.to_str().unwrap(), "2");
    args.extend(["--json", json.to_str().unwrap()]);

    let output = kv_validate(&args, &compressor);
    let stdout = String::from_utf8_lossy(&output.stdout);
    expect_success(&output);
    assert!(output.stderr.is_empty(), "--quiet prints nothing on stderr");
    assert!(stdout.contains("Status: PASSED"), "{stdout}");

    let report = read_json(&json);
    // Same file back, same model code: the scores must be bit-identical.
    assert_eq!(report["perplexity"]["delta"], 0.0);
    assert_eq!(
        report["perplexity"]["baseline"],
        report["perplexity"]["compressed"]
    );
    let baseline = report["perplexity"]["baseline"].as_f64().unwrap();
    assert!(baseline > 1.0 && baseline.is_finite());
    // 2 windows x 16 targets; 15 of each window's targets ride on the cache.
    assert_eq!(report["tokens_scored"], 32);
    assert_eq!(report["tokens_on_compressed_cache"], 30);
    assert_eq!(report["windows"], 2);
    assert_eq!(report["windows_compressed"], 2);
    assert_eq!(report["passed"], true);
    // Both windows had a cache, so restricting to them changes nothing.
    let only = &report["perplexity"]["compressed_windows_only"];
    assert_eq!(only["baseline"], report["perplexity"]["baseline"]);
    assert_eq!(only["delta"], 0.0);
}

#[test]
fn a_delta_that_reaches_the_threshold_fails_with_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let compressor = identity_compressor(dir.path());
    let (model_dir, prose) = (model.hf_dir.to_str().unwrap(), prose_path());
    let mut args = short_run_args(model_dir, prose.to_str().unwrap(), "2");
    args.extend(["--threshold", "0"]);
    let output = kv_validate(&args, &compressor);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("Status: FAILED"), "{stdout}");
}

#[test]
fn the_real_compressor_changes_the_scores_and_reports_its_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let json = dir.path().join("report.json");
    let (gguf, prose) = (model.gguf.to_str().unwrap(), prose_path());
    let args = [
        "--gguf",
        gguf,
        "--text-file",
        prose.to_str().unwrap(),
        "--context",
        "64",
        "--targets",
        "32",
        "--max-windows",
        "2",
        "--threshold",
        "1000",
        "--json",
        json.to_str().unwrap(),
    ];
    let output = kv_validate(&args, &kv_compress());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    // Without --quiet the evaluation says what it is doing on stderr.
    assert!(stderr.contains("loading the model"), "{stderr}");

    let report = read_json(&json);
    assert_ne!(
        report["perplexity"]["delta"], 0.0,
        "INT4 must change some score"
    );
    let compression = &report["compression"];
    let ratio = compression["compression_ratio"].as_f64().unwrap();
    let (original, compressed) = (
        compression["original_size_bytes"].as_f64().unwrap(),
        compression["compressed_size_bytes"].as_f64().unwrap(),
    );
    // 2 windows x 3 layers x (key, value) x [1, 2, 64, 16] f32.
    assert_eq!(original, (2 * 3 * 2 * 2 * 64 * 16 * 4) as f64);
    assert!(
        (ratio - original / compressed).abs() < 1e-9,
        "ratio {ratio}"
    );
    // ADR-002 on f32 needs at most 32 bytes of codes + a 2-byte scale per
    // 64 values (256 bytes): a ratio of at least 256/34, less container overhead.
    assert!(ratio > 7.0, "ratio {ratio}");
    let rmse = report["compression"]["rmse"].as_f64().unwrap();
    assert!(rmse > 0.0 && rmse < 1.0, "rmse {rmse}");
    assert_eq!(report["compressor_flags"], "-group-size 64 -sparsity 0.0");
}

#[test]
fn quick_test_needs_no_model_and_passes_with_the_real_compressor() {
    let output = kv_validate(&["--quick-test", "--quiet"], &kv_compress());
    let stdout = String::from_utf8_lossy(&output.stdout);
    expect_success(&output);
    assert!(stdout.contains("22 layers x [1, 4, 256, 64]"), "{stdout}");
    assert!(stdout.contains("[ok] rmse agrees"), "{stdout}");
}

#[test]
fn quick_test_fails_when_the_reconstruction_loses_its_layout() {
    // A "decompressor" that drops the last layer: the layout check fails (exit 1).
    let dir = tempfile::tempdir().unwrap();
    let truncating = scripted_compressor(
        dir.path(),
        "truncating-kv-compress",
        r#"python3 - "$output" <<'PY'
import sys
from safetensors.numpy import load_file, save_file
tensors = load_file(sys.argv[1])
del tensors["layer_21_value"]
save_file(tensors, sys.argv[1])
PY"#,
    );
    let output = kv_validate(&["--quick-test", "--quiet"], &truncating);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(1),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("[FAIL] layout") && stdout.contains("layer_21_value"),
        "{stdout}"
    );
}

#[test]
fn text_shorter_than_one_window_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let text = dir.path().join("short.txt");
    std::fs::write(&text, "Too short.").unwrap();
    let args = [
        "--model-dir",
        model.hf_dir.to_str().unwrap(),
        "--text-file",
        text.to_str().unwrap(),
        "--quiet",
    ];
    let error = expect_error(&kv_validate(&args, &identity_compressor(dir.path())));
    assert!(
        error.contains("tokens") && error.contains("longer text"),
        "{error}"
    );
}

#[test]
fn missing_model_files_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let prose = prose_path();
    let missing = dir.path().join("no-model");
    std::fs::create_dir(&missing).unwrap();
    let args = [
        "--model-dir",
        missing.to_str().unwrap(),
        "--text-file",
        prose.to_str().unwrap(),
        "--quiet",
    ];
    let error = expect_error(&kv_validate(&args, &identity_compressor(dir.path())));
    assert!(error.contains("no-model"), "{error}");
    let gguf = dir.path().join("absent.gguf");
    let args = [
        "--gguf",
        gguf.to_str().unwrap(),
        "--text-file",
        prose.to_str().unwrap(),
        "--quiet",
    ];
    let error = expect_error(&kv_validate(&args, &identity_compressor(dir.path())));
    assert!(error.contains("absent.gguf"), "{error}");
}

#[test]
fn a_missing_compressor_says_how_to_install_it() {
    let dir = tempfile::tempdir().unwrap();
    let error = expect_error(&kv_validate(
        &["--quick-test", "--quiet"],
        &dir.path().join("nowhere"),
    ));
    assert!(
        error.contains("cargo install --path crates/kv-compress"),
        "{error}"
    );
}

#[test]
fn a_failing_compressor_shows_its_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let failing = write_script(
        dir.path(),
        "failing-kv-compress",
        "#!/bin/sh\necho 'Error: input is haunted' >&2\necho 'second line' >&2\nexit 1\n",
    );
    let error = expect_error(&kv_validate(&["--quick-test", "--quiet"], &failing));
    assert!(
        error.contains("Error: input is haunted") && error.contains("second line"),
        "{error}"
    );
}

#[test]
fn a_negative_threshold_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let error = expect_error(&kv_validate(
        &["--quick-test", "--quiet", "--threshold", "-0.1"],
        &identity_compressor(dir.path()),
    ));
    assert!(error.contains("--threshold"), "{error}");
}

#[test]
fn a_reconstruction_whose_sidecar_disagrees_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    // The decompressed cache comes back with a sidecar claiming 7 positions.
    let lying = scripted_compressor(
        dir.path(),
        "lying-kv-compress",
        r#"sidecar="${output%.safetensors}.metadata.json"
printf '{"num_layers": 3, "num_kv_heads": 2, "seq_len": 7, "head_dim": 16, "dtype": "float32", "model_name": "x"}' > "$sidecar""#,
    );
    let (model_dir, prose) = (model.hf_dir.to_str().unwrap(), prose_path());
    let error = expect_error(&kv_validate(
        &short_run_args(model_dir, prose.to_str().unwrap(), "2"),
        &lying,
    ));
    assert!(
        error.contains("sidecar") && error.contains("layer_0_key"),
        "{error}"
    );
}

#[test]
fn help_teaches_with_examples() {
    let output = kv_validate_with_env(&["--help"], &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0));
    for needle in [
        "--quick-test",
        "--context 384 --targets 128",
        "Exit status: 0 passed",
        "KV_COMPRESS_PATH",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in {stdout}");
    }
}

#[test]
fn kv_compress_is_invoked_with_the_original_bridges_command_lines() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let identity = identity_compressor(dir.path());
    let log = dir.path().join("argv.log");
    let recording = write_script(
        dir.path(),
        "recording-kv-compress",
        &format!(
            "#!/bin/sh\necho \"$@\" >> '{}'\nexec '{}' \"$@\"\n",
            log.display(),
            identity.display()
        ),
    );
    let (model_dir, prose) = (model.hf_dir.to_str().unwrap(), prose_path());
    let mut args = short_run_args(model_dir, prose.to_str().unwrap(), "2");
    args.extend(["--group-size", "32", "--sparsity", "0.25"]);
    args.extend(["--compress-arg", "-bits", "--compress-arg=8"]);
    let output = kv_validate(&args, &recording);
    expect_success(&output);

    let calls: Vec<Vec<String>> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|line| line.split(' ').map(str::to_string).collect())
        .collect();
    assert_eq!(calls.len(), 4, "two windows, two calls each: {calls:?}");
    // Windows in flight together interleave their calls: a compress is
    // followed by the decompress of what it wrote, not always at once.
    let compress = &calls[0];
    let decompress = calls
        .iter()
        .find(|call| call[0] == "-decompress")
        .expect("a decompress");
    assert_eq!(compress[0], "-input");
    assert!(compress[1].ends_with("context.safetensors"));
    assert_eq!(compress[2], "-output");
    assert_eq!(
        compress[4..],
        ["-group-size", "32", "-sparsity", "0.25", "-bits", "8"]
    );
    assert_eq!(decompress[..2], ["-decompress", "-input"]);
    assert!(
        calls
            .iter()
            .any(|call| call[0] == "-input" && call[3] == decompress[2]),
        "each decompress reads what a compress wrote: {calls:?}"
    );
    assert_eq!(decompress[3], "-output");
}

/// The tiny model's context length (positions).
fn tiny_context() -> usize {
    kv_validate::model::tiny::TinyLlama::default()
        .config
        .max_position_embeddings
}

#[test]
fn a_window_longer_than_the_model_context_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let prose = prose_path();
    let context = tiny_context().to_string();
    let args = [
        "--model-dir",
        model.hf_dir.to_str().unwrap(),
        "--text-file",
        prose.to_str().unwrap(),
        "--context",
        &context,
        "--targets",
        "100",
        "--quiet",
    ];
    let error = expect_error(&kv_validate(&args, &identity_compressor(dir.path())));
    let window = format!("a window of {} tokens", tiny_context() + 100);
    assert!(
        error.contains(&window) && error.contains(&context),
        "{error}"
    );
}

#[test]
fn the_default_is_the_originals_sliding_window() {
    // Windows of the model's context L every S = min(512, L/2) tokens: the
    // first has no context (L - 1 scored), the second S targets on a cache.
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let json = dir.path().join("report.json");
    let prose = prose_path();
    let args = [
        "--model-dir",
        model.hf_dir.to_str().unwrap(),
        "--text-file",
        prose.to_str().unwrap(),
        "--max-windows",
        "2",
        "--quiet",
        "--json",
        json.to_str().unwrap(),
    ];
    let output = kv_validate(&args, &identity_compressor(dir.path()));
    expect_success(&output);
    let report = read_json(&json);
    let (window, stride) = (
        tiny_context().min(2048),
        (tiny_context().min(2048) / 2).min(512),
    );
    let protocol = report["protocol"].as_str().unwrap();
    assert!(
        protocol.starts_with(&format!(
            "sliding window of {window} tokens, stride {stride}"
        )),
        "{protocol}"
    );
    assert_eq!(report["tokens_scored"], window - 1 + stride);
    assert_eq!(report["tokens_on_compressed_cache"], stride - 1);
    assert_eq!(report["windows_compressed"], 1);
}

#[test]
fn bench_forward_reports_tokens_per_second_per_context() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let json = dir.path().join("forward.json");
    let model_dir = model.hf_dir.to_str().unwrap();
    let args = [
        "--model-dir",
        model_dir,
        "--bench-forward",
        "16,64",
        "--quiet",
        "--json",
        json.to_str().unwrap(),
    ];
    let output = kv_validate(&args, &identity_compressor(dir.path()));
    expect_success(&output);
    let report = read_json(&json);
    let forward = report["forward"].as_array().unwrap();
    let contexts: Vec<u64> = forward
        .iter()
        .map(|entry| entry["context"].as_u64().unwrap())
        .collect();
    assert_eq!(contexts, [16, 64]);
    for entry in forward {
        for (seconds, speed) in [
            ("seconds", "tokens_per_second"),
            ("all_logits_seconds", "all_logits_tokens_per_second"),
        ] {
            let (seconds, speed) = (
                entry[seconds].as_f64().unwrap(),
                entry[speed].as_f64().unwrap(),
            );
            assert!(seconds > 0.0);
            assert!((speed * seconds - entry["context"].as_f64().unwrap()).abs() < 1e-6);
        }
    }

    let too_long = (tiny_context() + 1).to_string();
    let args = [
        "--model-dir",
        model_dir,
        "--bench-forward",
        &too_long,
        "--quiet",
    ];
    let error = expect_error(&kv_validate(&args, &identity_compressor(dir.path())));
    assert!(error.contains("--bench-forward"), "{error}");
}

/// `--dtype` and `--device`: the report names the device and the weights'
/// dtype, and the cache file follows the model's dtype unless told.
#[test]
fn the_report_names_the_device_and_the_model_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let compressor = identity_compressor(dir.path());
    let json = dir.path().join("report.json");
    let (model_dir, prose) = (model.hf_dir.to_str().unwrap(), prose_path());
    let mut args = short_run_args(model_dir, prose.to_str().unwrap(), "2");
    args.extend([
        "--dtype",
        "bf16",
        "--device",
        "cpu",
        "--json",
        json.to_str().unwrap(),
    ]);

    let output = kv_validate(&args, &compressor);
    expect_success(&output);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("Device") && stdout.contains("cpu ("),
        "{stdout}"
    );
    let report = read_json(&json);
    assert!(
        report["device"].as_str().unwrap().starts_with("cpu ("),
        "{report}"
    );
    assert!(
        report["model"].as_str().unwrap().contains("bf16"),
        "{report}"
    );
    assert_eq!(report["cache_dtype"], "bfloat16");
    // A lossless round trip of the model's own bf16 cache costs nothing.
    assert_eq!(report["perplexity"]["delta"], 0.0);
}

#[test]
fn a_gpu_asked_of_a_cpu_build_is_an_error_not_a_cpu_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let (model_dir, prose) = (model.hf_dir.to_str().unwrap(), prose_path());
    let mut args = short_run_args(model_dir, prose.to_str().unwrap(), "2");
    args.extend(["--device", "cuda:1"]);
    let error = expect_error(&kv_validate(&args, &identity_compressor(dir.path())));
    assert!(
        error.contains("cuda:1") && error.contains("build-cuda"),
        "{error}"
    );

    args.truncate(args.len() - 2);
    args.extend(["--device", "tpu"]);
    let output = kv_validate(&args, &identity_compressor(dir.path()));
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("expected auto, cpu, cuda or cuda:N"));
}
