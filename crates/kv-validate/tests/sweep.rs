//! The sweep end to end on the tiny model through the real kv-compress: the
//! table's bits/value against payload sizes computed by hand from
//! docs/format.md, and the CLI's outputs and exit codes.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use kvformat::PackedFile;

/// Tiny model (2 KV heads, head_dim 16), 32 context tokens per window: each
/// cache tensor is [1, 2, 32, 16] = 1024 values, cached as F32.
const CONTEXT: &str = "32";

/// The real kv-compress behind a script that keeps a copy of every packed
/// file it writes in `keep` (named by the script's process id, so each
/// window's survives, also when windows in flight together compress at once).
fn keeping_compressor(dir: &Path, keep: &Path) -> PathBuf {
    let script = format!(
        r#"#!/bin/sh
"{real}" "$@" || exit $?
decompress=0
for arg in "$@"; do
  [ "$previous" = "-output" ] && output=$arg
  [ "$arg" = "-decompress" ] && decompress=1
  previous=$arg
done
if [ $decompress = 0 ]; then cp "$output" "{keep}/$$-$(basename "$output")"; fi
"#,
        real = kv_compress().display(),
        keep = keep.display()
    );
    write_script(dir, "keeping-kv-compress", &script)
}

/// Per variant index, the mean over its kept packed files of (payload bits,
/// stored bits) per value, from each file's manifest.
fn kept_bits_per_value(keep: &Path, variant: usize) -> (f64, f64) {
    let suffix = format!("-variant_{variant}.kvc.safetensors");
    let files: Vec<PathBuf> = std::fs::read_dir(keep)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.to_str().unwrap().ends_with(&suffix))
        .collect();
    assert_eq!(files.len(), 2, "one packed file per window");
    let per_file = files.iter().map(|path| {
        let packed = PackedFile::open(path).unwrap();
        let tensors = &packed.manifest().tensors;
        let values: usize = tensors
            .values()
            .map(|t| t.shape.iter().product::<usize>())
            .sum();
        let bits = |bytes: usize| 8.0 * bytes as f64 / values as f64;
        (
            bits(tensors.values().map(|t| t.raw_len).sum()),
            bits(tensors.values().map(|t| t.stored_len).sum()),
        )
    });
    let (payload, stored) =
        per_file.fold((0.0, 0.0), |(p, s), (fp, fs)| (p + fp / 2.0, s + fs / 2.0));
    (payload, stored)
}

fn run_sweep(dir: &Path, extra: &[&str]) -> (std::process::Output, serde_json::Value) {
    run_sweep_with(dir, extra, &kv_compress())
}

/// kv-validate on the tiny model over the first two windows of the prose
/// fixture (`--quiet`), with `extra` appended.
fn run_tiny(dir: &Path, extra: &[&str], compressor: &Path) -> std::process::Output {
    let model = tiny_model(dir);
    let prose = prose_path();
    let mut args = vec![
        "--model-dir",
        model.hf_dir.to_str().unwrap(),
        "--text-file",
        prose.to_str().unwrap(),
        "--context",
        CONTEXT,
        "--targets",
        "16",
        "--max-windows",
        "2",
        "--quiet",
    ];
    args.extend(extra);
    kv_validate(&args, compressor)
}

fn run_sweep_with(
    dir: &Path,
    extra: &[&str],
    compressor: &Path,
) -> (std::process::Output, serde_json::Value) {
    let json = dir.join("sweep.json");
    let mut args = vec!["--json", json.to_str().unwrap()];
    args.extend(extra);
    let output = run_tiny(dir, &args, compressor);
    let report = std::fs::read_to_string(&json)
        .map(|text| serde_json::from_str(&text).unwrap())
        .unwrap_or(serde_json::Value::Null);
    (output, report)
}

fn row<'a>(report: &'a serde_json::Value, label: &str) -> &'a serde_json::Value {
    report["table"]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["label"] == label)
        .unwrap()
}

#[test]
fn a_three_variant_sweep_reports_hand_computed_bits_and_orders_fidelity() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("sweep.csv");
    let svg = dir.path().join("sweep.svg");
    let keep = dir.path().join("packed");
    std::fs::create_dir(&keep).unwrap();
    let compressor = keeping_compressor(dir.path(), &keep);
    let (output, report) = run_sweep_with(
        dir.path(),
        &[
            "--variant",
            "int8=-bits 8",
            "--variant",
            "kivi4=-method kivi -bits 4",
            "--variant",
            "int2=-bits 2",
            "--threshold",
            "1000",
            "--sweep-csv",
            csv.to_str().unwrap(),
            "--sweep-plot",
            svg.to_str().unwrap(),
        ],
        &compressor,
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    expect_success(&output);

    // Payloads by hand. Flat groups of 64 with one FP16 scale: bits + 16/64.
    // KIVI 4-bit, asymmetric (FP16 scale + FP16 offset = 32 bits per group):
    // keys per channel along 32 tokens (a group of 32: +1 bit), values per
    // token (a group of head_dim 16: +2 bits): (5 + 6) / 2 = 5.5.
    // What is stored may be shorter (an LZ4 block, when it is); the table
    // must count exactly the stored bytes.
    for (index, (label, payload_bits)) in [("int8", 8.25), ("kivi4", 5.5), ("int2", 2.25)]
        .into_iter()
        .enumerate()
    {
        let (payload, stored) = kept_bits_per_value(&keep, index);
        assert!(
            (payload - payload_bits).abs() < 1e-9,
            "{label}: payload {payload} bits/value, by hand {payload_bits}"
        );
        let row = row(&report, label);
        let measured = row["bits_per_value"].as_f64().unwrap();
        assert!(
            (measured - stored).abs() < 1e-9,
            "{label}: table {measured} bits/value, stored {stored}\n{stdout}"
        );
        assert!(measured <= payload_bits, "{label}: {measured}");
        let ratio = row["compression_ratio"].as_f64().unwrap();
        assert!(
            (ratio - 32.0 / measured).abs() < 1e-9,
            "{label}: ratio {ratio} against the F32 cache"
        );
    }
    let labels: Vec<&str> = report["table"]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["int2", "kivi4", "int8"], "sorted by bits/value");

    // On a random model quantization noise moves perplexity either way; the
    // size of the move still orders INT8 far below 2 bits.
    let delta = |label| row(&report, label)["delta"].as_f64().unwrap();
    assert!(
        delta("int8").abs() * 10.0 < delta("int2").abs(),
        "int8 {} vs int2 {}",
        delta("int8"),
        delta("int2")
    );
    // Everything passes a threshold of 1000: the fewest bits win.
    assert_eq!(report["table"]["recommendation"], "int2");
    assert!(stdout.contains("Recommendation: int2 ("), "{stdout}");
    let baseline = report["table"]["baseline_perplexity"].as_f64().unwrap();
    let perplexity = row(&report, "int8")["perplexity"].as_f64().unwrap();
    assert!((perplexity - baseline - delta("int8")).abs() < 1e-9);
    assert_eq!(report["tokens_scored"], 32);

    let csv = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(csv.lines().count(), 4, "{csv}");
    assert!(
        csv.lines()
            .nth(1)
            .unwrap()
            .starts_with("int2,\"-group-size 64 -sparsity 0.0 -bits 2\","),
        "{csv}"
    );
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert_eq!(
        svg.matches("<circle cx").count(),
        3 + 2,
        "three points, two legend marks"
    );
}

#[test]
fn a_sweep_where_nothing_passes_exits_1_without_a_recommendation() {
    let dir = tempfile::tempdir().unwrap();
    // An exact "reconstruction" has delta 0, which fails threshold 0. Like
    // the Go original, this compressor reports no bits_per_value: the
    // table derives it from the bytes (stored = original F32: 32 bits).
    let identity = identity_compressor(dir.path());
    let (output, report) = run_sweep_with(
        dir.path(),
        &["--variant", "same=-bits 8", "--threshold", "0"],
        &identity,
    );
    assert_eq!(
        output.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert!(report["table"]["recommendation"].is_null());
    assert_eq!(row(&report, "same")["delta"], 0.0);
    assert_eq!(row(&report, "same")["bits_per_value"], 32.0);
    assert!(String::from_utf8_lossy(&output.stdout).contains("Recommendation: none"));
}

#[test]
fn bad_sweep_flags_are_one_line_errors_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let compressor = kv_compress();
    for (args, expected) in [
        (
            vec!["--variant", "no-equals-sign", "--quiet"],
            "expected LABEL=FLAGS",
        ),
        (
            vec![
                "--variant",
                "a=-bits 8",
                "--variant",
                "a=-bits 4",
                "--quiet",
            ],
            "two sweep variants are labelled \"a\"",
        ),
        (
            vec!["--sweep-csv", "x.csv", "--quiet"],
            "need --sweep or --variant",
        ),
        (
            vec!["--sweep", "--quick-test", "--quiet"],
            "cannot run with --quick-test",
        ),
        (
            vec![
                "--sensitivity",
                "--sensitivity-flags",
                "-grid ecsq -rate 2.5",
                "--quiet",
            ],
            "must not set bits (-rate)",
        ),
        (
            vec![
                "--sensitivity",
                "--sensitivity-flags=-method kivi -layer-bits=k:0=2",
                "--quiet",
            ],
            "must not set bits (-layer-bits=k:0=2)",
        ),
    ] {
        let stderr = expect_error(&kv_validate(&args, &compressor));
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    // A flag kv-compress refuses fails the sweep with its message.
    let (output, _) = run_sweep(dir.path(), &["--variant", "bad=-bits 7"]);
    let stderr = expect_error(&output);
    assert!(stderr.contains("-bits 7"), "{stderr}");
}

/// `--sensitivity` probes every layer's keys and values of the tiny model (3
/// layers) at 2 to 6 bits, and `allocate` turns its JSON into flags
/// whose measured bits/value is exactly the predicted one: stored bits add
/// up tensor by tensor, which the allocation relies on.
#[test]
fn sensitivity_probes_allocate_flags_whose_measured_size_is_the_predicted_one() {
    let dir = tempfile::tempdir().unwrap();
    let (output, report) = run_sweep(dir.path(), &["--sensitivity"]);
    assert!(
        output.status.code().is_some_and(|code| code <= 1),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rows = report["table"]["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3 * 2 * 5 + 1);
    let reference = row(&report, "reference");
    let k1_2 = row(&report, "k1@2");
    assert!(k1_2["flags"]
        .as_str()
        .unwrap()
        .ends_with("-bits 8 -layer-bits k:1=2"));
    assert!(k1_2["bits_per_value"].as_f64() < reference["bits_per_value"].as_f64());

    let sweep_json = dir.path().join("sweep.json");
    let allocation_json = dir.path().join("allocation.json");
    let allocate = |budget: &str| {
        kv_validate(
            &[
                "allocate",
                "--sweep-json",
                sweep_json.to_str().unwrap(),
                "--bits",
                budget,
                "--json",
                allocation_json.to_str().unwrap(),
            ],
            &kv_compress(),
        )
    };
    let output = allocate("3.4");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let allocation: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&allocation_json).unwrap()).unwrap();
    let predicted = allocation["predicted_bits_per_value"].as_f64().unwrap();
    assert!(predicted <= 3.4, "{allocation}");
    let flags = allocation["flags"].as_str().unwrap().to_string();
    let tensors = allocation["bits"].as_array().unwrap();
    assert_eq!(tensors.len(), 3 * 2);
    assert_eq!(tensors[0]["kind"], "key");
    assert_eq!(tensors[3]["kind"], "value");

    let check = tempfile::tempdir().unwrap();
    let (output, measured) = run_sweep(check.path(), &["--variant", &format!("allocated={flags}")]);
    assert!(output.status.code().is_some_and(|code| code <= 1));
    let measured_bits = row(&measured, "allocated")["bits_per_value"]
        .as_f64()
        .unwrap();
    assert!(
        (measured_bits - predicted).abs() < 1e-9,
        "{measured_bits} against {predicted}"
    );

    let error = expect_error(&allocate("0.5"));
    assert!(error.contains("below the"), "{error}");
}

/// The flags `allocate` prints, pasted into a shell, reach kv-compress
/// whole: a `-layer-bits` rule holds `;`, which unquoted would end the
/// command and leave kv-compress with half the rules (issue 21). So do the
/// words of `--flags-file` through `$(cat F)` and `xargs`. Each gives the
/// bits/value of kv-compress run on the words directly, no shell between.
#[test]
fn allocated_flags_survive_a_shell_and_the_flags_file() {
    let dir = tempfile::tempdir().unwrap();
    let (output, _) = run_sweep(dir.path(), &["--sensitivity"]);
    assert!(output.status.code().is_some_and(|code| code <= 1));
    let flags_file = dir.path().join("flags.txt");
    let allocation_json = dir.path().join("allocation.json");
    let output = kv_validate(
        &[
            "allocate",
            "--sweep-json",
            dir.path().join("sweep.json").to_str().unwrap(),
            "--bits",
            "3.4",
            "--json",
            allocation_json.to_str().unwrap(),
            "--flags-file",
            flags_file.to_str().unwrap(),
        ],
        &kv_compress(),
    );
    expect_success(&output);
    let allocation = read_json(&allocation_json);
    let flags = allocation["flags"].as_str().unwrap();
    assert!(flags.contains(';'), "no rule separator to protect: {flags}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    let printed = stdout
        .lines()
        .find_map(|line| line.strip_prefix("kv-compress flags: "))
        .unwrap();
    // A cache of the probes' shape: 3 layers of [1, 2, 32, 16] F32.
    let cache = dir.path().join("cache.safetensors");
    let shape = [1, 2, 32, 16];
    let values: Vec<f32> = (0..1024)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
        .collect();
    let names: Vec<String> = (0..3)
        .flat_map(|layer| ["key", "value"].map(|kind| format!("layer_{layer}_{kind}")))
        .collect();
    let tensors: Vec<kvformat::CacheTensor<'_>> = names
        .iter()
        .map(|name| kvformat::CacheTensor {
            name,
            dtype: kvformat::CacheDtype::F32,
            shape: &shape,
            values: &values,
        })
        .collect();
    kvformat::write_cache(&cache, &tensors, &Default::default()).unwrap();
    let bits_through_shell = |script: &str| -> f64 {
        let output = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .env("KVC", kv_compress())
            .env("CACHE", &cache)
            .env("FLAGS_FILE", &flags_file)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        report["bits_per_value"].as_f64().unwrap()
    };
    // The reference: kv-compress given the words directly, no shell between.
    let direct = std::process::Command::new(kv_compress())
        .args(["-input", cache.to_str().unwrap(), "-metrics-only"])
        .args(flags.split_whitespace())
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&direct.stdout).unwrap();
    let expected = report["bits_per_value"].as_f64().unwrap();
    for script in [
        format!("\"$KVC\" -input \"$CACHE\" -metrics-only {printed}"),
        "\"$KVC\" -input \"$CACHE\" -metrics-only $(cat \"$FLAGS_FILE\")".to_string(),
        "xargs \"$KVC\" -input \"$CACHE\" -metrics-only < \"$FLAGS_FILE\"".to_string(),
    ] {
        let bits = bits_through_shell(&script);
        assert_eq!(bits, expected, "{script}");
    }
    // The same flags unquoted lose the rules after the first `;`.
    let cut = bits_through_shell(&format!(
        "\"$KVC\" -input \"$CACHE\" -metrics-only {flags} 2>/dev/null; true"
    ));
    assert_ne!(cut, expected, "the unquoted flags gave the same bits/value");
}

/// ecsq probes at one width on a slice of the windows (`--windows 1..2
/// --records`), `allocate --records` gives every tensor a fractional rate
/// by water filling, and those flags, measured on both windows, stay within
/// the budget: each tensor's `-rate` bounds its stored size.
#[test]
fn ecsq_probes_on_a_slice_allocate_rates_that_keep_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let records = dir.path().join("probes.json");
    let flags = "-method kivi -grid ecsq -key-group-size 1024 -value-axis channel \
                 -value-group-size 1024 -sink-tokens 1";
    let output = run_tiny(
        dir.path(),
        &[
            "--windows",
            "1..2",
            "--records",
            records.to_str().unwrap(),
            "--sensitivity",
            "--sensitivity-bits",
            "3",
            "--sensitivity-flags",
            flags,
        ],
        &kv_compress(),
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let allocation_json = dir.path().join("allocation.json");
    let budget = 3.3;
    let output = kv_validate(
        &[
            "allocate",
            "--records",
            records.to_str().unwrap(),
            "--bits",
            &budget.to_string(),
            "--json",
            allocation_json.to_str().unwrap(),
        ],
        &kv_compress(),
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let allocation: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&allocation_json).unwrap()).unwrap();
    let allocated = allocation["flags"].as_str().unwrap().to_string();
    assert!(
        allocated.contains(&format!("{flags} -rate 3.3 -layer-bits ")),
        "{allocated}"
    );
    let rates: Vec<f64> = allocation["bits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|tensor| tensor["bits"].as_f64().unwrap())
        .collect();
    assert_eq!(rates.len(), 3 * 2);
    assert!(
        rates.iter().any(|&r| r != rates[0]),
        "equal damages everywhere? {rates:?}"
    );
    let predicted = allocation["predicted_bits_per_value"].as_f64().unwrap();
    assert!(
        predicted <= budget + 1e-6 && predicted > budget - 0.01,
        "{allocation}"
    );

    let check = tempfile::tempdir().unwrap();
    let (output, measured) = run_sweep(
        check.path(),
        &["--variant", &format!("allocated={allocated}")],
    );
    assert!(output.status.code().is_some_and(|code| code <= 1));
    let measured_bits = row(&measured, "allocated")["bits_per_value"]
        .as_f64()
        .unwrap();
    assert!(
        measured_bits <= predicted + 1e-6 && measured_bits > predicted - 0.1,
        "{measured_bits} against {predicted}"
    );
    // A sweep JSON and records at once are refused.
    let both = kv_validate(
        &[
            "allocate",
            "--records",
            "a.json",
            "--sweep-json",
            "b.json",
            "--bits",
            "3",
        ],
        &kv_compress(),
    );
    assert_eq!(both.status.code(), Some(2));
}
