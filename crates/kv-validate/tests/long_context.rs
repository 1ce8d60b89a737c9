//! Issue 20 end to end on the tiny model: the context-length sweep and the
//! passkey test through the binary, their JSON and plots; lengths beyond
//! the model's context (1024 for the tiny model) are errors naming it.
//!
//! References: a context-length sweep at length L must report exactly what
//! a plain sweep with `--context L` reports (the same windows, prefills and
//! round trips); a passkey run through an exact compressor (the identity
//! script) must give every method the baseline's answers, token for token.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

const VARIANTS: [&str; 4] = [
    "--variant",
    "int8=-bits 8",
    "--variant",
    "kivi2=-method kivi -bits 2",
];

fn tiny(dir: &Path) -> String {
    tiny_model(dir).hf_dir.display().to_string()
}

/// The rows of a sweep table by label.
fn row<'a>(rows: &'a Value, label: &str) -> &'a Value {
    rows.as_array()
        .unwrap()
        .iter()
        .find(|r| r["label"] == label)
        .unwrap_or_else(|| panic!("no row {label} in {rows}"))
}

#[test]
fn a_context_length_sweep_reports_each_length_as_a_sweep_at_that_context_would() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let prose = prose_path().display().to_string();
    let json = dir.path().join("lengths.json");
    let plot = dir.path().join("lengths.svg");
    let mut args = vec![
        "--model-dir",
        &model,
        "--text-file",
        &prose,
        "--context-lengths",
        "32,96",
        "--targets",
        "8",
        "--max-windows",
        "2",
        "--quiet",
        "--json",
        json.to_str().unwrap(),
        "--context-plot",
        plot.to_str().unwrap(),
    ];
    args.extend(VARIANTS);
    let output = kv_validate(&args, &kv_compress());
    expect_success(&output);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("Context-length sweep"), "{stdout}");
    let report = read_json(&json);
    assert_eq!(report["targets"], 8);
    let lengths = report["lengths"].as_array().unwrap();
    assert_eq!(
        lengths
            .iter()
            .map(|l| l["context_length"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [32, 96]
    );
    for length in lengths {
        assert_eq!(length["windows"], 2);
        // Per window, the first target comes from the prefill: 7 on the cache.
        assert_eq!(length["tokens_on_compressed_cache"], 14);
        for label in ["int8", "kivi2"] {
            let r = row(&length["rows"], label);
            assert!(r["kld_mean"].as_f64().unwrap() >= 0.0);
            let top1 = r["top1_agreement_percent"].as_f64().unwrap();
            assert!((0.0..=100.0).contains(&top1));
            assert!(r["delta_standard_error"].is_number());
        }
        let kld = |label| row(&length["rows"], label)["kld_mean"].as_f64().unwrap();
        assert!(kld("int8") < kld("kivi2"), "8 bits beat 2 bits: {length}");
    }

    // Length 96 is the plain sweep at --context 96, figure for figure.
    let plain_json = dir.path().join("plain.json");
    let mut plain = vec![
        "--model-dir",
        &model,
        "--text-file",
        &prose,
        "--context",
        "96",
        "--targets",
        "8",
        "--max-windows",
        "2",
        "--quiet",
        "--json",
        plain_json.to_str().unwrap(),
    ];
    plain.extend(VARIANTS);
    expect_success(&kv_validate(&plain, &kv_compress()));
    let plain = read_json(&plain_json);
    assert_eq!(lengths[1]["rows"], plain["table"]["rows"]);
    assert_eq!(
        lengths[1]["baseline_perplexity"],
        plain["table"]["baseline_perplexity"]
    );

    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<polyline").count(), 2, "a line per method");
    assert!(svg.contains(">int8</text>") && svg.contains(">kivi2</text>"));
}

#[test]
fn lengths_beyond_the_models_context_are_errors_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let prose = prose_path().display().to_string();
    let output = kv_validate(
        &[
            "--model-dir",
            &model,
            "--text-file",
            &prose,
            "--context-lengths",
            "32,1020",
            "--targets",
            "8",
            "--quiet",
        ],
        &kv_compress(),
    );
    let error = expect_error(&output);
    assert!(error.contains("--context-lengths 1020"), "{error}");
    assert!(error.contains("maximum context of 1024 tokens"), "{error}");

    let output = kv_validate(
        &[
            "--model-dir",
            &model,
            "--passkey",
            "--passkey-lengths",
            "2048",
            "--quiet",
        ],
        &kv_compress(),
    );
    let error = expect_error(&output);
    assert!(error.contains("--passkey-lengths 2048"), "{error}");
    assert!(error.contains("maximum context of 1024 tokens"), "{error}");
}

fn passkey_run(dir: &Path, model: &str, compressor: &Path, name: &str) -> Value {
    let json = dir.join(format!("{name}.json"));
    let plot = dir.join(format!("{name}.svg"));
    let output = kv_validate(
        &[
            "--model-dir",
            model,
            "--passkey",
            "--passkey-lengths",
            "320,640",
            "--passkey-depths",
            "0,50,100",
            "--passkey-trials",
            "2",
            "--passkey-seed",
            "7",
            "--variant",
            "int8=-bits 8",
            "--quiet",
            "--json",
            json.to_str().unwrap(),
            "--passkey-plot",
            plot.to_str().unwrap(),
        ],
        compressor,
    );
    expect_success(&output);
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.contains(">baseline</text>") && svg.contains("int8 ("));
    assert_eq!(
        svg.matches(r#"stroke="white"><title>"#).count(),
        2 * 2 * 3,
        "a cell per method, length and depth"
    );
    let report = read_json(&json);
    // The method's cells where the baseline missed are outlined, one each.
    let misses = report["baseline_misses"].as_array().unwrap().len();
    assert_eq!(svg.matches("stroke-dasharray").count(), misses);
    assert_eq!(svg.contains("Dashed outline"), misses > 0);
    report
}

#[test]
fn the_passkey_test_runs_end_to_end_and_records_what_it_asked() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let report = passkey_run(dir.path(), &model, &kv_compress(), "real");
    assert_eq!(report["seed"], 7);
    assert_eq!(report["trials"], 2);
    assert_eq!(
        report["prompt"]["chat_template"], true,
        "the tiny tokenizer has <|im_start|>"
    );
    assert!(report["prompt"]["needle"]
        .as_str()
        .unwrap()
        .contains("{KEY}"));
    let methods = report["methods"].as_array().unwrap();
    assert_eq!(methods.len(), 2);
    assert_eq!(methods[0]["label"], "baseline");
    assert!(methods[0]["bits_per_value"].is_null());
    let bits = methods[1]["bits_per_value"].as_f64().unwrap();
    // 8-bit codes and their scales, less what LZ4 saves on the tiny model.
    assert!(
        (7.0..9.0).contains(&bits),
        "int8 stores about 8 bits: {bits}"
    );
    let trials = report["trial_log"].as_array().unwrap();
    assert_eq!(trials.len(), 2 * 3 * 2);
    for trial in trials {
        let key = trial["key"].as_str().unwrap();
        assert!(key.len() == 5 && key.chars().all(|c| c.is_ascii_digit()));
        assert_eq!(trial["answers"].as_array().unwrap().len(), 2);
        let length = trial["length"].as_u64().unwrap() as usize;
        let question_and_answer = length - trial["haystack_tokens"].as_u64().unwrap() as usize;
        assert!(
            question_and_answer > 10 && question_and_answer < 130,
            "{trial}"
        );
    }
    for method in methods {
        let cells = method["cells"].as_array().unwrap();
        assert_eq!(cells.len(), 2 * 3);
        for cell in cells {
            assert_eq!(cell["trials"], 2);
            let correct = trials
                .iter()
                .filter(|t| t["length"] == cell["length"] && t["depth"] == cell["depth"])
                .filter(|t| t["correct"][if method["label"] == "baseline" { 0 } else { 1 }] == true)
                .count();
            assert_eq!(cell["correct"], correct);
        }
    }
    // The same seed, the same keys.
    let again = passkey_run(
        dir.path(),
        &model,
        &identity_compressor(dir.path()),
        "identity",
    );
    let keys = |r: &Value| -> Vec<Value> {
        r["trial_log"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["key"].clone())
            .collect()
    };
    assert_eq!(keys(&report), keys(&again));
    // An exact round trip answers exactly as the baseline does.
    for trial in again["trial_log"].as_array().unwrap() {
        assert_eq!(trial["answers"][0], trial["answers"][1], "{trial}");
    }
    assert_eq!(again["methods"][0]["cells"], again["methods"][1]["cells"]);
}
