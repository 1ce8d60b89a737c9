//! Windows in flight together (`--pipeline-depth`): the reports are the
//! sequential run's to the byte, all but the time split, and the exchange
//! really runs beside the model.

mod common;

use std::path::Path;

use common::*;

/// `text` without its `Wall time:` lines, the ones that differ run to run.
fn without_wall_time(text: &str) -> String {
    text.lines()
        .filter(|line| !line.starts_with("Wall time:"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `json` without its times: the `timing`/`timings` objects, `wall_seconds`
/// and kv-compress's `processing_time_ms`.
fn without_times(mut json: serde_json::Value) -> serde_json::Value {
    if let Some(object) = json.as_object_mut() {
        for key in ["timing", "timings", "wall_seconds", "processing_time_ms"] {
            object.remove(key);
        }
        for value in object.values_mut() {
            *value = without_times(value.take());
        }
    } else if let Some(array) = json.as_array_mut() {
        for value in array.iter_mut() {
            *value = without_times(value.take());
        }
    }
    json
}

/// A run of the tiny model over 8 windows with `extra` and
/// `--pipeline-depth depth`: its stdout, its `--json` and its `--records`.
fn run(
    dir: &Path,
    compressor: &Path,
    extra: &[&str],
    depth: usize,
) -> (String, serde_json::Value, serde_json::Value) {
    let model = tiny_model(dir);
    let prose = prose_path();
    let json = dir.join(format!("report-{depth}.json"));
    let records = dir.join(format!("records-{depth}.json"));
    let depth = depth.to_string();
    let mut args = short_run_args(model.hf_dir.to_str().unwrap(), prose.to_str().unwrap(), "8");
    args.extend([
        "--pipeline-depth",
        &depth,
        "--json",
        json.to_str().unwrap(),
        "--records",
        records.to_str().unwrap(),
    ]);
    args.extend(extra);
    let output = kv_validate(&args, compressor);
    assert!(
        matches!(output.status.code(), Some(0 | 1)),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    (
        String::from_utf8(output.stdout).unwrap(),
        read_json(&json),
        read_json(&records),
    )
}

#[test]
fn overlapped_sweeps_and_validations_report_what_the_sequential_run_reports() {
    let dir = tempfile::tempdir().unwrap();
    let compressor = kv_compress();
    let sweep = [
        "--variant",
        "int4=-bits 4",
        "--variant",
        "kivi2=-method kivi -bits 2",
        "--threshold",
        "10",
    ];
    let validation = ["--threshold", "10"];
    for (extra, variant_count) in [(&sweep[..], 2), (&validation[..], 1)] {
        let (text, json, records) = run(dir.path(), &compressor, extra, 1);
        let windows = records["windows"].as_array().unwrap();
        assert_eq!(windows.len(), 8);
        // Variants that score differently, so a mix-up of reconstructions would show.
        let variants = windows[1]["variants"].as_array().unwrap();
        assert_eq!(variants.len(), variant_count, "{extra:?}");
        if let [first, second] = &variants[..] {
            assert_ne!(first["nll"], second["nll"]);
        }
        for depth in [2, 3, 8] {
            let (overlapped_text, overlapped_json, overlapped_records) =
                run(dir.path(), &compressor, extra, depth);
            assert_eq!(
                without_wall_time(&overlapped_text),
                without_wall_time(&text),
                "depth {depth}, {extra:?}"
            );
            assert_eq!(
                without_times(overlapped_json),
                without_times(json.clone()),
                "depth {depth}"
            );
            assert_eq!(
                without_times(overlapped_records),
                without_times(records.clone()),
                "depth {depth}"
            );
        }
    }
}

#[test]
fn a_slow_compressor_works_beside_the_model_and_the_time_split_says_so() {
    let dir = tempfile::tempdir().unwrap();
    // 0.4 s asleep per decompress: one per window with a cache.
    let slow = scripted_compressor(dir.path(), "slow-kv-compress", "sleep 0.4");
    let (sequential_text, sequential, _) = run(dir.path(), &slow, &[], 1);
    let (overlapped_text, overlapped, _) = run(dir.path(), &slow, &[], 4);
    let seconds = |json: &serde_json::Value, key: &str| json["timing"][key].as_f64().unwrap();
    // All 8 back-to-back windows have a cache: 3.2 s asleep.
    for json in [&sequential, &overlapped] {
        assert!(seconds(json, "compressor_seconds") >= 3.2, "{json}");
        assert!(seconds(json, "cache_write_gb_per_s") > 0.0, "{json}");
        assert!(seconds(json, "cache_read_gb_per_s") > 0.0, "{json}");
    }
    // One after another nothing overlaps; four in flight, the sleeps do.
    assert_eq!(
        seconds(&sequential, "overlapped_seconds"),
        0.0,
        "{sequential}"
    );
    assert!(!sequential_text.contains("overlapped"), "{sequential_text}");
    assert!(
        seconds(&overlapped, "overlapped_seconds") > 1.0,
        "{overlapped}"
    );
    assert!(
        seconds(&overlapped, "wall_seconds") < seconds(&sequential, "wall_seconds") - 1.0,
        "{overlapped}\n{sequential}"
    );
    assert!(
        overlapped_text.contains("s of them overlapped"),
        "{overlapped_text}"
    );
}

#[test]
fn a_pipeline_depth_outside_1_to_8_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let prose = prose_path();
    for depth in ["0", "9", "two"] {
        let mut args = short_run_args(model.hf_dir.to_str().unwrap(), prose.to_str().unwrap(), "2");
        args.extend(["--pipeline-depth", depth]);
        let output = kv_validate(&args, &kv_compress());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(stderr.starts_with("error: invalid value"), "{stderr}");
        assert!(stderr.contains("--pipeline-depth"), "{stderr}");
    }
}
