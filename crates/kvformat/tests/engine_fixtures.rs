//! The engine grids against independent references, bit for bit:
//! testdata/engines/engines.safetensors holds inputs and what gguf-py
//! (llama.cpp's q8_0/q4_0/q4_1/q5_0/q5_1, `gguf.quants`), a numpy port of
//! ggml's `quantize_row_iq4_nl_ref` (iq4_nl, decoded by gguf-py), torch
//! (vLLM's saturating float8 casts) and numpy ports of SGLang's and
//! TensorRT-LLM's fp4 caches (with torch's e4m3 cast) make of them; xtask/python/engine_fixtures.py
//! wrote it (torch 2.15.0, numpy 2.4.6, gguf 0.19.0, named in the file's
//! metadata). Codes, stored scales and decoded values must all be identical.

use std::collections::HashMap;

use kvformat::codec::{
    decode, e2m1_value, encode, unpack_codes, Axis, CodecParams, Grid, LlamaRotation, ScaleDtype,
    E4M3, E5M2,
};
use kvformat::dtype::CacheDtype;
use kvformat::preset::WHOLE_SEGMENT;
use safetensors::SafeTensors;

const SHAPE: [usize; 4] = [1, 2, 8, 64];
/// `rot_input`'s: head_dim 128, so keys rotate in one block of 128, values in two of 64.
const ROT_SHAPE: [usize; 4] = [1, 2, 4, 128];

struct Fixtures {
    bytes: Vec<u8>,
}

impl Fixtures {
    fn load() -> Self {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../testdata/engines/engines.safetensors"
        );
        Fixtures {
            bytes: std::fs::read(path).expect("testdata/engines/engines.safetensors"),
        }
    }

    fn raw(&self, name: &str) -> Vec<u8> {
        let file = SafeTensors::deserialize(&self.bytes).expect("fixture file parses");
        file.tensor(name)
            .unwrap_or_else(|_| panic!("fixture tensor {name}"))
            .data()
            .to_vec()
    }

    fn f32s(&self, name: &str) -> Vec<f32> {
        self.raw(name)
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    fn metadata(&self) -> HashMap<String, String> {
        let (_, meta) = SafeTensors::read_metadata(&self.bytes).expect("fixture header");
        meta.metadata().clone().unwrap_or_default()
    }
}

fn params(grid: Grid, axis: Axis, group_size: usize, unit_scale: bool) -> CodecParams {
    CodecParams {
        bits: grid.spec().bits[0],
        grid,
        axis,
        group_size,
        unit_scale,
        ..CodecParams::adr002(32)
    }
}

/// Encodes the fixture input; returns (scale bytes, offset bytes, codes, decoded values).
fn run(
    input: &[f32],
    params: &CodecParams,
    scale_len: usize,
) -> (Vec<u8>, Vec<u8>, Vec<u8>, Vec<f32>) {
    run_shaped(input, &SHAPE, params, scale_len)
}

fn run_shaped(
    input: &[f32],
    shape: &[usize],
    params: &CodecParams,
    scale_len: usize,
) -> (Vec<u8>, Vec<u8>, Vec<u8>, Vec<f32>) {
    let encoded = encode(input, shape, params).expect("encodes");
    let payload = &encoded.payload;
    let offsets_len = if params.grid.spec().offsets {
        scale_len
    } else {
        0
    };
    let (scales, rest) = payload.split_at(scale_len);
    let (offsets, packed) = rest.split_at(offsets_len);
    let mut codes = vec![0u8; input.len()];
    unpack_codes(packed, params.bits, &mut codes);
    let values = decode(payload, shape, params, &encoded.layout).expect("decodes");
    (scales.to_vec(), offsets.to_vec(), codes, values)
}

fn assert_bits_equal(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(
            g.to_bits(),
            w.to_bits(),
            "{what}[{i}]: got {g}, reference {w}"
        );
    }
}

#[test]
fn the_fixtures_name_their_references() {
    let meta = Fixtures::load().metadata();
    assert_eq!(
        meta.get("torch_version").map(String::as_str),
        Some("2.15.0")
    );
    assert_eq!(meta.get("gguf_version").map(String::as_str), Some("0.19.0"));
    assert_eq!(
        meta.get("optimum-quanto_version").map(String::as_str),
        Some("0.2.7")
    );
}

#[test]
fn llama_cpp_types_match_gguf_py_and_ggml_bit_for_bit() {
    let fixtures = Fixtures::load();
    let input = fixtures.f32s("input");
    for (grid, kind) in [
        (Grid::Q8_0, "q8_0"),
        (Grid::Q4_0, "q4_0"),
        (Grid::Q4_1, "q4_1"),
        (Grid::Q5_0, "q5_0"),
        (Grid::Q5_1, "q5_1"),
        (Grid::Iq4Nl, "iq4_nl"),
    ] {
        let blocks = input.len() / 32;
        let (scales, mins, codes, values) =
            run(&input, &params(grid, Axis::Token, 32, false), blocks * 2);
        assert_eq!(scales, fixtures.raw(&format!("{kind}.d")), "{kind}: d");
        if grid.spec().offsets {
            assert_eq!(mins, fixtures.raw(&format!("{kind}.m")), "{kind}: m");
        }
        assert_eq!(
            codes,
            fixtures.raw(&format!("{kind}.codes")),
            "{kind}: codes"
        );
        assert_bits_equal(kind, &values, &fixtures.f32s(&format!("{kind}.values")));
    }
}

#[test]
fn llama_cpp_rotated_caches_match_ggml_fwht_and_gguf_py_bit_for_bit() {
    let fixtures = Fixtures::load();
    let input = fixtures.f32s("rot_input");
    for (grid, kind) in [
        (Grid::Q8_0, "q8_0"),
        (Grid::Q4_0, "q4_0"),
        (Grid::Iq4Nl, "iq4_nl"),
    ] {
        for (rotation, tensor_kind) in
            [(LlamaRotation::Key, "key"), (LlamaRotation::Value, "value")]
        {
            let params = CodecParams {
                llama_rotation: Some(rotation),
                ..params(grid, Axis::Token, 32, false)
            };
            let (scales, _, codes, values) =
                run_shaped(&input, &ROT_SHAPE, &params, input.len() / 32 * 2);
            let name = format!("rot.{kind}.{tensor_kind}");
            assert_eq!(scales, fixtures.raw(&format!("{name}.d")), "{name}: d");
            assert_eq!(
                codes,
                fixtures.raw(&format!("{name}.codes")),
                "{name}: codes"
            );
            assert_bits_equal(&name, &values, &fixtures.f32s(&format!("{name}.values")));
        }
    }
}

#[test]
fn fp4_caches_match_sglang_and_trt_llm_ports_bit_for_bit() {
    let fixtures = Fixtures::load();
    let input = fixtures.f32s("input");
    let blocks = input.len() / 16;
    for (grid, name, unit) in [
        (Grid::Fp4Mx16, "sglang_fp4", false),
        (Grid::Nvfp4, "nvfp4.unit", true),
        (Grid::Nvfp4, "nvfp4.calibrated", false),
    ] {
        let params = params(grid, Axis::Token, 16, unit);
        let encoded = encode(&input, &SHAPE, &params).expect("encodes");
        let payload = &encoded.payload;
        assert_eq!(
            payload[..blocks],
            fixtures.raw(&format!("{name}.scale")),
            "{name}: scales"
        );
        let levels = if grid == Grid::Nvfp4 { 4 } else { 0 };
        if levels > 0 {
            assert_eq!(
                payload[blocks..blocks + levels],
                fixtures.raw(&format!("{name}.k_scale")),
                "{name}: k_scale"
            );
        }
        let mut codes = vec![0u8; input.len()];
        unpack_codes(&payload[blocks + levels..], 4, &mut codes);
        assert_eq!(
            codes,
            fixtures.raw(&format!("{name}.codes")),
            "{name}: codes"
        );
        let values = decode(payload, &SHAPE, &params, &encoded.layout).expect("decodes");
        assert_bits_equal(name, &values, &fixtures.f32s(&format!("{name}.values")));
    }
}

/// `bytes` as the floats of a 2- or 4-byte dtype.
fn floats(bytes: &[u8], dtype: CacheDtype) -> Vec<f32> {
    match dtype {
        CacheDtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        CacheDtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        CacheDtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    }
}

#[test]
fn transformers_quanto_cache_matches_optimum_quanto_bit_for_bit() {
    let fixtures = Fixtures::load();
    for (grid, bits) in [(Grid::QuantoInt4, 4), (Grid::QuantoInt2, 2)] {
        for (dtype, stored, name) in [
            (CacheDtype::F32, ScaleDtype::F32, "f32"),
            (CacheDtype::F16, ScaleDtype::F16, "f16"),
            (CacheDtype::BF16, ScaleDtype::Bf16, "bf16"),
        ] {
            let case = format!("quanto_int{bits}.{name}");
            // The input as the model holds it (cast to its dtype by torch).
            let input = fixtures.f32s(&format!("{case}.input"));
            let params = CodecParams {
                model_dtype: Some(stored),
                ..params(grid, Axis::Flat, 64, false)
            };
            let encoded = encode(&input, &SHAPE, &params).expect("encodes");
            let payload = &encoded.payload;
            let width = dtype.size_bytes();
            let groups = input.len() / 64;
            let (scales, rest) = payload.split_at(groups * width);
            let (shifts, packed) = rest.split_at(groups * width);
            assert_bits_equal(
                &format!("{case}: scale"),
                &floats(scales, dtype),
                &fixtures.f32s(&format!("{case}.scale")),
            );
            assert_bits_equal(
                &format!("{case}: shift"),
                &floats(shifts, dtype),
                &fixtures.f32s(&format!("{case}.shift")),
            );
            let mut codes = vec![0u8; input.len()];
            unpack_codes(packed, bits, &mut codes);
            assert_eq!(
                codes,
                fixtures.raw(&format!("{case}.codes")),
                "{case}: codes"
            );
            let values = decode(payload, &SHAPE, &params, &encoded.layout).expect("decodes");
            assert_bits_equal(&case, &values, &fixtures.f32s(&format!("{case}.values")));
        }
    }
}

#[test]
fn trt_llm_int8_matches_torch_bit_for_bit() {
    let fixtures = Fixtures::load();
    let input = fixtures.f32s("input");
    let (scales, _, codes, values) = run(
        &input,
        &params(Grid::Int8Trt, Axis::Flat, WHOLE_SEGMENT, false),
        4,
    );
    assert_eq!(scales, fixtures.raw("int8_trt.scale"), "scale");
    assert_eq!(codes, fixtures.raw("int8_trt.codes"), "codes");
    assert_bits_equal("int8_trt", &values, &fixtures.f32s("int8_trt.values"));
}

#[test]
fn e2m1_values_are_the_ocp_mx_specs() {
    // OCP Microscaling Formats v1.0, table 5 (FP4 E2M1): codes 0..7 and their negatives.
    let spec = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
    for (code, &value) in spec.iter().enumerate() {
        assert_eq!(e2m1_value(code as u8), value);
        assert_eq!(e2m1_value(code as u8 | 0x8), -value);
    }
}

#[test]
fn vllm_fp8_matches_torch_casts_bit_for_bit() {
    let fixtures = Fixtures::load();
    let input = fixtures.f32s("input");
    for (grid, fmt) in [(Grid::Fp8E4m3, "e4m3"), (Grid::Fp8E5m2, "e5m2")] {
        for (mode, axis, unit) in [
            ("unit", Axis::Flat, true),
            ("calibrated", Axis::Flat, false),
            ("dynamic", Axis::Token, false),
        ] {
            let name = format!("fp8_{fmt}.{mode}");
            let want_scales = fixtures.raw(&format!("{name}.scale"));
            let (scales, _, codes, values) = run(
                &input,
                &params(grid, axis, WHOLE_SEGMENT, unit),
                want_scales.len(),
            );
            assert_eq!(scales, want_scales, "{name}: scales");
            assert_eq!(
                codes,
                fixtures.raw(&format!("{name}.codes")),
                "{name}: codes"
            );
            assert_bits_equal(&name, &values, &fixtures.f32s(&format!("{name}.values")));
        }
    }
}

#[test]
fn single_fp8_casts_match_torch_with_saturation_and_nan() {
    let fixtures = Fixtures::load();
    let input = fixtures.f32s("cast.input");
    for (format, fmt) in [(E4M3, "e4m3"), (E5M2, "e5m2")] {
        let want = fixtures.raw(&format!("cast.{fmt}"));
        for (i, (&x, &byte)) in input.iter().zip(&want).enumerate() {
            let got = format.encode(x);
            if x.is_nan() {
                assert!(
                    format.decode(got).is_nan() && format.decode(byte).is_nan(),
                    "{fmt}[{i}]: NaN"
                );
            } else {
                assert_eq!(got, byte, "{fmt}[{i}]: {x}");
            }
        }
    }
}
