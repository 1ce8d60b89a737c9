//! Issue 5's sweep in CI: a short slice (one window of 384 context + 128
//! scored tokens) of the real SmolLM2-135M GGUF and the prose fixture,
//! through the real kv-compress, with three variants.
//!
//! Skipped, with a message, only when the model file is absent; CI fetches it.

mod common;

use common::*;

#[test]
fn smollm2_sweep_orders_int8_kivi4_and_kivi2_by_fidelity() {
    let Some(model) = smollm2_gguf() else { return };
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("sweep.json");
    let csv = dir.path().join("sweep.csv");
    let prose = prose_path();
    let args = [
        "--gguf",
        model.to_str().unwrap(),
        "--text-file",
        prose.to_str().unwrap(),
        "--context",
        "384",
        "--targets",
        "128",
        "--max-windows",
        "1",
        "--quiet",
        "--json",
        json.to_str().unwrap(),
        "--sweep-csv",
        csv.to_str().unwrap(),
        "--variant",
        "int8=-bits 8",
        "--variant",
        "kivi4-rot=-method kivi -bits 4 -rotate",
        "--variant",
        "kivi2=-method kivi -bits 2",
    ];
    let output = kv_validate(&args, &kv_compress());
    let stdout = String::from_utf8_lossy(&output.stdout);
    expect_success(&output);
    let report = read_json(&json);
    assert_eq!(report["tokens_scored"], 128);
    let table = &report["table"];
    let baseline = table["baseline_perplexity"].as_f64().unwrap();
    assert!((5.0..60.0).contains(&baseline), "baseline {baseline}");
    let row = |label: &str| {
        let row = table["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|row| row["label"] == label)
            .unwrap();
        (
            row["bits_per_value"].as_f64().unwrap(),
            row["delta"].as_f64().unwrap(),
        )
    };
    let (int8_bits, int8_delta) = row("int8");
    let (kivi4_bits, kivi4_delta) = row("kivi4-rot");
    let (kivi2_bits, kivi2_delta) = row("kivi2");
    // Payload bits by hand (head_dim 64, 384 tokens, group 64): INT8 8 + 16/64;
    // KIVI b + 32/64 (FP16 scale and offset per group). LZ4 may store less.
    for (bits, payload, label) in [
        (int8_bits, 8.25, "int8"),
        (kivi4_bits, 4.5, "kivi4"),
        (kivi2_bits, 2.5, "kivi2"),
    ] {
        assert!(
            bits <= payload && bits > 0.8 * payload,
            "{label}: {bits} bits/value\n{stdout}"
        );
    }
    // Issue 5 on WikiText-2: INT8 +0.002, KIVI INT4 +0.17, KIVI INT2 +7.9.
    // Measured on this window: +0.05, +0.13, +4.5.
    assert!(
        int8_delta.abs() < 0.1 && int8_delta.abs() < kivi4_delta,
        "int8 delta {int8_delta}\n{stdout}"
    );
    assert!(kivi4_delta < 0.5, "kivi4-rot delta {kivi4_delta}\n{stdout}");
    assert!(
        kivi2_delta > kivi4_delta && kivi2_delta > 1.0,
        "kivi2 delta {kivi2_delta}\n{stdout}"
    );
    assert_eq!(table["recommendation"], "kivi4-rot", "{stdout}");
    assert_eq!(std::fs::read_to_string(&csv).unwrap().lines().count(), 4);
}
