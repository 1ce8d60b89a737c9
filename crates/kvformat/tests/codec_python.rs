//! Checks one packed format of each kind against the independent numpy
//! decoder of the Python reader (crates/kv-compress/python/kvformat, run by
//! tests/python/test_codecs.py): this test writes payloads,
//! params, inputs and Rust reconstructions to a temp dir and the Python script
//! must decode every payload to the same bits (and re-encode ADR-002 to the
//! same bytes). Python 3 with numpy is required: the test fails without it.

use std::path::Path;
use std::process::Command;

use kvformat::codec::{decode, encode, Axis, CodecParams, Fit, Grid, LlamaRotation, ScaleDtype};
use kvformat::CacheDtype;

/// `x` as a tensor of `dtype` holds it (what kv-compress reads from such a cache).
fn as_dtype(dtype: CacheDtype, x: f32) -> f32 {
    match dtype {
        CacheDtype::F32 => x,
        CacheDtype::F16 => half::f16::from_f32(x).to_f32(),
        CacheDtype::BF16 => half::bf16::from_f32(x).to_f32(),
    }
}

/// A deterministic mix of magnitudes with an outlier channel every 8 values.
fn sample_values(count: usize, salt: u32) -> Vec<f32> {
    (0..count)
        .map(|i| {
            let hashed = (i as u32 ^ salt).wrapping_mul(2_654_435_761) >> 8;
            let unit = hashed as f32 / 16_777_216.0 - 0.5;
            if i % 8 == 3 {
                unit * 40.0
            } else {
                unit
            }
        })
        .collect()
}

fn cases() -> Vec<(&'static str, Vec<usize>, CodecParams, Vec<f32>)> {
    let adr002 = CodecParams::adr002(64);
    let mut with_zero_group = sample_values(2 * 7 * 9, 1);
    with_zero_group[..64].fill(0.0);
    let huge: Vec<f32> = sample_values(200, 2).iter().map(|x| x * 1.0e7).collect();
    let kivi_keys = CodecParams {
        grid: Grid::Asymmetric,
        axis: Axis::Channel,
        ..CodecParams::adr002(4)
    };
    vec![
        (
            "adr002_ragged_zero_group",
            vec![1, 2, 7, 9],
            adr002.clone(),
            with_zero_group,
        ),
        ("adr002_f32_scales", vec![200], adr002.clone(), huge),
        (
            "sym8_near_f32_max",
            vec![4, 16],
            CodecParams {
                bits: 8,
                ..adr002.clone()
            },
            sample_values(64, 13)
                .iter()
                .map(|x| {
                    if *x < 0.0 {
                        -f32::MAX
                    } else {
                        x.min(1.0) * 3.0e38
                    }
                })
                .collect(),
        ),
        (
            "sym3_flat",
            vec![1, 2, 6, 16],
            CodecParams {
                bits: 3,
                ..CodecParams::adr002(32)
            },
            sample_values(192, 3),
        ),
        (
            "sym5_flat",
            vec![1, 2, 6, 16],
            CodecParams {
                bits: 5,
                ..CodecParams::adr002(32)
            },
            sample_values(192, 17),
        ),
        (
            "asym6_channel_rotated_mse",
            vec![1, 2, 12, 16],
            CodecParams {
                bits: 6,
                grid: Grid::Asymmetric,
                axis: Axis::Channel,
                rotation_seed: Some(5),
                sink_tokens: 1,
                fit: Fit::Mse,
                ..CodecParams::adr002(8)
            },
            sample_values(384, 19),
        ),
        (
            "sym2_token",
            vec![1, 2, 5, 16],
            CodecParams {
                bits: 2,
                axis: Axis::Token,
                ..CodecParams::adr002(8)
            },
            sample_values(160, 4),
        ),
        (
            "sym8_channel",
            vec![2, 1, 7, 8],
            CodecParams {
                bits: 8,
                axis: Axis::Channel,
                ..CodecParams::adr002(4)
            },
            sample_values(112, 5),
        ),
        (
            "asym4_token",
            vec![1, 2, 6, 32],
            CodecParams {
                grid: Grid::Asymmetric,
                axis: Axis::Token,
                ..CodecParams::adr002(16)
            },
            sample_values(384, 6),
        ),
        (
            "asym2_channel",
            vec![1, 3, 7, 4],
            CodecParams {
                bits: 2,
                group_size: 3,
                ..kivi_keys.clone()
            },
            sample_values(84, 7),
        ),
        // The same values and layout with least-squares group params: the
        // payload format is the same, only the encoder's choice differs
        // (the script checks its error is below asym2_channel's).
        (
            "asym2_channel_fit_mse",
            vec![1, 3, 7, 4],
            CodecParams {
                bits: 2,
                group_size: 3,
                fit: Fit::Mse,
                ..kivi_keys.clone()
            },
            sample_values(84, 7),
        ),
        // Outliers kept in FP16: floor(0.04 * 84) = 3 of the rotated values.
        (
            "asym2_channel_outliers_rotation",
            vec![1, 3, 7, 4],
            CodecParams {
                bits: 2,
                group_size: 3,
                fit: Fit::Mse,
                outliers: 0.04,
                rotation_seed: Some(5),
                ..kivi_keys.clone()
            },
            sample_values(84, 7),
        ),
        (
            "asym3_flat",
            vec![5, 11],
            CodecParams {
                bits: 3,
                grid: Grid::Asymmetric,
                ..CodecParams::adr002(10)
            },
            sample_values(55, 8),
        ),
        (
            "rotation_token",
            vec![1, 2, 6, 32],
            CodecParams {
                axis: Axis::Token,
                rotation_seed: Some(0xDEAD_BEEF_CAFE_F00D),
                ..CodecParams::adr002(32)
            },
            sample_values(384, 9),
        ),
        (
            "kept_tokens_channel",
            vec![1, 2, 10, 8],
            CodecParams {
                sink_tokens: 2,
                recent_tokens: 3,
                ..kivi_keys.clone()
            },
            sample_values(160, 10),
        ),
        (
            "sparsity_flat",
            vec![1, 2, 8, 16],
            CodecParams {
                sparsity: 0.3,
                ..CodecParams::adr002(16)
            },
            sample_values(256, 11),
        ),
        // Below 1/bits the dense form is smaller: no bitmap, dropped values
        // hold the code of 0 (rotated domain, with kept tokens).
        (
            "sparsity_dense_rotation_token",
            vec![1, 2, 9, 16],
            CodecParams {
                axis: Axis::Token,
                rotation_seed: Some(11),
                sink_tokens: 1,
                recent_tokens: 1,
                sparsity: 0.2,
                ..CodecParams::adr002(8)
            },
            sample_values(288, 14),
        ),
        (
            "sparsity_dense_channel",
            vec![2, 1, 7, 8],
            CodecParams {
                bits: 3,
                axis: Axis::Channel,
                sparsity: 0.3,
                ..CodecParams::adr002(4)
            },
            sample_values(112, 15),
        ),
        // Codebook grids: level[code] * group RMS; kmeans stores its levels.
        (
            "lloyd2_token_rotation",
            vec![1, 2, 6, 32],
            CodecParams {
                bits: 2,
                grid: Grid::Lloyd,
                axis: Axis::Token,
                rotation_seed: Some(3),
                ..CodecParams::adr002(32)
            },
            sample_values(384, 16),
        ),
        (
            "lloyd3_flat_sinks_outliers_mse",
            vec![1, 2, 9, 16],
            CodecParams {
                bits: 3,
                grid: Grid::Lloyd,
                sink_tokens: 1,
                recent_tokens: 2,
                outliers: 0.03,
                fit: Fit::Mse,
                ..CodecParams::adr002(16)
            },
            sample_values(288, 17),
        ),
        (
            "lloyd4_f32_scales",
            vec![200],
            CodecParams {
                grid: Grid::Lloyd,
                ..CodecParams::adr002(8)
            },
            sample_values(200, 18).iter().map(|x| x * 1.0e7).collect(),
        ),
        (
            "kmeans2_channel_sparse",
            vec![1, 3, 7, 4],
            CodecParams {
                bits: 2,
                grid: Grid::Kmeans,
                axis: Axis::Channel,
                sparsity: 0.4,
                ..CodecParams::adr002(3)
            },
            sample_values(84, 19),
        ),
        (
            "kmeans4_token_rotation_outliers",
            vec![1, 2, 6, 32],
            CodecParams {
                grid: Grid::Kmeans,
                axis: Axis::Token,
                rotation_seed: Some(9),
                outliers: 0.02,
                fit: Fit::Mse,
                ..CodecParams::adr002(16)
            },
            sample_values(384, 20),
        ),
        (
            "ecsq2_channel_sink",
            vec![1, 2, 9, 16],
            CodecParams {
                bits: 2,
                grid: Grid::Ecsq,
                axis: Axis::Channel,
                sink_tokens: 1,
                ..CodecParams::adr002(1024)
            },
            sample_values(288, 21),
        ),
        (
            "ecsq_rate_flat_rotated",
            vec![1, 2, 6, 32],
            CodecParams {
                grid: Grid::Ecsq,
                rotation_seed: Some(5),
                rate: Some(5.5),
                ..CodecParams::adr002(40)
            },
            sample_values(384, 22),
        ),
        (
            "ecsq3_token_f32_offsets",
            vec![1, 1, 4, 50],
            CodecParams {
                bits: 3,
                grid: Grid::Ecsq,
                axis: Axis::Token,
                ..CodecParams::adr002(16)
            },
            sample_values(200, 23)
                .iter()
                .map(|x| x * 1.0e7 + 1.0e6)
                .collect(),
        ),
        (
            // Channels of spreads 2^-4..2^11 at 8 bits: several rANS tables,
            // and codes past the direct tokens (extra bits).
            "ecsq_rate8_channel_spreads",
            vec![1, 2, 256, 16],
            CodecParams {
                grid: Grid::Ecsq,
                axis: Axis::Channel,
                rate: Some(8.0),
                ..CodecParams::adr002(256)
            },
            sample_values(8192, 24)
                .iter()
                .enumerate()
                .map(|(i, x)| x * ((i % 16) as f32 - 4.0).exp2())
                .collect(),
        ),
        (
            "llama_q8_0",
            vec![1, 2, 5, 64],
            CodecParams {
                bits: 8,
                grid: Grid::Q8_0,
                axis: Axis::Token,
                unit_scale: false,
                ..CodecParams::adr002(32)
            },
            sample_values(640, 40).iter().map(|x| x * 40.0).collect(),
        ),
        (
            "llama_q4_0",
            vec![1, 2, 5, 64],
            CodecParams {
                bits: 4,
                grid: Grid::Q4_0,
                axis: Axis::Token,
                unit_scale: false,
                ..CodecParams::adr002(32)
            },
            sample_values(640, 41).iter().map(|x| x * 40.0).collect(),
        ),
        (
            "llama_q4_1",
            vec![1, 2, 5, 64],
            CodecParams {
                bits: 4,
                grid: Grid::Q4_1,
                axis: Axis::Token,
                unit_scale: false,
                ..CodecParams::adr002(32)
            },
            sample_values(640, 42).iter().map(|x| x * 40.0).collect(),
        ),
        (
            "llama_q5_0",
            vec![1, 2, 5, 64],
            CodecParams {
                bits: 5,
                grid: Grid::Q5_0,
                axis: Axis::Token,
                unit_scale: false,
                ..CodecParams::adr002(32)
            },
            sample_values(640, 43).iter().map(|x| x * 40.0).collect(),
        ),
        (
            "llama_q5_1",
            vec![1, 2, 5, 64],
            CodecParams {
                bits: 5,
                grid: Grid::Q5_1,
                axis: Axis::Token,
                unit_scale: false,
                ..CodecParams::adr002(32)
            },
            sample_values(640, 44).iter().map(|x| x * 40.0).collect(),
        ),
        (
            "llama_iq4_nl",
            vec![1, 2, 5, 64],
            CodecParams {
                bits: 4,
                grid: Grid::Iq4Nl,
                axis: Axis::Token,
                unit_scale: false,
                ..CodecParams::adr002(32)
            },
            sample_values(640, 48).iter().map(|x| x * 40.0).collect(),
        ),
        (
            "llama_q4_0_rotated_key",
            vec![1, 2, 3, 128],
            CodecParams {
                bits: 4,
                grid: Grid::Q4_0,
                axis: Axis::Token,
                unit_scale: false,
                llama_rotation: Some(LlamaRotation::Key),
                ..CodecParams::adr002(32)
            },
            sample_values(768, 49).iter().map(|x| x * 40.0).collect(),
        ),
        (
            "llama_iq4_nl_rotated_value",
            vec![1, 2, 3, 128],
            CodecParams {
                bits: 4,
                grid: Grid::Iq4Nl,
                axis: Axis::Token,
                unit_scale: false,
                llama_rotation: Some(LlamaRotation::Value),
                ..CodecParams::adr002(32)
            },
            sample_values(768, 50).iter().map(|x| x * 40.0).collect(),
        ),
        (
            "trtllm_nvfp4_calibrated",
            vec![1, 2, 5, 64],
            CodecParams {
                bits: 4,
                grid: Grid::Nvfp4,
                axis: Axis::Token,
                unit_scale: false,
                ..CodecParams::adr002(16)
            },
            sample_values(640, 51).iter().map(|x| x * 40.0).collect(),
        ),
        (
            "trtllm_nvfp4_unit",
            vec![1, 2, 5, 64],
            CodecParams {
                bits: 4,
                grid: Grid::Nvfp4,
                axis: Axis::Token,
                unit_scale: true,
                ..CodecParams::adr002(16)
            },
            sample_values(640, 52).iter().map(|x| x * 40.0).collect(),
        ),
        (
            "sglang_fp4",
            vec![1, 2, 5, 64],
            CodecParams {
                bits: 4,
                grid: Grid::Fp4Mx16,
                axis: Axis::Token,
                unit_scale: false,
                ..CodecParams::adr002(16)
            },
            sample_values(640, 53).iter().map(|x| x * 40.0).collect(),
        ),
        (
            "hf_quanto_int4_bf16",
            vec![1, 2, 5, 64],
            CodecParams {
                bits: 4,
                grid: Grid::QuantoInt4,
                axis: Axis::Flat,
                unit_scale: false,
                model_dtype: Some(ScaleDtype::Bf16),
                ..CodecParams::adr002(64)
            },
            sample_values(640, 54)
                .iter()
                .map(|x| as_dtype(CacheDtype::BF16, x * 40.0))
                .collect(),
        ),
        (
            "hf_quanto_int2_f16",
            vec![1, 2, 5, 64],
            CodecParams {
                bits: 2,
                grid: Grid::QuantoInt2,
                axis: Axis::Flat,
                unit_scale: false,
                model_dtype: Some(ScaleDtype::F16),
                ..CodecParams::adr002(64)
            },
            sample_values(640, 55)
                .iter()
                .map(|x| as_dtype(CacheDtype::F16, x * 40.0))
                .collect(),
        ),
        (
            "hf_quanto_int4_f32",
            vec![1, 2, 5, 64],
            CodecParams {
                bits: 4,
                grid: Grid::QuantoInt4,
                axis: Axis::Flat,
                unit_scale: false,
                model_dtype: Some(ScaleDtype::F32),
                ..CodecParams::adr002(64)
            },
            sample_values(640, 56)
                .iter()
                .map(|x| as_dtype(CacheDtype::F32, x * 40.0))
                .collect(),
        ),
        (
            "trtllm_int8",
            vec![1, 2, 5, 64],
            CodecParams {
                bits: 8,
                grid: Grid::Int8Trt,
                axis: Axis::Flat,
                unit_scale: false,
                ..CodecParams::adr002(u32::MAX as usize)
            },
            sample_values(640, 57).iter().map(|x| x * 40.0).collect(),
        ),
        (
            "vllm_fp8_e4m3_unit",
            vec![1, 2, 5, 64],
            CodecParams {
                bits: 8,
                grid: Grid::Fp8E4m3,
                axis: Axis::Flat,
                unit_scale: true,
                ..CodecParams::adr002(u32::MAX as usize)
            },
            sample_values(640, 45).iter().map(|x| x * 40.0).collect(),
        ),
        (
            "vllm_fp8_e4m3_calibrated",
            vec![1, 2, 5, 64],
            CodecParams {
                bits: 8,
                grid: Grid::Fp8E4m3,
                axis: Axis::Flat,
                unit_scale: false,
                ..CodecParams::adr002(u32::MAX as usize)
            },
            sample_values(640, 46).iter().map(|x| x * 40.0).collect(),
        ),
        (
            "vllm_fp8_e5m2_dynamic",
            vec![1, 2, 5, 64],
            CodecParams {
                bits: 8,
                grid: Grid::Fp8E5m2,
                axis: Axis::Token,
                unit_scale: false,
                ..CodecParams::adr002(u32::MAX as usize)
            },
            sample_values(640, 47).iter().map(|x| x * 40.0).collect(),
        ),
        (
            "everything",
            vec![1, 2, 9, 16],
            CodecParams {
                bits: 3,
                rotation_seed: Some(7),
                sink_tokens: 1,
                recent_tokens: 2,
                sparsity: 0.5,
                ..kivi_keys
            },
            sample_values(288, 12),
        ),
    ]
}

fn write_f32(path: &Path, values: &[f32]) {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn numpy_reference_decodes_every_kind_of_payload_identically() {
    let dir = tempfile::tempdir().unwrap();
    let mut manifest = Vec::new();
    let mut forms = std::collections::BTreeSet::new();
    for (name, shape, params, values) in cases() {
        let encoded = encode(&values, &shape, &params).unwrap();
        if params.sparsity > 0.0 {
            forms.insert(format!("{:?}", encoded.layout.sparse_form));
        }
        let decoded = decode(&encoded.payload, &shape, &params, &encoded.layout).unwrap();
        std::fs::write(dir.path().join(format!("{name}.payload")), &encoded.payload).unwrap();
        write_f32(&dir.path().join(format!("{name}.input")), &values);
        write_f32(&dir.path().join(format!("{name}.decoded")), &decoded);
        manifest.push(serde_json::json!({
            "name": name, "shape": shape, "params": params, "layout": encoded.layout,
        }));
    }
    assert_eq!(forms.len(), 2, "both sparse forms are checked: {forms:?}");
    std::fs::write(
        dir.path().join("cases.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/python/test_codecs.py");
    // The decoder under test is the Python reader the kv-compress wheel ships.
    let reader = Path::new(env!("CARGO_MANIFEST_DIR")).join("../kv-compress/python");
    let output = Command::new("python3")
        .arg(&script)
        .arg(dir.path())
        .env("PYTHONPATH", reader)
        .output()
        .expect("python3 must be installed to run the numpy reference");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{report}");
    assert!(
        output.status.success(),
        "numpy reference disagrees:\n{report}"
    );
    assert!(
        report.contains(&format!("{0} of {0} cases match", manifest.len())),
        "{report}"
    );
}
