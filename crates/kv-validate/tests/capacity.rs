//! `kv-validate capacity` against figures computed by hand from the configs
//! of TinyLlama-1.1B and SmolLM2-135M (testdata/configs: config.json only,
//! no weights), a GGUF's metadata, a sweep's JSON, and its errors.

mod common;

use std::path::{Path, PathBuf};

use common::{expect_error, kv_validate_with_env, tiny_model};
use serde_json::Value;

fn config_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/configs")
        .join(name)
}

/// Runs `capacity ARGS --json FILE`, returns (stdout, the JSON report).
fn capacity(args: &[&str], dir: &Path) -> (String, Value) {
    let json = dir.join("capacity.json");
    let mut all = vec!["capacity"];
    all.extend_from_slice(args);
    all.extend(["--json", json.to_str().unwrap()]);
    let output = kv_validate_with_env(&all, &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "capacity failed: {stderr}");
    let report = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    (String::from_utf8(output.stdout).unwrap(), report)
}

fn method<'a>(report: &'a Value, label: &str) -> &'a Value {
    report["methods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["label"] == label)
        .unwrap()
}

fn concurrency(report: &Value, gpu: &str, method: &str, prompt: u64, output: u64) -> u64 {
    let rows = report["rows"].as_array().unwrap();
    let row = rows
        .iter()
        .find(|r| {
            r["gpu"] == gpu
                && r["method"] == method
                && r["prompt_tokens"] == prompt
                && r["output_tokens"] == output
        })
        .unwrap_or_else(|| panic!("no row {gpu} {method} {prompt}->{output}"));
    row["max_concurrent_requests"].as_u64().unwrap()
}

#[test]
fn tinyllama_figures_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    let model = config_dir("tinyllama-1.1b");
    let (text, report) = capacity(
        &[
            "--model-dir",
            model.to_str().unwrap(),
            "--gpu-memory",
            "80GiB",
        ],
        dir.path(),
    );
    // 22 layers x 2 x 4 KV heads x 64 = 11,264 values; x 2 bytes = 22,528 bytes per token at FP16.
    assert_eq!(report["kv_values_per_token"], 11_264);
    assert_eq!(method(&report, "fp16")["kv_bytes_per_token"], 22_528.0);
    // ADR-002: 4-bit codes + an FP16 scale per 64 values = 4.25 bits: 11,264 x 4.25 / 8 = 5,984 bytes.
    assert_eq!(method(&report, "adr002-g64")["bits_per_value"], 4.25);
    assert_eq!(method(&report, "adr002-g64")["kv_bytes_per_token"], 5_984.0);
    assert_eq!(method(&report, "int8-g64")["bits_per_value"], 8.25);
    assert_eq!(method(&report, "int2-g64")["kv_bytes_per_token"], 3_168.0);
    // Parameters: embeddings 32000 x 2048 = 65,536,000; per layer Q and O 2 x 2048 x 2048,
    // K and V 2 x 2048 x 256, MLP 3 x 2048 x 5632, norms 2 x 2048 = 44,044,288, x 22 =
    // 968,974,336; final norm 2048; untied head 65,536,000: 1,100,048,384 (TinyLlama's 1.1B).
    assert_eq!(report["parameters"], 1_100_048_384u64);
    assert_eq!(
        report["weights_bytes"], 2_200_096_768u64,
        "bf16 by default: 2 bytes each"
    );
    // 80 GiB = 85,899,345,920 bytes; after the weights 83,699,249,152.
    assert_eq!(report["gpus"][0]["free_bytes"], 83_699_249_152u64);
    // FP16, 4096 -> 512: 22,528 x 4,608 = 103,809,024 bytes per request; 83,699,249,152 / that = 806.3.
    assert_eq!(concurrency(&report, "80GiB", "fp16", 4096, 512), 806);
    // FP16, 512 -> 256: 22,528 x 768 = 17,301,504 bytes; 4,837.6.
    assert_eq!(concurrency(&report, "80GiB", "fp16", 512, 256), 4_837);
    // ADR-002, 10240 -> 1536: 5,984 x 11,776 = 70,467,584 bytes; 1,187.8.
    assert_eq!(
        concurrency(&report, "80GiB", "adr002-g64", 10240, 1536),
        1_187
    );
    let fits = report["fits"].as_array().unwrap();
    let fp16 = fits.iter().find(|f| f["method"] == "fp16").unwrap();
    assert_eq!(
        fp16["max_cached_tokens"], 3_715_343,
        "83,699,249,152 / 22,528"
    );
    // The text report carries the same figures: 1024 -> 1024 is 46,137,344 bytes a request
    // (1,814.1 of them fit), 10240 -> 1536 265,289,728 (315.5).
    assert!(
        text.contains("22 layers x 2 x 4 KV heads x 64 = 11264"),
        "{text}"
    );
    assert!(text.contains("22528"), "{text}");
    let fp16_line = text
        .lines()
        .filter(|l| l.starts_with("fp16 "))
        .nth(1)
        .unwrap();
    let cells: Vec<&str> = fp16_line.split_whitespace().collect();
    assert_eq!(
        cells,
        ["fp16", "4837", "1814", "806", "315", "3715343"],
        "{text}"
    );
}

#[test]
fn weights_dtype_changes_what_is_left() {
    let dir = tempfile::tempdir().unwrap();
    let model = config_dir("tinyllama-1.1b");
    let args = [
        "--model-dir",
        model.to_str().unwrap(),
        "--gpu-memory",
        "80GiB",
        "--weights-dtype",
        "int4",
    ];
    let (_, report) = capacity(&args, dir.path());
    // Half a byte per weight: 550,024,192 bytes; 85,899,345,920 - that = 85,349,321,728;
    // ADR-002 at 10240 -> 1536: / 70,467,584 = 1,211.2.
    assert_eq!(report["weights_bytes"], 550_024_192u64);
    assert_eq!(
        concurrency(&report, "80GiB", "adr002-g64", 10240, 1536),
        1_211
    );
}

#[test]
fn smollm2_figures_by_hand_and_default_gpus() {
    let dir = tempfile::tempdir().unwrap();
    let model = config_dir("smollm2-135m");
    let args = [
        "--model-dir",
        model.to_str().unwrap(),
        "--gpu-memory",
        "24GiB",
        "--gpu-memory",
        "81559MiB",
    ];
    let (_, report) = capacity(&args, dir.path());
    // 30 layers x 2 x 3 KV heads x 64 = 11,520 values: 23,040 bytes per token at FP16.
    assert_eq!(method(&report, "fp16")["kv_bytes_per_token"], 23_040.0);
    // ADR-002: 11,520 x 4.25 / 8 = 6,120 bytes.
    assert_eq!(method(&report, "adr002-g64")["kv_bytes_per_token"], 6_120.0);
    // Embeddings 49152 x 576 = 28,311,552 (tied: no head); per layer 2 x 576 x 576 +
    // 2 x 576 x 192 + 3 x 576 x 1536 + 2 x 576 = 3,540,096, x 30 = 106,202,880; final norm 576.
    assert_eq!(report["parameters"], 134_515_008u64);
    // 24 GiB = 25,769,803,776 - 269,030,016 bytes of bf16 weights = 25,500,773,760.
    assert_eq!(report["gpus"][0]["free_bytes"], 25_500_773_760u64);
    // FP16 1024 -> 1024: 23,040 x 2,048 = 47,185,920 bytes; 540.4.
    assert_eq!(concurrency(&report, "24GiB", "fp16", 1024, 1024), 540);
    // ADR-002 4096 -> 512: 6,120 x 4,608 = 28,200,960 bytes; 904.3.
    assert_eq!(concurrency(&report, "24GiB", "adr002-g64", 4096, 512), 904);
    assert_eq!(report["gpus"][1]["bytes"], 81_559u64 << 20);

    let (text, defaults) = capacity(&["--model-dir", model.to_str().unwrap()], dir.path());
    let gpus: Vec<u64> = defaults["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["bytes"].as_u64().unwrap())
        .collect();
    assert_eq!(
        gpus,
        [81_559 << 20, 143_771 << 20],
        "H100 80GB and H200 as nvidia-smi reports them"
    );
    assert!(
        text.contains("H100 80GB") && text.contains("H200 141GB"),
        "{text}"
    );
}

#[test]
fn gguf_metadata_gives_the_same_figures_as_its_config() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_model(&dir.path().join("tiny"));
    let (_, from_dir) = capacity(
        &[
            "--model-dir",
            tiny.hf_dir.to_str().unwrap(),
            "--gpu-memory",
            "1GiB",
        ],
        dir.path(),
    );
    let (_, from_gguf) = capacity(
        &[
            "--gguf",
            tiny.gguf.to_str().unwrap(),
            "--gpu-memory",
            "1GiB",
        ],
        dir.path(),
    );
    for key in ["kv_values_per_token", "parameters", "rows", "methods"] {
        assert_eq!(from_dir[key], from_gguf[key], "{key}");
    }
    // The tiny model: 3 layers x 2 x 2 KV heads x 16.
    assert_eq!(from_gguf["kv_values_per_token"], 192);
}

#[test]
fn sweep_json_methods_carry_their_delta_and_kld_and_the_plot_draws_them() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = dir.path().join("sweep.json");
    let row = |label: &str, bits: f64, delta: f64, kld: Option<f64>| {
        serde_json::json!({
            "label": label, "flags": "", "bits_per_value": bits, "compression_ratio": 16.0 / bits,
            "perplexity": 10.0 + delta, "delta": delta, "delta_standard_error": null,
            "delta_within_noise": null, "kld_mean": kld, "kld_standard_error": null, "kld_p99": null,
            "kld_max": null, "top1_agreement_percent": null, "delta_p_mean_percent": null,
            "passed": delta < 0.5, "pareto": true, "pareto_kld": false,
        })
    };
    let model = config_dir("tinyllama-1.1b");
    // The sweep says which model it measured: capacity checks it is this one.
    let config_content =
        kv_validate::identity::ContentId::of_files(&[model.join("config.json")]).unwrap();
    let json = serde_json::json!({
        "model": "m", "config_content": config_content, "table": {
            "baseline_perplexity": 10.0, "threshold": 0.5, "max_kld": null, "recommendation": "kivi3",
            "rows": [row("kivi3", 3.5, 0.25, Some(0.012)), row("int8", 8.25, 0.002, None)],
        }
    });
    std::fs::write(&sweep, json.to_string()).unwrap();
    let plot = dir.path().join("capacity.svg");
    let args = [
        "--model-dir",
        model.to_str().unwrap(),
        "--gpu-memory",
        "80GiB",
        "--sweep-json",
        sweep.to_str().unwrap(),
        "--plot",
        plot.to_str().unwrap(),
    ];
    let (text, report) = capacity(&args, dir.path());
    let labels: Vec<&str> = report["methods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["fp16", "kivi3", "int8"]);
    assert_eq!(method(&report, "kivi3")["delta"], 0.25);
    assert_eq!(method(&report, "kivi3")["kld_mean"], 0.012);
    // 11,264 x 3.5 / 8 = 4,928 bytes per token; 512 -> 256: 3,784,704 bytes; 83,699,249,152 / that = 22,115.3.
    assert_eq!(method(&report, "kivi3")["kv_bytes_per_token"], 4_928.0);
    assert_eq!(concurrency(&report, "80GiB", "kivi3", 512, 256), 22_115);
    assert!(
        text.contains("+0.2500") && text.contains("0.01200"),
        "{text}"
    );
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<polyline").count(), 4, "one line per profile");
    assert_eq!(
        svg.matches("<circle cx").count(),
        4 * 3 + 2,
        "a point per profile and method, two legend marks"
    );
    assert!(
        svg.contains(">512→256</text>") && svg.contains("kivi3 512→256: 3.500 bits/value"),
        "{svg}"
    );
}

#[test]
fn errors_are_one_line_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let not_sweep = dir.path().join("report.json");
    std::fs::write(&not_sweep, "{\"model\": \"m\"}").unwrap();
    let model = config_dir("tinyllama-1.1b");
    let model = model.to_str().unwrap();
    let missing = dir.path().join("nowhere");
    let cases: [(Vec<&str>, &str); 4] = [
        (
            vec![
                "--model-dir",
                model,
                "--sweep-json",
                not_sweep.to_str().unwrap(),
            ],
            "not a kv-validate sweep JSON",
        ),
        (
            vec!["--model-dir", missing.to_str().unwrap()],
            "nowhere/config.json: no such file",
        ),
        (
            vec!["--gguf", not_sweep.to_str().unwrap()],
            "report.json: not a readable GGUF file",
        ),
        (
            vec!["--model-dir", model, "--gpu-memory", "80 GiBs"],
            "unknown unit",
        ),
    ];
    for (args, problem) in cases {
        let mut all = vec!["capacity"];
        all.extend(args);
        let output = kv_validate_with_env(&all, &[]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        if problem == "unknown unit" {
            // clap's own error for a bad value: exit 2, the flag and the problem named.
            assert_eq!(output.status.code(), Some(2));
            assert!(
                stderr.contains("--gpu-memory") && stderr.contains(problem),
                "{stderr}"
            );
        } else {
            let line = expect_error(&output);
            assert!(line.contains(problem), "{line}");
        }
    }
}

#[test]
fn help_teaches_the_profiles_and_the_parameter_count() {
    let output = kv_validate_with_env(&["capacity", "--help"], &[]);
    let help = String::from_utf8_lossy(&output.stdout);
    for needle in [
        "512→256",
        "10240→1536",
        "--gpu-memory",
        "--weights-dtype",
        "--sweep-json",
        "parameter",
        "81559 MiB",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}:\n{help}");
    }
}

fn family_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/families")
        .join(case)
}

#[test]
fn sliding_window_layers_hold_at_most_their_window() {
    // The gemma3_text fixture: 4 layers, 0, 1 and 3 sliding over 16 tokens,
    // 2 global; 2 KV heads x head_dim 16: 2 x 2 x 16 = 64 values per layer
    // and token.
    let dir = tempfile::tempdir().unwrap();
    let model = family_dir("gemma3_text");
    let (text, report) = capacity(
        &[
            "--model-dir",
            model.to_str().unwrap(),
            "--gpu-memory",
            "1MiB",
        ],
        dir.path(),
    );
    assert_eq!(
        report["kv_values_per_token"], 256,
        "4 x 64 until a window fills"
    );
    // Parameters: embeddings 288 x 32 = 9,216 (tied head); per layer Q and O
    // 2 x 32 x 64, K and V 2 x 32 x 32 = 6,144, q/k/v biases 128 and o's 32,
    // MLP 3 x 32 x 32 = 3,072, four norms 4 x 32 and q/k norms 2 x 16 = 160:
    // 9,536 x 4 = 38,144; final norm 32: 47,392 (model.safetensors holds
    // exactly that many values).
    assert_eq!(report["parameters"], 47_392);
    // 1 MiB - 94,784 bytes of bf16 weights = 953,792 bytes free.
    assert_eq!(report["gpus"][0]["free_bytes"], 953_792);
    // 512 -> 256: sliding layers 3 x 64 x 16 = 3,072 values, the global one
    // 64 x 768 = 49,152: 52,224 values, 104,448 bytes at FP16; 9.1 requests.
    let fp16 = method(&report, "fp16");
    assert_eq!(fp16["kv_bytes_per_request"][0], 104_448.0);
    assert_eq!(concurrency(&report, "1MiB", "fp16", 512, 256), 9);
    // One sequence: 2 x (3,072 + 64 t) <= 953,792 for t <= 7,403.
    let fits = report["fits"].as_array().unwrap();
    let fp16_fit = fits.iter().find(|f| f["method"] == "fp16").unwrap();
    assert_eq!(fp16_fit["max_cached_tokens"], 7_403);
    assert!(text.contains("7403"), "{text}");

    // The mistral fixture slides on every layer: a cache never outgrows
    // 2 layers x 2 x 2 KV heads x head_dim 8 x 16 tokens = 1,024 values.
    let (text, report) = capacity(
        &[
            "--model-dir",
            family_dir("mistral").to_str().unwrap(),
            "--gpu-memory",
            "1MiB",
        ],
        dir.path(),
    );
    let fp16 = method(&report, "fp16");
    assert_eq!(fp16["kv_bytes_per_request"][3], 2_048.0);
    let fits = report["fits"].as_array().unwrap();
    let fp16_fit = fits.iter().find(|f| f["method"] == "fp16").unwrap();
    assert_eq!(fp16_fit["max_cached_tokens"], u64::MAX);
    assert!(text.contains("unbounded"), "{text}");
}
