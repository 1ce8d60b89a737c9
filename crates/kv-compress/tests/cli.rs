//! The binary as the original's Python bridge uses it: flag syntax, exit
//! codes, the JSON on stdout, real byte counts, and the files it writes.

mod common;

use common::*;
use kvformat::codec::{self, CodecParams};
use kvformat::{CacheDtype, KvCache};

const SHAPE: [usize; 4] = [1, 4, 32, 64];

#[test]
fn help_exits_zero_with_usage_on_stderr() {
    for flag in ["-h", "-help", "--help"] {
        let output = kv_compress(&[flag]);
        assert_eq!(output.status.code(), Some(0), "{flag}");
        assert!(output.stdout.is_empty());
        let usage = stderr(&output);
        assert!(
            usage.contains("-input") && usage.contains("-group-size 64 -sparsity 0.0"),
            "{usage}"
        );
    }
}

#[test]
fn flag_errors_exit_two_like_go() {
    let cases: [(&[&str], &str); 5] = [
        (&["-x"], "flag provided but not defined: -x"),
        (
            &["-input", "a", "-group-size", "abc"],
            "invalid value \"abc\" for flag -group-size: parse error",
        ),
        (
            &["-input", "a", "-group-size", "48"],
            "invalid value \"48\" for flag -group-size",
        ),
        (
            &["-input", "a", "-metrics-only", "-verbose", "false"],
            "unexpected argument \"false\"",
        ),
        (&["-input"], "flag needs an argument: -input"),
    ];
    for (args, message) in cases {
        let output = kv_compress(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let text = stderr(&output);
        assert!(text.starts_with(message), "{args:?}: {text}");
        assert!(text.contains("Usage of kv-compress"), "{text}");
        assert!(output.stdout.is_empty());
    }
}

#[test]
fn missing_input_and_output_exit_one_with_the_original_messages() {
    let output = kv_compress(&["-output", "x"]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(stderr(&output), "Error: -input is required\n");
    let output = kv_compress(&["-input", "x"]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        stderr(&output),
        "Error: -output is required (use -metrics-only for dry run)\n"
    );
}

#[test]
fn measured_ratios_are_the_adr002_figures() {
    let dir = tempfile::tempdir().unwrap();
    for (dtype, ratio) in [
        (CacheDtype::F16, 64.0 / 17.0),
        (CacheDtype::F32, 128.0 / 17.0),
        (CacheDtype::BF16, 64.0 / 17.0),
    ] {
        let input = dir.path().join(format!("{dtype:?}.safetensors"));
        write_kv_cache(&input, dtype, 2, &SHAPE);
        let output = dir.path().join(format!("{dtype:?}.int4.safetensors"));
        let json = run_json(&[
            "-input",
            s(&input),
            "-output",
            s(&output),
            "-group-size",
            "64",
            "-sparsity",
            "0.0",
        ]);
        let values = 2 * 2 * SHAPE.iter().product::<usize>();
        assert_eq!(json["original_size_bytes"], values * dtype.size_bytes());
        assert_eq!(json["compressed_size_bytes"], values / 64 * 34);
        assert!(
            (json["compression_ratio"].as_f64().unwrap() - ratio).abs() < 1e-12,
            "{dtype:?}: {json}"
        );
        assert!((json["bits_per_value"].as_f64().unwrap() - 4.25).abs() < 1e-12);
    }
}

#[test]
fn json_has_the_bridge_fields_with_their_types() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("kv.safetensors");
    write_kv_cache(&input, CacheDtype::F16, 2, &SHAPE);
    let json = run_json(&["-input", s(&input), "-metrics-only", "-group-size", "64"]);
    for field in [
        "compression_ratio",
        "rmse",
        "snr_db",
        "cosine_similarity",
        "max_error",
        "processing_time_ms",
    ] {
        assert!(
            json[field].as_f64().is_some_and(f64::is_finite),
            "{field}: {json}"
        );
    }
    for field in ["original_size_bytes", "compressed_size_bytes"] {
        assert!(json[field].as_u64().is_some(), "{field}");
    }
    assert!(json["quality_passed"].is_boolean());
    assert!(json["violations"].is_array());
    // N(0,1) data at 4 bits: RMSE about 0.11 (over the 0.10 limit), SNR about 19 dB.
    assert_eq!(json["quality_level"], "POOR");
    assert_eq!(json["quality_passed"], false);
    assert_eq!(json["violations"][0].as_str().unwrap()[..6], *"RMSE 0");
    let snr = json["snr_db"].as_f64().unwrap();
    assert!((18.5..20.0).contains(&snr), "{snr}");
    assert!(json.get("tensor_metrics").is_none());
}

#[test]
fn verbose_adds_tensor_metrics_and_keeps_stdout_pure() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("kv.safetensors");
    write_kv_cache(&input, CacheDtype::F32, 1, &SHAPE);
    let output = kv_compress(&["-input", s(&input), "-metrics-only", "-verbose"]);
    assert_eq!(output.status.code(), Some(0));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let per_tensor = json["tensor_metrics"].as_object().unwrap();
    assert!(per_tensor["layer_0_key_rmse"].as_f64().unwrap() > 0.0);
    assert!(per_tensor.contains_key("layer_0_value_snr_db"));
    assert!(
        stderr(&output).contains("layer_0_value"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn metrics_only_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("kv.safetensors");
    write_kv_cache(&input, CacheDtype::F16, 1, &SHAPE);
    let before = files_in(dir.path());
    run_json(&[
        "-input",
        s(&input),
        "-metrics-only",
        "-output",
        s(&dir.path().join("ignored")),
    ]);
    assert_eq!(files_in(dir.path()), before);
}

#[test]
fn sparsity_stores_less_and_costs_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("kv.safetensors");
    write_kv_cache(&input, CacheDtype::F16, 1, &SHAPE);
    let dense = run_json(&["-input", s(&input), "-metrics-only"]);
    let sparse = run_json(&["-input", s(&input), "-metrics-only", "-sparsity", "0.5"]);
    let size = |j: &serde_json::Value| j["compressed_size_bytes"].as_u64().unwrap();
    let rmse = |j: &serde_json::Value| j["rmse"].as_f64().unwrap();
    assert!(size(&sparse) < size(&dense), "{sparse} vs {dense}");
    assert!(rmse(&sparse) > rmse(&dense));
}

/// Every way of restoring values gives the codec's own reconstruction.
#[test]
fn decompress_and_reconstruct_equal_the_codec_reconstruction() {
    let dir = tempfile::tempdir().unwrap();
    for dtype in CacheDtype::ALL {
        let input = dir.path().join("kv.safetensors");
        let packed = dir.path().join("kv.int4.safetensors");
        let restored = dir.path().join("kv.restored.safetensors");
        let reconstructed = dir.path().join("kv.reconstructed.safetensors");
        let originals = write_kv_cache(&input, dtype, 2, &SHAPE);
        let compressed = run_json(&["-input", s(&input), "-output", s(&packed)]);
        let decompressed =
            run_json(&["-decompress", "-input", s(&packed), "-output", s(&restored)]);
        run_json(&[
            "-input",
            s(&input),
            "-output",
            s(&reconstructed),
            "-reconstruct",
        ]);
        for field in [
            "compressed_size_bytes",
            "original_size_bytes",
            "rmse",
            "snr_db",
            "max_error",
            "quality_level",
        ] {
            assert_eq!(compressed[field], decompressed[field], "{field}");
        }
        assert_eq!(
            std::fs::read(&restored).unwrap(),
            std::fs::read(&reconstructed).unwrap()
        );
        let cache = KvCache::open(&restored).unwrap();
        assert_eq!(cache.file().metadata()["model_name"], "test-model");
        let restored: Vec<_> = cache
            .tensors()
            .map(|(e, d)| {
                (
                    e.name.clone(),
                    d,
                    e.shape.clone(),
                    cache.values(e, d).unwrap().into_owned(),
                )
            })
            .collect();
        assert_eq!(restored.len(), originals.len());
        for ((name, values), (restored_name, restored_dtype, shape, restored_values)) in
            originals.iter().zip(&restored)
        {
            assert_eq!(
                (name, *restored_dtype, &shape[..]),
                (restored_name, dtype, &SHAPE[..])
            );
            let params = CodecParams::adr002(64);
            let encoded = codec::encode(values, &SHAPE, &params).unwrap();
            let expected =
                codec::decode(&encoded.payload, &SHAPE, &params, &encoded.layout).unwrap();
            let expected = dtype.to_f32(&dtype.from_f32(&expected)).into_owned();
            assert_eq!(&expected, restored_values, "{name} {dtype:?}");
        }
    }
}

#[test]
fn go_style_unpadded_header_with_unaligned_data_reads_like_the_padded_one() {
    let dir = tempfile::tempdir().unwrap();
    let padded = dir.path().join("padded.safetensors");
    let tensors = write_kv_cache(&padded, CacheDtype::F32, 1, &[1, 1, 2, 64]);
    let mut header = String::from("{");
    let mut data = Vec::new();
    for (i, (name, values)) in tensors.iter().enumerate() {
        let start = data.len();
        data.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        let sep = if i == 0 { "" } else { "," };
        header += &format!(
            r#"{sep}"{name}":{{"dtype":"F32","shape":[1,1,2,64],"data_offsets":[{start},{}]}}"#,
            data.len()
        );
    }
    header += r#","__metadata__":{"model_name":"test-model"}}"#;
    if header.len() % 4 == 0 {
        header.insert(1, ' ');
    }
    // The original sorts nothing about alignment: data starts at an odd-ish offset.
    assert_ne!((8 + header.len()) % 4, 0);
    let unpadded = dir.path().join("unpadded.safetensors");
    std::fs::write(&unpadded, raw_safetensors(&header, &data)).unwrap();
    let a = run_json(&["-input", s(&padded), "-metrics-only"]);
    let b = run_json(&["-input", s(&unpadded), "-metrics-only"]);
    for field in [
        "rmse",
        "snr_db",
        "max_error",
        "compressed_size_bytes",
        "original_size_bytes",
    ] {
        assert_eq!(a[field], b[field], "{field}");
    }
}

#[test]
fn sidecar_is_copied_and_written_beside_decompressed_output() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("kv.safetensors");
    write_kv_cache(&input, CacheDtype::F16, 2, &SHAPE);
    let sidecar = r#"{"num_layers": 2, "num_kv_heads": 4, "seq_len": 32, "head_dim": 64, "dtype": "float16", "model_name": "m"}"#;
    std::fs::write(dir.path().join("kv.metadata.json"), sidecar).unwrap();
    let packed = dir.path().join("kv.int4.safetensors");
    run_json(&["-input", s(&input), "-output", s(&packed)]);
    let copied = kvformat::Sidecar::read(&dir.path().join("kv.int4.metadata.json")).unwrap();
    assert_eq!(
        (
            copied.num_layers,
            copied.seq_len,
            copied.model_name.as_str()
        ),
        (2, 32, "m")
    );
    std::fs::remove_file(dir.path().join("kv.int4.metadata.json")).unwrap();
    let restored = dir.path().join("out.safetensors");
    run_json(&["-decompress", "-input", s(&packed), "-output", s(&restored)]);
    let derived = kvformat::Sidecar::read(&dir.path().join("out.metadata.json")).unwrap();
    assert_eq!(
        (
            derived.num_kv_heads,
            derived.head_dim,
            derived.dtype.as_str()
        ),
        (4, 64, "float16")
    );
    // A sidecar that disagrees with the tensors is an error.
    std::fs::write(
        dir.path().join("kv.metadata.json"),
        sidecar.replace("32", "33"),
    )
    .unwrap();
    let output = kv_compress(&["-input", s(&input), "-metrics-only"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("kv.metadata.json")
            && stderr(&output).contains("no layer holds the sidecar's seq_len = 33"),
        "{}",
        stderr(&output)
    );
}

/// Every codec option goes through the container: the packed form is smaller
/// than the input, and -decompress gives exactly what -reconstruct wrote.
#[test]
fn every_method_round_trips_through_the_packed_file() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("kv.safetensors");
    write_kv_cache(&input, CacheDtype::F16, 1, &SHAPE);
    let packed = dir.path().join("kv.packed.safetensors");
    let restored = dir.path().join("kv.restored.safetensors");
    let reconstructed = dir.path().join("kv.reconstructed.safetensors");
    let methods: [&[&str]; 7] = [
        &["-method", "kivi"],
        &["-method", "kivi", "-bits", "2", "-group-size", "32"],
        &["-bits", "3", "-grid", "asym", "-key-axis", "token"],
        &["-bits", "8"],
        &["-rotate", "-rotate-seed", "7"],
        &[
            "-sink-tokens",
            "4",
            "-recent-tokens",
            "8",
            "-method",
            "kivi",
        ],
        &["-sparsity", "0.5", "-value-axis", "token"],
    ];
    for method in methods {
        let with = |extra: &[&str]| -> Vec<String> {
            extra.iter().chain(method).map(|s| s.to_string()).collect()
        };
        let args = with(&["-input", s(&input), "-output", s(&packed)]);
        let compressed = run_json(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(
            compressed["compression_ratio"].as_f64().unwrap() > 1.0,
            "{method:?}: {compressed}"
        );
        let args = with(&[
            "-input",
            s(&input),
            "-output",
            s(&reconstructed),
            "-reconstruct",
        ]);
        run_json(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let decompressed =
            run_json(&["-decompress", "-input", s(&packed), "-output", s(&restored)]);
        assert_eq!(compressed["rmse"], decompressed["rmse"], "{method:?}");
        assert_eq!(
            std::fs::read(&restored).unwrap(),
            std::fs::read(&reconstructed).unwrap(),
            "{method:?}"
        );
    }
}
