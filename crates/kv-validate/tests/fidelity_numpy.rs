//! The report's statistics against numpy: a hand-made set of windows (one
//! without a cache, two with one) goes through `Evaluation::from_records` and
//! `ValidationReport`, and a numpy script computes the same figures from the
//! same numbers independently: perplexities, the delta's standard error from
//! the paired NLL differences, KLD mean/SE/median/p99/max, top-1 agreement
//! and Δp.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use kv_validate::evaluate::Evaluation;
use kv_validate::report::ValidationReport;
use kv_validate::run_types::CompressSettings;
use kv_validate::run_types::Timings;
use kv_validate::run_types::{PassCriteria, RunDescription};
use kv_validate::run_types::{VariantRecord, WindowRecord};

const NUMPY_REFERENCE: &str = r#"
import json, sys
import numpy as np

case = json.load(sys.stdin)
base, comp, kld, top1, on_cache = ([], [], [], [], [])
for w in case["windows"]:
    b = np.array(w["baseline_nll"])
    if w["variants"]:
        v = w["variants"][0]
        c = np.array(v["nll"])
        mask = np.arange(len(b)) > 0  # the first target comes from the prefill
        kld.append(np.array(v["kld"]))
        top1.append(np.array(v["top1_agrees"], dtype=float))
        on_cache.append(mask)
    else:
        c = b.copy()
        kld.append(np.zeros(len(b)))
        top1.append(np.ones(len(b)))
        on_cache.append(np.zeros(len(b), dtype=bool))
    base.append(b)
    comp.append(c)
b, c = np.concatenate(base), np.concatenate(comp)
kld, top1, on_cache = np.concatenate(kld), np.concatenate(top1), np.concatenate(on_cache)
ppl_b, ppl_c = np.exp(b.mean()), np.exp(c.mean())
d = c - b
se = ppl_c * d.std(ddof=1) / np.sqrt(len(d))
k = kld[on_cache]
t = top1[on_cache]
dp = 100 * (np.exp(-c) - np.exp(-b))[on_cache]
print(json.dumps({
    "baseline": ppl_b, "compressed": ppl_c, "delta": ppl_c - ppl_b,
    "delta_se": se, "within_noise": bool(abs(ppl_c - ppl_b) < 2 * se),
    "kld_mean": k.mean(), "kld_se": k.std(ddof=1) / np.sqrt(len(k)),
    "kld_median": np.median(k), "kld_p99": np.percentile(k, 99), "kld_max": k.max(),
    "kld_all_mean": kld.mean(),
    "top1": 100 * t.mean(), "top1_se": 100 * t.std(ddof=1) / np.sqrt(len(t)),
    "dp_mean": dp.mean(), "dp_se": dp.std(ddof=1) / np.sqrt(len(dp)),
    "dp_rms": np.sqrt((dp ** 2).mean()), "dp_p1": np.percentile(dp, 1),
    "dp_p99": np.percentile(dp, 99), "dp_min": dp.min(), "dp_max": dp.max(),
    "tokens_on_cache": int(on_cache.sum()),
}))
"#;

/// Deterministic, irregular values in [0, 1).
fn pseudo_random(seed: u64) -> impl FnMut() -> f64 {
    let mut state = seed;
    move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn compressor_report() -> kvformat::Report {
    serde_json::from_value(serde_json::json!({
        "compression_ratio": 4.0, "original_size_bytes": 400, "compressed_size_bytes": 100,
        "rmse": 0.1, "snr_db": 20.0, "cosine_similarity": 0.99, "max_error": 0.5,
        "quality_level": "GOOD", "processing_time_ms": 1.0, "quality_passed": true,
        "violations": []
    }))
    .unwrap()
}

/// Window 0 has no context (6 tokens scored alike); windows 1 and 2 have a
/// cache, 9 and 13 scored tokens, the compressed NLLs the baseline's plus noise.
fn records() -> Vec<WindowRecord> {
    let mut random = pseudo_random(7);
    let mut nlls = |n: usize| (0..n).map(|_| 0.5 + 4.0 * random()).collect::<Vec<f64>>();
    let mut records = vec![WindowRecord {
        index: 0,
        begin: 0,
        context_end: 0,
        end: 7,
        baseline_nll: nlls(6),
        variants: Vec::new(),
    }];
    let mut noise = pseudo_random(11);
    for (index, (begin, tokens)) in [(7usize, 9usize), (30, 13)].into_iter().enumerate() {
        let baseline = nlls(tokens);
        let mut nll = baseline.clone();
        let mut kld = vec![0.0];
        let mut top1 = vec![true];
        for value in nll.iter_mut().skip(1) {
            *value += 0.3 * (noise() - 0.35);
            kld.push(0.05 * noise() * noise());
            top1.push(noise() > 0.2);
        }
        records.push(WindowRecord {
            index: index + 1,
            begin,
            context_end: begin + 10,
            end: begin + 10 + tokens,
            baseline_nll: baseline,
            variants: vec![VariantRecord {
                nll,
                kld,
                top1_agrees: top1,
                metrics: compressor_report(),
            }],
        });
    }
    records
}

fn numpy_reference(records: &[WindowRecord]) -> serde_json::Value {
    let mut child = Command::new("python3")
        .args(["-c", NUMPY_REFERENCE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 with numpy must be installed to run the numpy reference");
    let input = serde_json::to_vec(&serde_json::json!({ "windows": records })).unwrap();
    child.stdin.take().unwrap().write_all(&input).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "numpy reference failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn report_statistics_match_numpy_on_hand_made_records() {
    let records = records();
    let reference = numpy_reference(&records);
    let evaluation = Evaluation::from_records(
        &[CompressSettings::default()],
        records,
        Timings {
            total: Duration::from_secs(1),
            ..Timings::default()
        },
    );
    let run = RunDescription {
        model: "m".into(),
        data: "d".into(),
        protocol: "p".into(),
        compressor: "c".into(),
        device: "cpu".into(),
        cache_dtype: "float32".into(),
        criteria: PassCriteria {
            threshold: Some(0.5),
            max_kld: None,
        },
        content: Default::default(),
    };
    let report = ValidationReport::new(&run, &evaluation, &evaluation.variants[0]);
    let expect = |name: &str, ours: f64| {
        let theirs = reference[name].as_f64().unwrap();
        assert!(
            (ours - theirs).abs() <= 1e-12 * theirs.abs().max(1e-3),
            "{name}: ours {ours}, numpy {theirs}"
        );
    };
    let p = &report.perplexity;
    expect("baseline", p.baseline);
    expect("compressed", p.compressed);
    expect("delta", p.delta);
    expect("delta_se", p.delta_standard_error.unwrap());
    assert_eq!(
        p.delta_within_noise,
        reference["within_noise"].as_bool(),
        "{reference}"
    );
    assert_eq!(
        report.tokens_on_compressed_cache as u64,
        reference["tokens_on_cache"].as_u64().unwrap()
    );
    let on_cache = report.fidelity.on_compressed_cache.as_ref().unwrap();
    expect("kld_mean", on_cache.kld.mean);
    expect("kld_se", on_cache.kld.standard_error.unwrap());
    expect("kld_median", on_cache.kld.median);
    expect("kld_p99", on_cache.kld.p99);
    expect("kld_max", on_cache.kld.max);
    expect(
        "kld_all_mean",
        report.fidelity.all_tokens.as_ref().unwrap().kld.mean,
    );
    expect("top1", on_cache.top1_agreement_percent);
    expect("top1_se", on_cache.top1_standard_error_percent.unwrap());
    let dp = &on_cache.delta_p;
    expect("dp_mean", dp.mean_percent);
    expect("dp_se", dp.standard_error_percent.unwrap());
    expect("dp_rms", dp.rms_percent);
    expect("dp_p1", dp.p1_percent);
    expect("dp_p99", dp.p99_percent);
    expect("dp_min", dp.min_percent);
    expect("dp_max", dp.max_percent);
}
