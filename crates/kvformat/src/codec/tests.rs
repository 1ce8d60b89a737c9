//! Hand-computed payloads and the paths that must agree.

use super::bitpack::packed;
use super::encode::encode_in_form;
use super::groups::Plan;
use super::layout::write_scales;
use super::quantizer;
use super::*;

#[test]
fn adr002_hand_computed_groups_zero_group_and_ragged_tail() {
    // g = 4: [1.75, -3.5, 0.25, 0] | [0, 0, 0, 0] | [-0.75]
    let values = [1.75, -3.5, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0, -0.75];
    let encoded = encode(&values, &[9], &CodecParams::adr002(4)).unwrap();
    assert_eq!(
        encoded.layout,
        Layout {
            scale_dtype: ScaleDtype::F16,
            sparse_form: SparseForm::Dense,
            coded_bytes: None,
            coder: None,
        }
    );
    // Scales: 3.5/7 = 0.5 (f16 0x3800); zero group 2^-14 (0x0400);
    // 0.75/7 = 0.10714.. -> f16 0x2EDB = 0.0625 * (1 + 731/1024) = 0.107116699.
    // Codes (q + 8): round(3.5) = 4 -> 12, -7 -> 1, round(0.5) = 1 -> 9, 0 -> 8;
    // four zeros -> 8; -0.75/0.107116699 = -7.0017 -> -7 -> 1.
    let expected = [
        0x00, 0x38, 0x00, 0x04, 0xDB, 0x2E, // scales
        0x1C, 0x89, 0x88, 0x88, 0x01, // codes, first value in the low nibble
    ];
    assert_eq!(encoded.payload, expected);
    let decoded = decode(
        &encoded.payload,
        &[9],
        &CodecParams::adr002(4),
        &encoded.layout,
    )
    .unwrap();
    let last_scale = 0.0625f32 * (1.0 + 731.0 / 1024.0);
    assert_eq!(
        decoded,
        [2.0, -3.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, -7.0 * last_scale]
    );
}

/// g = 4, 4 bits: [1.75, -3.5, 0.25, 1.0 | 0.5, -7.0, 3.0, 2.0].
const SPARSE_EXAMPLE: [f32; 8] = [1.75, -3.5, 0.25, 1.0, 0.5, -7.0, 3.0, 2.0];

fn sparse_example(sparsity: f64) -> (CodecParams, Encoded, Vec<f32>) {
    let params = CodecParams {
        sparsity,
        ..CodecParams::adr002(4)
    };
    let encoded = encode(&SPARSE_EXAMPLE, &[8], &params).unwrap();
    let decoded = decode(&encoded.payload, &[8], &params, &encoded.layout).unwrap();
    (params, encoded, decoded)
}

#[test]
fn small_sparsity_stores_the_dense_form_hand_computed() {
    // floor(0.2 * 8) = 1 dropped (0.25). Bitmap form: 1 + ceil(7 / 2) = 5
    // code bytes, dense: 4, so dense. Scales over kept values: 3.5/7 = 0.5
    // (0x3800), 7/7 = 1 (0x3C00). Codes (q + 8): 3.5 -> 4 -> 12, -7 -> 1,
    // dropped -> 8, 2 -> 10 | 0.5 -> 1 -> 9, -7 -> 1, 3 -> 11, 2 -> 10.
    let (_, encoded, decoded) = sparse_example(0.2);
    assert_eq!(encoded.layout.sparse_form, SparseForm::Dense);
    assert_eq!(
        encoded.payload,
        [0x00, 0x38, 0x00, 0x3C, 0x1C, 0xA8, 0x19, 0xAB]
    );
    assert_eq!(decoded, [2.0, -3.5, 0.0, 1.0, 1.0, -7.0, 3.0, 2.0]);
    assert_eq!(decoded[2].to_bits(), 0, "a dropped value is +0.0");
}

#[test]
fn large_sparsity_stores_the_bitmap_form_hand_computed() {
    // floor(0.5 * 8) = 4 dropped: 0.25, 0.5, 1.0, 1.75 (indices 2, 4, 3, 0).
    // Bitmap 1 + codes 2 = 3 bytes < dense 4. Kept: -3.5 | -7, 3, 2; scales
    // 0.5 and 1.0. Bitmap bits 0..8 = 0,1,0,0,0,1,1,1 = 0xE2; codes 1, 1, 11, 10.
    let (_, encoded, decoded) = sparse_example(0.5);
    assert_eq!(encoded.layout.sparse_form, SparseForm::Bitmap);
    assert_eq!(encoded.payload, [0x00, 0x38, 0x00, 0x3C, 0xE2, 0x11, 0xAB]);
    assert_eq!(decoded, [0.0, -3.5, 0.0, 0.0, 0.0, -7.0, 3.0, 2.0]);
}

/// Whichever form is stored, the reconstruction is the same, bit for bit:
/// scales come from kept values only in both, dropped values decode to +0.
#[test]
fn both_sparse_forms_reconstruct_the_same_bits() {
    let shape = [1, 2, 9, 16];
    let values: Vec<f32> = (0..288)
        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 0.01)
        .collect();
    for (bits, axis, rotation_seed, sink_tokens, group_size) in [
        (4, Axis::Flat, None, 0, 64),
        (3, Axis::Token, None, 1, 5),
        (2, Axis::Channel, Some(7), 2, 4),
        (8, Axis::Token, Some(1), 0, 16),
    ] {
        for sparsity in [0.01, 0.2, 0.5, 0.97] {
            let params = CodecParams {
                bits,
                axis,
                rotation_seed,
                sink_tokens,
                sparsity,
                ..CodecParams::adr002(group_size)
            };
            let plan = Plan::new(&shape, &params).unwrap();
            let decoded_bits = |form| {
                let encoded = encode_in_form(&values, &plan, &params, form).unwrap();
                assert_eq!(encoded.layout.sparse_form, form);
                let decoded = decode(&encoded.payload, &shape, &params, &encoded.layout);
                decoded
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect::<Vec<_>>()
            };
            assert_eq!(
                decoded_bits(SparseForm::Bitmap),
                decoded_bits(SparseForm::Dense),
                "{params:?}"
            );
        }
    }
}

/// Just below `1/bits` the dense form keeps the `sparsity = 0` size; just
/// above it the bitmap form is smaller (4096 values, f16 scales).
#[test]
fn form_flips_to_the_bitmap_just_above_one_over_bits() {
    let values: Vec<f32> = (0..4096).map(|i| (i as f32 * 0.37).sin()).collect();
    for bits in [2u8, 3, 4, 8] {
        let params = |sparsity| CodecParams {
            bits,
            sparsity,
            ..CodecParams::adr002(64)
        };
        let encoded = |sparsity| encode(&values, &[4096], &params(sparsity)).unwrap();
        let unsparse = encoded(0.0).payload.len();
        assert_eq!(unsparse, 64 * 2 + 4096 * usize::from(bits) / 8);
        let break_even = 1.0 / f64::from(bits);
        let below = encoded(break_even - 0.01);
        assert_eq!(below.layout.sparse_form, SparseForm::Dense, "{bits} bits");
        assert_eq!(below.payload.len(), unsparse, "{bits} bits");
        let above = encoded(break_even + 0.01);
        assert_eq!(above.layout.sparse_form, SparseForm::Bitmap, "{bits} bits");
        assert!(above.payload.len() < unsparse, "{bits} bits");
    }
}

#[test]
fn dense_form_is_refused_for_a_sparse_asymmetric_tensor() {
    let params = CodecParams {
        grid: Grid::Asymmetric,
        sparsity: 0.5,
        ..CodecParams::adr002(4)
    };
    let encoded = encode(&SPARSE_EXAMPLE, &[8], &params).unwrap();
    assert_eq!(encoded.layout.sparse_form, SparseForm::Bitmap);
    let dense = Layout {
        sparse_form: SparseForm::Dense,
        ..encoded.layout
    };
    assert_eq!(
        decode(&encoded.payload, &[8], &params, &dense),
        Err(CodecError::DenseFormNeedsSymmetricGrid)
    );
    assert_eq!(
        payload_len(&[8], &params, &dense),
        Err(CodecError::DenseFormNeedsSymmetricGrid)
    );
}

/// Manifests written before the dense form existed have no `sparse_form`
/// and always stored a bitmap when sparse.
#[test]
fn a_layout_without_sparse_form_reads_as_the_bitmap_form() {
    let old: Layout = serde_json::from_str(r#"{"scale_dtype": "f16"}"#).unwrap();
    assert_eq!(old.sparse_form, SparseForm::Bitmap);
    let (params, encoded, decoded) = sparse_example(0.5);
    assert_eq!(
        decode(&encoded.payload, &[8], &params, &old).unwrap(),
        decoded
    );
    assert_eq!(
        serde_json::to_string(&encoded.layout).unwrap(),
        r#"{"scale_dtype":"f16","sparse_form":"bitmap"}"#
    );
}

#[test]
fn adr002_payload_is_17_bytes_per_64_values() {
    let values: Vec<f32> = (0..64 * 100).map(|i| (i as f32 * 0.37).sin()).collect();
    let encoded = encode(&values, &[1, 4, 25, 64], &CodecParams::adr002(64)).unwrap();
    assert_eq!(encoded.payload.len(), 100 * 34);
    assert_eq!(
        payload_len(&[1, 4, 25, 64], &CodecParams::adr002(64), &encoded.layout),
        Ok(3400)
    );
}

#[test]
fn scales_beyond_f16_switch_the_tensor_to_f32_scales() {
    // 1e6 / 7 = 142857 > 65504 (f16 max); 1e-7 / 7 is below f16's normal range.
    for big_or_tiny in [1.0e6f32, 1.0e-7] {
        let values = [1.0, 2.0, big_or_tiny, -big_or_tiny];
        let encoded = encode(&values, &[4], &CodecParams::adr002(2)).unwrap();
        assert_eq!(encoded.layout.scale_dtype, ScaleDtype::F32);
        assert_eq!(encoded.payload.len(), 2 * 4 + 2);
        let scale = f32::from_le_bytes(encoded.payload[4..8].try_into().unwrap());
        assert_eq!(scale, big_or_tiny / 7.0);
        let decoded = decode(
            &encoded.payload,
            &[4],
            &CodecParams::adr002(2),
            &encoded.layout,
        )
        .unwrap();
        assert_eq!(&decoded[2..], [7.0 * scale, -7.0 * scale]);
    }
}

/// The fused symmetric paths must produce exactly what the general
/// group-by-group path does, with many tasks, aligned or not (5-value
/// tokens in groups of 2 put task starts mid-byte at 3 bits).
#[test]
fn fused_symmetric_paths_match_the_general_path() {
    for (bits, axis, head_dim, group_size) in [
        (4, Axis::Flat, 64, 64),
        (3, Axis::Token, 5, 2),
        (2, Axis::Token, 8, 3),
        (8, Axis::Token, 5, 2),
    ] {
        let shape = [1, 2, 700, head_dim];
        let count = 2 * 700 * head_dim;
        let values: Vec<f32> = (0..count)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 0.01)
            .collect();
        let params = CodecParams {
            bits,
            axis,
            ..CodecParams::adr002(group_size)
        };
        let plan = Plan::new(&shape, &params).unwrap();
        let range = quantizer::CodeRange::of(&params);
        let general = quantizer::group_params(&values, None, &plan.geometry, range, Fit::MinMax);
        let mapping = quantizer::Uniform {
            range,
            params: &general,
        };
        let codes = quantizer::quantize(&values, None, &plan.geometry, &mapping);
        let mut expected = Vec::new();
        write_scales(&general.scales, general.dtype, &mut expected);
        expected.extend_from_slice(&packed(&codes, bits));

        let encoded = encode(&values, &shape, &params).unwrap();
        assert_eq!(
            encoded.payload, expected,
            "{bits} bits, {axis:?}, D {head_dim}, g {group_size}"
        );
        let mut expected_values = vec![0f32; count];
        quantizer::dequantize(&codes, None, &plan.geometry, &mapping, &mut expected_values);
        assert_eq!(
            decode(&encoded.payload, &shape, &params, &encoded.layout).unwrap(),
            expected_values
        );
    }
}

#[test]
fn decode_rejects_wrong_lengths_and_layouts_without_panicking() {
    let values: Vec<f32> = (0..10).map(|i| i as f32 - 4.5).collect();
    let params = CodecParams::adr002(4);
    let encoded = encode(&values, &[10], &params).unwrap();
    let payload = &encoded.payload;
    let short = decode(
        &payload[..payload.len() - 1],
        &[10],
        &params,
        &encoded.layout,
    );
    assert_eq!(
        short,
        Err(CodecError::PayloadSize {
            expected: 11,
            actual: 10
        })
    );
    let mut long = payload.clone();
    long.push(0);
    assert!(matches!(
        decode(&long, &[10], &params, &encoded.layout),
        Err(CodecError::PayloadSize { .. })
    ));
    let f32_layout = Layout {
        scale_dtype: ScaleDtype::F32,
        ..encoded.layout.clone()
    };
    assert!(matches!(
        decode(payload, &[10], &params, &f32_layout),
        Err(CodecError::PayloadSize { .. })
    ));
    let overflowing = [usize::MAX, 2, 1, 1];
    assert_eq!(
        decode(payload, &overflowing, &params, &encoded.layout),
        Err(CodecError::ShapeOverflow)
    );
    let mut zero_scale = payload.clone();
    zero_scale[0..2].copy_from_slice(&[0, 0]);
    assert!(matches!(
        decode(&zero_scale, &[10], &params, &encoded.layout),
        Err(CodecError::CorruptPayload(_))
    ));
}

#[test]
fn encode_rejects_bad_params_and_values() {
    let values = [1.0f32; 8];
    let bad_bits = CodecParams {
        bits: 7,
        ..CodecParams::adr002(4)
    };
    assert_eq!(
        encode(&values, &[8], &bad_bits),
        Err(CodecError::UnsupportedBits(7))
    );
    assert_eq!(
        encode(&values, &[8], &CodecParams::adr002(0)),
        Err(CodecError::ZeroGroupSize)
    );
    let token = CodecParams {
        axis: Axis::Token,
        ..CodecParams::adr002(4)
    };
    assert_eq!(
        encode(&values, &[2, 4], &token),
        Err(CodecError::NeedsFourDims {
            feature: "per-token grouping",
            rank: 2
        })
    );
    let rotated = CodecParams {
        rotation_seed: Some(1),
        ..CodecParams::adr002(4)
    };
    assert_eq!(
        encode(&[0.0; 6], &[1, 1, 2, 3], &rotated),
        Err(CodecError::HeadDimNotPowerOfTwo(3))
    );
    let sparse = CodecParams {
        sparsity: 1.0,
        ..CodecParams::adr002(4)
    };
    assert_eq!(
        encode(&values, &[8], &sparse),
        Err(CodecError::InvalidSparsity(1.0))
    );
    assert_eq!(
        encode(&values, &[9], &CodecParams::adr002(4)),
        Err(CodecError::ValueCount {
            expected: 9,
            actual: 8
        })
    );
    let mut with_nan = values;
    with_nan[3] = f32::NAN;
    assert!(matches!(
        encode(&with_nan, &[8], &CodecParams::adr002(4)),
        Err(CodecError::NonFinite { index: 3, .. })
    ));
}

/// Seeded values with a few large ones, so scales differ group to group.
fn spread_values(n: usize, seed: u64, magnitude: f32) -> Vec<f32> {
    let mut rng = SplitMix64(seed);
    (0..n)
        .map(|i| {
            let unit = (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            unit * magnitude * if i % 37 == 5 { 9.0 } else { 1.0 }
        })
        .collect()
}

#[test]
fn encode_observed_is_encode_and_observes_decode_in_order_once() {
    let token = |bits, group_size| CodecParams {
        bits,
        axis: Axis::Token,
        ..CodecParams::adr002(group_size)
    };
    let cases: Vec<(Vec<usize>, CodecParams, f32)> = vec![
        (vec![1, 2, 300, 64], CodecParams::adr002(64), 4.0),
        (vec![1, 2, 33, 64], CodecParams::adr002(7), 4.0),
        (
            vec![1, 2, 33, 64],
            CodecParams {
                bits: 3,
                ..CodecParams::adr002(32)
            },
            4.0,
        ),
        (
            vec![1, 2, 33, 64],
            CodecParams {
                bits: 2,
                ..CodecParams::adr002(5)
            },
            4.0,
        ),
        (
            vec![1, 2, 33, 64],
            CodecParams {
                bits: 8,
                ..CodecParams::adr002(64)
            },
            4.0,
        ),
        (vec![1, 3, 17, 48], token(4, 32), 4.0),
        (vec![1, 3, 17, 48], token(3, 48), 4.0),
        // 3-bit groups of 5 start mid-byte: the general path.
        (
            vec![1, 1, 9, 40],
            CodecParams {
                bits: 3,
                ..CodecParams::adr002(5)
            },
            4.0,
        ),
        // Scales below f16's normal range: F32 scales, the general path.
        (vec![1, 1, 64, 64], CodecParams::adr002(64), 1e-6),
        // Not ADR-002-like: the general path.
        (
            vec![1, 2, 40, 64],
            CodecParams {
                grid: Grid::Asymmetric,
                axis: Axis::Channel,
                ..CodecParams::adr002(32)
            },
            4.0,
        ),
        (
            vec![1, 2, 40, 64],
            CodecParams {
                sink_tokens: 2,
                ..CodecParams::adr002(64)
            },
            4.0,
        ),
        (
            vec![1, 2, 40, 64],
            CodecParams {
                outliers: 0.01,
                ..CodecParams::adr002(64)
            },
            4.0,
        ),
        (
            vec![1, 2, 40, 64],
            CodecParams {
                sparsity: 0.3,
                ..CodecParams::adr002(64)
            },
            4.0,
        ),
        (vec![0], CodecParams::adr002(64), 4.0),
    ];
    // The general path's reconstruction beside the codes: every quantizer,
    // rotations, kept tokens, axes, masks and outliers.
    let kivi = |bits| CodecParams {
        bits,
        grid: Grid::Asymmetric,
        axis: Axis::Channel,
        ..CodecParams::adr002(32)
    };
    let engine = |grid: Grid| {
        let spec = grid.spec();
        let (axis, group_size) = match (grid.engine_block(), grid.engine_flat_group()) {
            (Some(block), _) => (Axis::Token, block),
            (None, Some(group)) => (Axis::Flat, group),
            (None, None) => (Axis::Token, 64),
        };
        CodecParams {
            bits: spec.bits[0],
            grid,
            axis,
            group_size,
            ..CodecParams::adr002(64)
        }
    };
    let mut cases = cases;
    cases.extend([
        (
            vec![1, 2, 40, 64],
            CodecParams {
                rotation_seed: Some(5),
                sink_tokens: 3,
                recent_tokens: 2,
                ..kivi(4)
            },
            4.0,
        ),
        (
            vec![1, 2, 40, 64],
            CodecParams {
                grid: Grid::Symmetric,
                rotation_seed: Some(9),
                sink_tokens: 4,
                axis: Axis::Token,
                ..kivi(3)
            },
            4.0,
        ),
        (
            vec![1, 2, 40, 64],
            CodecParams {
                fit: Fit::Mse,
                axis: Axis::Flat,
                group_size: 48,
                ..kivi(2)
            },
            4.0,
        ),
        (
            vec![1, 2, 40, 64],
            CodecParams {
                grid: Grid::Lloyd,
                rotation_seed: Some(1),
                sink_tokens: 1,
                ..kivi(3)
            },
            4.0,
        ),
        (
            vec![1, 2, 40, 64],
            CodecParams {
                grid: Grid::Kmeans,
                axis: Axis::Token,
                ..kivi(2)
            },
            4.0,
        ),
        (
            vec![1, 2, 40, 64],
            CodecParams {
                grid: Grid::Ecsq,
                rate: Some(3.0),
                sink_tokens: 1,
                ..kivi(4)
            },
            4.0,
        ),
        (
            vec![1, 2, 40, 64],
            CodecParams {
                sparsity: 0.4,
                ..kivi(4)
            },
            4.0,
        ),
        (
            vec![1, 2, 40, 64],
            CodecParams {
                outliers: 0.02,
                rotation_seed: Some(3),
                ..kivi(2)
            },
            4.0,
        ),
        (
            vec![1, 2, 40, 64],
            CodecParams {
                llama_rotation: Some(super::LlamaRotation::Key),
                ..engine(Grid::Q4_0)
            },
            4.0,
        ),
        (vec![1, 2, 40, 64], engine(Grid::Iq4Nl), 4.0),
        (vec![1, 2, 40, 64], engine(Grid::Fp8E4m3), 4.0),
        (vec![1, 2, 40, 64], engine(Grid::Nvfp4), 4.0),
        (vec![1, 2, 40, 64], engine(Grid::QuantoInt2), 4.0),
        (vec![1, 2, 40, 64], engine(Grid::Int8Trt), 4.0),
    ]);
    for (shape, params, magnitude) in cases {
        params.validate(&shape).expect("a valid case");
        let count = shape.iter().product();
        let values = spread_values(count, count as u64, magnitude);
        let mut seen_original = Vec::new();
        let mut seen_restored = Vec::new();
        let observed = encode_observed(&values, &shape, &params, &mut |original, restored| {
            seen_original.extend_from_slice(original);
            seen_restored.extend_from_slice(restored);
        })
        .unwrap();
        let encoded = encode(&values, &shape, &params).unwrap();
        assert_eq!(observed, encoded, "{shape:?} {params:?}");
        let decoded = decode(&encoded.payload, &shape, &params, &encoded.layout).unwrap();
        assert_eq!(seen_original, values, "{shape:?} {params:?}");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&seen_restored), bits(&decoded), "{shape:?} {params:?}");
    }
}

#[test]
fn every_simd_level_quantizes_a_block_to_the_same_bits() {
    use crate::simd::Level;
    for (bits, group_size, count) in [
        (4u8, 64usize, 4096usize),
        (4, 7, 1001),
        (3, 32, 960),
        (2, 5, 1000),
        (8, 64, 700),
    ] {
        let values = spread_values(count, u64::from(bits), 6.0);
        let geometry = super::groups::GroupGeometry {
            segment_len: count,
            segment_count: 1,
            group_size,
        };
        let range = quantizer::CodeRange {
            grid: Grid::Symmetric,
            bits,
        };
        let packed_len = bitpack::packed_len(count, bits).unwrap();
        let run = |level: Level| {
            let mut scales = vec![0f32; geometry.group_count()];
            assert!(fused::symmetric_f16_scales_at(
                level,
                &values,
                &geometry,
                range,
                &mut scales
            ));
            let mut codes = vec![0u8; count];
            let mut packed = vec![0u8; packed_len];
            let mut restored = vec![0f32; count];
            fused::symmetric_block_at(
                level,
                &values,
                &geometry,
                0,
                &scales,
                range,
                &mut codes,
                &mut packed,
                &mut restored,
            );
            // The decoder's kernel at the same level restores the same bits.
            let mut unpacked = vec![0f32; count];
            fused::symmetric_unpack_at(
                level,
                &packed,
                &geometry,
                0,
                &scales,
                bits,
                1 << (bits - 1),
                &mut codes,
                &mut unpacked,
            );
            assert_eq!(
                unpacked.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                restored.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
            (
                scales.iter().map(|s| s.to_bits()).collect::<Vec<_>>(),
                packed,
                restored.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            )
        };
        let scalar = run(Level::Scalar);
        // The scalar path against the codec's own encode and decode.
        let shape = [count];
        let params = CodecParams {
            bits,
            ..CodecParams::adr002(group_size)
        };
        let encoded = encode(&values, &shape, &params).unwrap();
        assert_eq!(
            &encoded.payload[encoded.payload.len() - packed_len..],
            &scalar.1[..],
            "{bits} bits, g {group_size}"
        );
        let decoded = decode(&encoded.payload, &shape, &params, &encoded.layout).unwrap();
        assert_eq!(
            decoded.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            scalar.2
        );
        for level in Level::available() {
            assert_eq!(run(level), scalar, "{level:?}, {bits} bits, g {group_size}");
        }
    }
}

/// An empty tensor's other dims are not backed by data: they must not size
/// an allocation (a `2^33`-wide head's rotation signs are 32 GiB) or be
/// multiplied (`2^33 * 2^33` wraps to a zero chunk length). CI's proptest
/// once drew the first of these shapes and aborted on the allocation.
#[test]
fn empty_tensors_with_huge_dims_round_trip_without_using_those_dims() {
    let huge = 1usize << 33;
    let cases = [
        (
            vec![0, 3, 3, huge],
            CodecParams {
                rotation_seed: Some(7),
                axis: Axis::Channel,
                ..CodecParams::adr002(4)
            },
        ),
        (
            vec![0, 3, huge, huge],
            CodecParams {
                sink_tokens: 1,
                ..CodecParams::adr002(8)
            },
        ),
        (
            vec![2, 2, 1, 0],
            CodecParams {
                sink_tokens: 1,
                axis: Axis::Token,
                sparsity: 0.5,
                ..CodecParams::adr002(4)
            },
        ),
    ];
    for (shape, params) in cases {
        let encoded = encode(&[], &shape, &params)
            .unwrap_or_else(|error| panic!("{shape:?} {params:?}: {error}"));
        let decoded = decode(&encoded.payload, &shape, &params, &encoded.layout).unwrap();
        assert!(decoded.is_empty(), "{shape:?}");
    }
}

#[test]
fn llama_rotation_blocks_follow_llama_cpps_rules() {
    // build_input_k_rot: the largest power of two >= 64 dividing head_dim;
    // build_input_v_rot: 64; no rotation unless head_dim % 64 == 0.
    use super::LlamaRotation::{Key, Value};
    for (head_dim, key, value) in [
        (64, Some(64), Some(64)),
        (128, Some(128), Some(64)),
        (192, Some(64), Some(64)),
        (256, Some(256), Some(64)),
        (576, Some(64), Some(64)),
        (80, None, None),
        (96, None, None),
        (0, None, None),
    ] {
        assert_eq!(Key.block(head_dim), key, "{head_dim}");
        assert_eq!(Value.block(head_dim), value, "{head_dim}");
    }
}

#[test]
fn llama_rotation_is_refused_off_the_llama_cpp_grids() {
    let params = CodecParams {
        llama_rotation: Some(super::LlamaRotation::Key),
        grid: Grid::Fp8E4m3,
        bits: 8,
        ..CodecParams::adr002(u32::MAX as usize)
    };
    let refused = encode(&[0.0; 64], &[1, 1, 1, 64], &params).unwrap_err();
    assert!(
        refused.to_string().contains("llama.cpp's rotation"),
        "{refused}"
    );
}
