//! Issue 21 ("Reliability III") on the real binary: no output of any
//! command may be one of its inputs or another of its outputs (by file
//! identity: symlinks, hard links, `./x`), refused before any work; slices
//! and sweeps of different models or texts are not combined, whatever their
//! names; capacity refuses a config whose sizes overflow.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// Runs kv-validate expecting the usage error of two colliding paths; returns the line.
fn expect_clash(args: &[&str], needles: &[&str]) -> String {
    let line = expect_error(&kv_validate(args, &kv_compress()));
    assert!(line.contains("is the same file as"), "{line}");
    for needle in needles {
        assert!(line.contains(needle), "{line} lacks {needle:?}");
    }
    line
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

#[test]
fn no_output_may_be_an_input_or_another_output() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let text = dir.path().join("text.txt");
    std::fs::copy(prose_path(), &text).unwrap();
    let precious = |name: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, format!("precious {name}")).unwrap();
        path
    };
    let (records, a, b, sweep) = (
        precious("r.json"),
        precious("a.json"),
        precious("b.json"),
        precious("sweep.json"),
    );
    let gguf = model.gguf.clone();
    let run = |extra: &[&str]| -> Vec<String> {
        ["--gguf", s(&gguf), "--text-file", s(&text), "--quiet"]
            .iter()
            .chain(extra)
            .map(|a| a.to_string())
            .collect()
    };
    let link = dir.path().join("link.json");
    std::os::unix::fs::symlink(&gguf, &link).unwrap();
    let hard = dir.path().join("hard.txt");
    std::fs::hard_link(&text, &hard).unwrap();
    let dotted = |path: &Path| {
        path.parent()
            .unwrap()
            .join(".")
            .join(path.file_name().unwrap())
    };
    let config = model.hf_dir.join("config.json");
    let allocate = |extra: &[&str]| {
        owned(
            &[
                &["allocate", "--sweep-json", s(&sweep), "--bits", "3"],
                extra,
            ]
            .concat(),
        )
    };
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (run(&["--json", s(&gguf)]), vec!["(--json)", "(--gguf)"]),
        (run(&["--json", s(&text)]), vec!["(--text-file)"]),
        (
            run(&["--json", s(&link)]),
            vec!["link.json (--json)", "(--gguf)"],
        ),
        (
            run(&["--json", s(&hard)]),
            vec!["hard.txt (--json)", "(--text-file)"],
        ),
        (
            run(&["--records", s(&records), "--json", s(&dotted(&records))]),
            vec!["(--json)", "(--records)", "two outputs"],
        ),
        (
            run(&[
                "--sweep",
                "--sweep-csv",
                s(&a),
                "--sweep-plot",
                s(&dotted(&a)),
            ]),
            vec!["(--sweep-plot)", "(--sweep-csv)"],
        ),
        (
            owned(&["--model-dir", s(&model.hf_dir), "--json", s(&config)]),
            vec!["(a file of --model-dir)"],
        ),
        (
            owned(&["merge", s(&a), s(&b), "--json", s(&a)]),
            vec!["a.json (--json)", "(a merged records file)"],
        ),
        (allocate(&["--json", s(&sweep)]), vec!["(--sweep-json)"]),
        (
            allocate(&["--json", s(&a), "--flags-file", s(&dotted(&a))]),
            vec!["(--flags-file)", "(--json)"],
        ),
        (
            owned(&[
                "capacity",
                "--model-dir",
                s(&model.hf_dir),
                "--plot",
                s(&config),
            ]),
            vec!["(--plot)", "(a file of --model-dir)"],
        ),
        (
            owned(&["capacity", "--gguf", s(&gguf), "--json", s(&gguf)]),
            vec!["(--gguf)"],
        ),
        (run(&["--json", s(&kv_compress())]), vec!["(kv-compress)"]),
    ];
    let snapshot = |paths: &[&PathBuf]| -> Vec<Vec<u8>> {
        paths.iter().map(|p| std::fs::read(p).unwrap()).collect()
    };
    let inputs = [
        &gguf,
        &text,
        &records,
        &a,
        &b,
        &sweep,
        &config,
        &kv_compress(),
    ];
    let before = snapshot(&inputs);
    for (args, needles) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        expect_clash(&args, needles);
    }
    assert!(snapshot(&inputs) == before, "an input changed");
    // Distinct paths still work: the rule is about identity, not directories.
    let output = kv_validate(
        &[
            "capacity",
            "--model-dir",
            s(&model.hf_dir),
            "--json",
            s(&model.hf_dir.join("capacity.json")),
        ],
        &kv_compress(),
    );
    expect_success(&output);
}

#[test]
fn empty_path_flags_are_missing_values() {
    for flag in ["--json=", "--text-file=", "--records="] {
        let output = kv_validate(&[flag, "--quick-test"], &kv_compress());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{flag}: {stderr}");
        assert!(
            stderr.contains(flag.trim_end_matches('=')),
            "{flag}: {stderr}"
        );
    }
}

fn sha256_of(path: &Path) -> String {
    let output = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8(output.stdout).unwrap()[..64].to_string()
}

/// Two slices run on "the same" text path whose content changed in between
/// (two machines, two files called text.txt) are not one run: merge names
/// the text's content digest. The report carries the digests, which match
/// sha256sum's.
#[test]
fn slices_of_different_texts_under_one_name_are_not_merged() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let text = dir.path().join("text.txt");
    let prose = std::fs::read_to_string(prose_path()).unwrap();
    std::fs::write(&text, &prose).unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let base = short_run_args(model.hf_dir.to_str().unwrap(), s(&text), "3");
    let slice = |windows: &str, name: &str| {
        let records = path(name);
        let args = [
            base.as_slice(),
            &["--windows", windows, "--records", &records],
        ]
        .concat();
        expect_success(&kv_validate(&args, &kv_compress()));
        records
    };
    let first = slice("0..2", "a.json");
    let rest = slice("2..3", "b.json");
    let json = path("report.json");
    let merged = kv_validate(&["merge", &first, &rest, "--json", &json], &kv_compress());
    assert_ne!(
        merged.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&merged.stderr)
    );
    let report = read_json(Path::new(&json));
    assert_eq!(report["text_content"]["sha256"], sha256_of(&text));
    assert_eq!(report["text_content"]["bytes"], prose.len());
    assert_eq!(
        report["config_content"]["sha256"],
        sha256_of(&model.hf_dir.join("config.json"))
    );
    // Another text of the same name (one letter changed, same length).
    let other = prose.replacen("the", "she", 1);
    assert_eq!(other.len(), prose.len());
    std::fs::write(&text, other).unwrap();
    let changed = slice("2..3", "c.json");
    let error = expect_error(&kv_validate(&["merge", &first, &changed], &kv_compress()));
    assert!(
        error.contains("are not slices of the same run: their text_content differ"),
        "{error}"
    );
    // allocate --records combines slices under the same rule.
    let error = expect_error(&kv_validate(
        &["allocate", "--records", &first, &changed, "--bits", "3"],
        &kv_compress(),
    ));
    assert!(error.contains("their text_content differ"), "{error}");
    // A hostile timing that would overflow the merged sum is refused.
    let mut hostile: serde_json::Value = read_json(Path::new(&rest));
    hostile["timings"]["total"]["secs"] = u64::MAX.into();
    let hostile_path = path("hostile.json");
    std::fs::write(&hostile_path, hostile.to_string()).unwrap();
    let error = expect_error(&kv_validate(
        &["merge", &first, &hostile_path],
        &kv_compress(),
    ));
    assert!(
        error.contains("timings") && error.contains("implausible"),
        "{error}"
    );
    // So is a compressor size that would overflow the sums over windows.
    let mut hostile: serde_json::Value = read_json(Path::new(&rest));
    hostile["windows"][0]["variants"][0]["metrics"]["original_size_bytes"] = u64::MAX.into();
    std::fs::write(&hostile_path, hostile.to_string()).unwrap();
    let error = expect_error(&kv_validate(
        &["merge", &first, &hostile_path],
        &kv_compress(),
    ));
    assert!(
        error.contains("original_size_bytes = 18446744073709551615 is beyond"),
        "{error}"
    );
    // Records of the layout before content digests are refused, saying why.
    let mut old: serde_json::Value = read_json(Path::new(&rest));
    old["version"] = 1.into();
    for field in [
        "model_content",
        "config_content",
        "text_content",
        "tokens_content",
    ] {
        old["run"].as_object_mut().unwrap().remove(field);
    }
    std::fs::write(&rest, old.to_string()).unwrap();
    let error = expect_error(&kv_validate(&["merge", &first, &rest], &kv_compress()));
    assert!(
        error.contains("version 1") && error.contains("not by content"),
        "{error}"
    );
}

fn config_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/configs")
        .join(name)
}

/// A sweep JSON of one row, measured on the model whose config is `config`
/// (`None`: a sweep that does not say).
fn sweep_of(path: &Path, config: Option<&Path>) {
    let mut json = serde_json::json!({
        "model": "m", "table": {
            "baseline_perplexity": 10.0, "threshold": 0.5, "max_kld": null, "recommendation": null,
            "rows": [{
                "label": "int4", "flags": "", "bits_per_value": 4.25, "compression_ratio": 3.76,
                "perplexity": 10.1, "delta": 0.1, "delta_standard_error": null,
                "delta_within_noise": null, "kld_mean": null, "kld_standard_error": null,
                "kld_p99": null, "kld_max": null, "top1_agreement_percent": null,
                "delta_p_mean_percent": null, "passed": true, "pareto": true, "pareto_kld": true,
            }],
        }
    });
    if let Some(config) = config {
        json["config_content"] = serde_json::json!({
            "sha256": sha256_of(config),
            "bytes": std::fs::metadata(config).unwrap().len(),
        });
    }
    std::fs::write(path, json.to_string()).unwrap();
}

#[test]
fn capacity_sets_a_sweep_beside_its_own_model_only() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = dir.path().join("sweep.json");
    let tinyllama = config_dir("tinyllama-1.1b");
    let smollm2 = config_dir("smollm2-135m");
    let capacity = |model: &Path| {
        kv_validate(
            &[
                "capacity",
                "--model-dir",
                s(model),
                "--sweep-json",
                s(&sweep),
            ],
            &kv_compress(),
        )
    };
    sweep_of(&sweep, Some(&smollm2.join("config.json")));
    expect_success(&capacity(&smollm2));
    let error = expect_error(&capacity(&tinyllama));
    assert!(
        error.contains("sweep.json: measured another model"),
        "{error}"
    );
    assert!(error.contains("config_content"), "{error}");
    sweep_of(&sweep, None);
    let error = expect_error(&capacity(&smollm2));
    assert!(
        error.contains("does not say which model it measured"),
        "{error}"
    );
}

#[test]
fn capacity_refuses_sizes_that_overflow_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let original: serde_json::Value = read_json(&config_dir("tinyllama-1.1b").join("config.json"));
    for (field, value) in [
        ("num_hidden_layers", 1u64 << 62),
        ("vocab_size", 1u64 << 63),
        ("head_dim", 1u64 << 62),
        ("intermediate_size", 1u64 << 62),
    ] {
        let model = dir.path().join(field);
        std::fs::create_dir(&model).unwrap();
        let mut config = original.clone();
        config[field] = value.into();
        std::fs::write(model.join("config.json"), config.to_string()).unwrap();
        let output = kv_validate(&["capacity", "--model-dir", s(&model)], &kv_compress());
        let error = expect_error(&output);
        assert!(
            error.contains(&format!("{field} = {value} is implausible")),
            "{field}: {error}"
        );
        assert!(output.stdout.is_empty(), "a report was printed");
    }
}

/// A write beyond `ulimit -f` (SIGXFSZ) is an error like any other: one
/// line, exit 2, the scratch directory removed, no temp file left.
#[test]
fn a_file_size_limit_is_an_error_that_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let scratch = dir.path().join("scratch");
    let out = dir.path().join("out");
    std::fs::create_dir_all(&scratch).unwrap();
    std::fs::create_dir_all(&out).unwrap();
    let json = out.join("report.json");
    let prose = prose_path();
    let mut args = short_run_args(s(&model.hf_dir), s(&prose), "2");
    args.extend(["--scratch-dir", s(&scratch), "--json", s(&json)]);
    // 4 blocks (2 or 4 KiB, by the shell's unit): a window's 24 KiB cache does not fit.
    let output = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -f 4 && exec \"$@\"")
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_kv-validate"))
        .args(&args)
        .env("KV_COMPRESS_PATH", kv_compress())
        .output()
        .unwrap();
    let line = expect_error(&output);
    assert!(line.contains("File too large"), "{line}");
    for dir in [&scratch, &out] {
        let left: Vec<_> = std::fs::read_dir(dir).unwrap().collect();
        assert!(left.is_empty(), "{} keeps {left:?}", dir.display());
    }
}
