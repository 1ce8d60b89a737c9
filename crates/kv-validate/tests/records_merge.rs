//! `--windows`/`--records` slices and `kv-validate merge` on the tiny model
//! with the real compressor: merged slices give the report of one run over
//! all windows, byte for byte but for timings; slices of different runs,
//! overlapping or incomplete ones are refused; `--max-kld` decides pass and
//! fail; an exact reconstruction has KLD exactly 0 and full top-1 agreement.

mod common;

use std::path::Path;

use common::*;

/// The original's sliding window on the tiny model (1024 tokens, stride
/// 512): window 0 has no context, so the records hold a window without a
/// compressed cache next to three with one.
fn sliding_args<'a>(model_dir: &'a str, prose: &'a str) -> Vec<&'a str> {
    vec![
        "--model-dir",
        model_dir,
        "--text-file",
        prose,
        "--max-windows",
        "4",
        "--quiet",
        "--compress-arg=-method",
        "--compress-arg=kivi",
        "--compress-arg=-bits",
        "--compress-arg=2",
        "--threshold",
        "1000",
    ]
}

/// A JSON report without its timings (the only figures a merge may change).
fn without_timings(path: &Path) -> serde_json::Value {
    let mut report = read_json(path);
    let object = report.as_object_mut().unwrap();
    assert!(
        object.remove("timing").is_some() || object.remove("wall_seconds").is_some(),
        "{path:?} has timings"
    );
    report
}

/// Stdout without its wall-time line.
fn text_without_timings(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| !line.starts_with("Wall time"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn run_ok(args: &[&str]) -> std::process::Output {
    let output = kv_validate(args, &kv_compress());
    expect_success(&output);
    output
}

#[test]
fn merged_slices_give_the_report_of_one_run_to_the_last_digit() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let prose = prose_path();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let (full_json, all, a, b, merged_json) = (
        path("full.json"),
        path("all.records.json"),
        path("a.records.json"),
        path("b.records.json"),
        path("merged.json"),
    );
    let base = sliding_args(model.hf_dir.to_str().unwrap(), prose.to_str().unwrap());
    fn with<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        [base, extra].concat()
    }

    let full = run_ok(&with(&base, &["--json", &full_json, "--records", &all]));
    let slice = run_ok(&with(&base, &["--windows", "1..4", "--records", &b]));
    assert!(slice.stdout.is_empty(), "a slice prints no report");
    run_ok(&with(&base, &["--windows", "0..1", "--records", &a]));

    // Slices in any order, and the whole run's own records alone.
    let merged = run_ok(&["merge", &b, &a, "--json", &merged_json]);
    assert_eq!(
        without_timings(Path::new(&merged_json)),
        without_timings(Path::new(&full_json))
    );
    assert_eq!(text_without_timings(&merged), text_without_timings(&full));
    let again = run_ok(&["merge", &all, "--json", &merged_json]);
    assert_eq!(text_without_timings(&again), text_without_timings(&full));

    let report = read_json(Path::new(&full_json));
    assert_eq!(report["windows"], 4);
    assert_eq!(report["windows_compressed"], 3);
    let on_cache = &report["fidelity"]["on_compressed_cache"];
    assert_eq!(on_cache["tokens"], report["tokens_on_compressed_cache"]);
    let kld = on_cache["kld"]["mean"].as_f64().unwrap();
    assert!(kld > 0.0, "2-bit KIVI moves the distribution: {report}");
    assert!(on_cache["kld"]["max"].as_f64().unwrap() >= on_cache["kld"]["p99"].as_f64().unwrap());
    let all_tokens = &report["fidelity"]["all_tokens"];
    assert_eq!(all_tokens["tokens"], report["tokens_scored"]);
    // The prefill's tokens have KLD 0: the all-token mean is diluted exactly.
    let diluted =
        kld * on_cache["tokens"].as_f64().unwrap() / all_tokens["tokens"].as_f64().unwrap();
    let all_mean = all_tokens["kld"]["mean"].as_f64().unwrap();
    assert!(
        (all_mean - diluted).abs() <= 1e-12 * diluted,
        "{all_mean} vs {diluted}"
    );
    assert!(
        report["perplexity"]["delta_standard_error"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    let text = String::from_utf8_lossy(&full.stdout);
    assert!(text.contains("tokens on a compressed cache:"), "{text}");
    assert!(text.contains("Same top-1 token:"), "{text}");
}

#[test]
fn a_merged_sweep_gives_the_same_table_csv_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let prose = prose_path();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let base = [
        &short_run_args(model.hf_dir.to_str().unwrap(), prose.to_str().unwrap(), "3")[..],
        &[
            "--variant",
            "int8=-bits 8",
            "--variant",
            "kivi2=-method kivi -bits 2",
            "--max-kld",
            "1000",
        ],
    ]
    .concat();
    let outputs = |tag: &str| {
        [
            "--json".to_string(),
            path(&format!("{tag}.json")),
            "--sweep-csv".into(),
            path(&format!("{tag}.csv")),
            "--sweep-plot".into(),
            path(&format!("{tag}.svg")),
            "--sweep-kld-plot".into(),
            path(&format!("{tag}.kld.svg")),
        ]
    };
    let full_outputs = outputs("full");
    let mut args: Vec<&str> = base.to_vec();
    args.extend(full_outputs.iter().map(String::as_str));
    let full = run_ok(&args);
    let (a, b) = (path("a.records.json"), path("b.records.json"));
    run_ok(&[base.as_slice(), &["--windows", "0..2", "--records", &a]].concat());
    run_ok(&[base.as_slice(), &["--windows", "2..3", "--records", &b]].concat());
    let merged_outputs = outputs("merged");
    let mut args = vec!["merge", a.as_str(), b.as_str()];
    args.extend(merged_outputs.iter().map(String::as_str));
    let merged = run_ok(&args);

    assert_eq!(text_without_timings(&merged), text_without_timings(&full));
    assert_eq!(
        without_timings(Path::new(&path("merged.json"))),
        without_timings(Path::new(&path("full.json")))
    );
    for file in ["csv", "svg", "kld.svg"] {
        let read = |tag: &str| std::fs::read_to_string(path(&format!("{tag}.{file}"))).unwrap();
        assert_eq!(read("merged"), read("full"), "{file}");
    }
    let csv = std::fs::read_to_string(path("full.csv")).unwrap();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    assert_eq!(
        header,
        [
            "label",
            "flags",
            "bits_per_value",
            "compression_ratio",
            "perplexity",
            "delta",
            "passed",
            "pareto",
            "delta_se",
            "within_noise",
            "kld_mean",
            "kld_se",
            "kld_p99",
            "kld_max",
            "top1_percent",
            "delta_p_mean_percent",
            "pareto_kld"
        ]
    );
    // Every row has every column, the KLD ones filled in.
    let report = read_json(Path::new(&path("full.json")));
    for (line, row) in csv
        .lines()
        .skip(1)
        .zip(report["table"]["rows"].as_array().unwrap())
    {
        let fields: Vec<&str> = line.rsplitn(10, ',').collect();
        assert_eq!(fields.len(), 10, "{line}");
        let kld_mean: f64 = fields[6].parse().unwrap();
        assert!(
            (kld_mean - row["kld_mean"].as_f64().unwrap()).abs() < 5e-7,
            "{line}"
        );
    }
    let kld = |label: &str| {
        report["table"]["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|row| row["label"] == label)
            .unwrap()["kld_mean"]
            .as_f64()
            .unwrap()
    };
    assert!(kld("int8") * 10.0 < kld("kivi2"), "{report}");
    assert_eq!(report["table"]["max_kld"], 1000.0);
    assert!(
        report["table"]["threshold"].is_null(),
        "--max-kld alone replaces the threshold"
    );
}

#[test]
fn max_kld_decides_pass_and_fail() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let prose = prose_path();
    let json = dir.path().join("report.json");
    let base = [
        &short_run_args(model.hf_dir.to_str().unwrap(), prose.to_str().unwrap(), "2")[..],
        &[
            "--compress-arg=-bits",
            "--compress-arg=2",
            "--json",
            json.to_str().unwrap(),
        ],
    ]
    .concat();
    let run = |extra: &[&str]| kv_validate(&[base.as_slice(), extra].concat(), &kv_compress());
    let output = run(&["--max-kld", "1000"]);
    expect_success(&output);
    let report = read_json(&json);
    let kld = report["fidelity"]["on_compressed_cache"]["kld"]["mean"]
        .as_f64()
        .unwrap();
    assert!(kld > 0.0);
    assert!(report["threshold"].is_null());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("Status: PASSED (mean KLD"), "{stdout}");

    // Just below the measured mean fails, just above passes.
    let below = format!("{}", kld * 0.999);
    let above = format!("{}", kld * 1.001);
    assert_eq!(run(&["--max-kld", &below]).status.code(), Some(1));
    expect_success(&run(&["--max-kld", &above]));
    // With a threshold too, both must hold.
    assert_eq!(
        run(&["--max-kld", &below, "--threshold", "1000"])
            .status
            .code(),
        Some(1)
    );
    let error = expect_error(&run(&["--max-kld", "-1"]));
    assert!(
        error.contains("--max-kld must be a non-negative number"),
        "{error}"
    );
}

#[test]
fn an_exact_reconstruction_has_kld_zero_and_full_top1_agreement() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let prose = prose_path();
    let json = dir.path().join("report.json");
    let args = [
        &short_run_args(model.hf_dir.to_str().unwrap(), prose.to_str().unwrap(), "2")[..],
        &["--json", json.to_str().unwrap()],
    ]
    .concat();
    expect_success(&kv_validate(&args, &identity_compressor(dir.path())));
    let report = read_json(&json);
    let on_cache = &report["fidelity"]["on_compressed_cache"];
    assert_eq!(on_cache["tokens"], 2 * 15);
    assert_eq!(on_cache["kld"]["max"], 0.0);
    assert_eq!(on_cache["top1_agreement_percent"], 100.0);
    assert_eq!(on_cache["delta_p"]["max_percent"], 0.0);
    assert_eq!(report["perplexity"]["delta"], 0.0);
    assert_eq!(report["perplexity"]["delta_standard_error"], 0.0);
}

#[test]
fn slices_that_do_not_make_one_run_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let prose = prose_path();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let base = short_run_args(model.hf_dir.to_str().unwrap(), prose.to_str().unwrap(), "3");
    let slice = |windows: &str, name: &str, extra: &[&str]| {
        let records = path(name);
        run_ok(
            &[
                base.as_slice(),
                &["--windows", windows, "--records", &records],
                extra,
            ]
            .concat(),
        );
        records
    };
    let first = slice("0..2", "a.json", &[]);
    let overlapping = slice("1..3", "b.json", &[]);
    let rest_other_threshold = slice("2..3", "c.json", &["--threshold", "0.25"]);
    let rest = slice("2..3", "d.json", &[]);
    let merge = |files: &[&str]| {
        let args: Vec<&str> = ["merge"]
            .iter()
            .copied()
            .chain(files.iter().copied())
            .collect();
        expect_error(&kv_validate(&args, &kv_compress()))
    };
    let error = merge(&[&first, &overlapping]);
    assert!(error.contains("window 1 is in both"), "{error}");
    let error = merge(&[&first]);
    assert!(
        error.contains("do not cover windows 2..3 of the run's 3"),
        "{error}"
    );
    let error = merge(&[&first, &rest_other_threshold]);
    assert!(
        error.contains("are not slices of the same run: their criteria differ"),
        "{error}"
    );
    assert!(error.contains("0.25"), "{error}");
    let not_records = path("not-records.json");
    std::fs::write(&not_records, "{\"format\": 3}").unwrap();
    let error = merge(&[&first, &not_records]);
    assert!(
        error.contains("is not a kv-validate records file"),
        "{error}"
    );
    // A record edited to be inconsistent is named with its window.
    let text = std::fs::read_to_string(&rest).unwrap();
    let mut records: serde_json::Value = serde_json::from_str(&text).unwrap();
    records["windows"][0]["variants"][0]["kld"]
        .as_array_mut()
        .unwrap()
        .pop();
    std::fs::write(&rest, serde_json::to_string(&records).unwrap()).unwrap();
    let error = merge(&[&first, &rest]);
    assert!(error.contains("window 2: variant 0"), "{error}");

    // Slices from different devices merge; the report names each device.
    let on_gpu = slice("2..3", "e.json", &[]);
    let mut records: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&on_gpu).unwrap()).unwrap();
    records["run"]["device"] = "cuda:0 (NVIDIA H200)".into();
    std::fs::write(&on_gpu, serde_json::to_string(&records).unwrap()).unwrap();
    let json = path("mixed.json");
    let output = kv_validate(&["merge", &first, &on_gpu, "--json", &json], &kv_compress());
    assert_ne!(output.status.code(), Some(2), "merged, passed or not");
    let device = read_json(Path::new(&json))["device"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        device.starts_with("cpu") && device.ends_with(" + cuda:0 (NVIDIA H200)"),
        "{device}"
    );

    // Bad --windows: beyond the plan, malformed, or without --records.
    let run = |extra: &[&str]| kv_validate(&[base.as_slice(), extra].concat(), &kv_compress());
    let error = expect_error(&run(&["--windows", "2..9", "--records", &path("x.json")]));
    assert!(error.contains("the plan has only 3 windows"), "{error}");
    let output = run(&["--windows", "3", "--records", &path("x.json")]);
    assert_eq!(output.status.code(), Some(2));
    let output = run(&["--windows", "0..1"]);
    assert_eq!(output.status.code(), Some(2), "--windows needs --records");
}
