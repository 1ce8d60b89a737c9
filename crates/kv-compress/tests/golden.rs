//! Byte-identical output for every method that existed before the quantizer
//! seam: `testdata/golden/` holds packed files made by main's binary at
//! 1a960db from `kv_cache.safetensors` with the flags in `cases.txt`. Packing
//! the same input with the same flags must give the same bytes, and
//! `-decompress` of those old files must restore what `-reconstruct` writes
//! today. Also: a non-UTF-8 path works end to end (issue 10, item 11).

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/golden")
}

fn cases() -> Vec<(String, Vec<String>)> {
    cases_of("cases.txt")
}

fn cases_of(list: &str) -> Vec<(String, Vec<String>)> {
    let text = std::fs::read_to_string(golden_dir().join(list)).unwrap();
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let mut words = line.split_whitespace().map(String::from);
            (words.next().unwrap(), words.collect())
        })
        .collect()
}

/// The bytes `-reconstruct` writes today for the golden input and `flags`.
fn reconstruction(dir: &Path, name: &str, flags: &[String]) -> Vec<u8> {
    let reconstructed = dir.join(format!("{name}.reconstructed.safetensors"));
    let mut reconstruct_flags = flags.to_vec();
    reconstruct_flags.push("-reconstruct".into());
    run_with(
        &golden_dir().join("kv_cache.safetensors"),
        &reconstructed,
        &reconstruct_flags,
    );
    std::fs::read(&reconstructed).unwrap()
}

fn run_with(input: &Path, output: &Path, flags: &[String]) {
    let mut args = vec!["-input", s(input), "-output", s(output)];
    args.extend(flags.iter().map(String::as_str));
    run_json(&args);
}

#[test]
fn every_old_method_packs_to_the_bytes_main_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let input = golden_dir().join("kv_cache.safetensors");
    let cases = cases();
    assert!(cases.len() >= 10, "cases.txt lost its cases");
    for (name, flags) in cases {
        let golden = std::fs::read(golden_dir().join(format!("{name}.safetensors"))).unwrap();
        let packed = dir.path().join(format!("{name}.safetensors"));
        run_with(&input, &packed, &flags);
        assert!(
            std::fs::read(&packed).unwrap() == golden,
            "{name}: packed bytes differ from main's"
        );

        let restored = dir.path().join(format!("{name}.restored.safetensors"));
        let golden_path = golden_dir().join(format!("{name}.safetensors"));
        run_json(&[
            "-decompress",
            "-input",
            s(&golden_path),
            "-output",
            s(&restored),
        ]);
        assert!(
            std::fs::read(&restored).unwrap() == reconstruction(dir.path(), &name, &flags),
            "{name}: main's packed file does not restore to today's reconstruction"
        );
    }
}

/// Format 1's range-coded ecsq files, written before rANS replaced that
/// coder, still decompress: to today's reconstruction where the step does
/// not depend on the coder (no `-rate`), and to finite values within the
/// file's own measured RMSE of the input otherwise.
#[test]
fn format_1_files_still_decompress() {
    let dir = tempfile::tempdir().unwrap();
    let input = golden_dir().join("kv_cache.safetensors");
    let cases = cases_of("format1_cases.txt");
    assert_eq!(cases.len(), 2, "format1_cases.txt lost its cases");
    for (name, flags) in cases {
        let golden = golden_dir().join(format!("{name}.safetensors"));
        let header = std::fs::read(&golden).unwrap();
        assert!(
            String::from_utf8_lossy(&header[..2000.min(header.len())])
                .contains(r#""kvformat.format_version":"1""#),
            "{name} is not a format-1 file"
        );
        let restored = dir.path().join(format!("{name}.restored.safetensors"));
        let report = run_json(&["-decompress", "-input", s(&golden), "-output", s(&restored)]);
        if flags.iter().any(|flag| flag == "-rate") {
            let rmse = report["rmse"].as_f64().unwrap();
            assert!(rmse > 0.0 && rmse < 0.2, "{name}: rmse {rmse}");
            continue;
        }
        assert!(
            std::fs::read(&restored).unwrap() == reconstruction(dir.path(), &name, &flags),
            "{name}: the format-1 file does not restore to today's reconstruction"
        );
        // Today's packed file of the same flags is format 2.
        let packed = dir.path().join(format!("{name}.format2.safetensors"));
        run_with(&input, &packed, &flags);
        let bytes = std::fs::read(&packed).unwrap();
        assert!(String::from_utf8_lossy(&bytes).contains(r#""kvformat.format_version":"2""#));
    }
}

#[test]
fn a_non_utf8_path_works_and_a_non_utf8_number_is_a_flag_error() {
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;

    let dir = tempfile::tempdir().unwrap();
    let input = dir
        .path()
        .join(OsString::from_vec(b"caf\xe9.safetensors".to_vec()));
    std::fs::copy(golden_dir().join("kv_cache.safetensors"), &input).unwrap();
    let output = dir
        .path()
        .join(OsString::from_vec(b"\xff\xfe.packed.safetensors".to_vec()));
    let run = |args: &[&std::ffi::OsStr]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_kv-compress"))
            .args(args)
            .output()
            .unwrap()
    };
    let done = run(&[
        "-input".as_ref(),
        input.as_os_str(),
        "-output".as_ref(),
        output.as_os_str(),
    ]);
    assert_eq!(done.status.code(), Some(0), "{}", stderr(&done));
    assert!(
        std::fs::read(&output).unwrap()
            == std::fs::read(golden_dir().join("adr002.safetensors")).unwrap()
    );

    let bad = OsString::from_vec(b"6\xff4".to_vec());
    let refused = run(&[
        "-input".as_ref(),
        input.as_os_str(),
        "-metrics-only".as_ref(),
        "-group-size".as_ref(),
        &bad,
    ]);
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    let text = stderr(&refused);
    assert!(
        text.starts_with("invalid value \"6\u{fffd}4\" for flag -group-size: not valid UTF-8"),
        "{text}"
    );
    assert!(
        !text.contains("panicked") && !text.contains("backtrace"),
        "{text}"
    );
}

/// `-layer-bits` counts what it stores: each tensor takes exactly the bytes
/// a plain run at its bits (and group size) stores for it, and the JSON's
/// `compressed_size_bytes` and `bits_per_value` are their sum.
#[test]
fn layer_bits_mix_is_counted_byte_for_byte() {
    let input = golden_dir().join("kv_cache.safetensors");
    let stored_bytes = |flags: &[&str]| -> (Vec<(String, u64)>, serde_json::Value) {
        let mut args = vec!["-input", s(&input), "-metrics-only", "-verbose"];
        args.extend_from_slice(flags);
        let output = kv_compress(&args);
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        let per_tensor = stderr(&output)
            .lines()
            .filter_map(|line| {
                let (_, rest) = line.split_once("] ")?;
                let (name, rest) = rest.split_once(": ")?;
                let bytes = rest.split(" -> ").nth(1)?.split(' ').next()?.parse().ok()?;
                // Names may be quoted in log lines.
                Some((name.trim_matches('"').to_string(), bytes))
            })
            .collect();
        (per_tensor, serde_json::from_slice(&output.stdout).unwrap())
    };
    let (four, _) = stored_bytes(&["-bits", "4", "-group-size", "32"]);
    let (two, _) = stored_bytes(&["-bits", "2"]);
    let (mixed, json) = stored_bytes(&["-layer-bits", "k:0=4/32;*=2"]);
    assert_eq!(mixed.len(), 4);
    let mut total = 0;
    for (name, bytes) in &mixed {
        let reference = if name == "layer_0_key" { &four } else { &two };
        let expected = reference.iter().find(|(n, _)| n == name).unwrap().1;
        assert_eq!(*bytes, expected, "{name}");
        total += bytes;
    }
    assert_eq!(json["compressed_size_bytes"].as_u64(), Some(total));
    let values = json["num_values"].as_u64().unwrap() as f64;
    assert_eq!(
        json["bits_per_value"].as_f64(),
        Some(8.0 * total as f64 / values)
    );
}
