//! Throughput of the codecs on a TinyLlama-sized cache (23M F32 values),
//! ADR-002 (the hot path) first. Ignored by default; run with
//! `cargo test --release -p kvformat --test codec_speed -- --ignored --nocapture`.

use std::time::Instant;

use kvformat::codec::{decode, encode, Axis, CodecParams, Grid};

#[test]
#[ignore = "timing, not a check: run by hand in release mode"]
fn codec_encode_and_decode_throughput() {
    // 22 layers x key/value x [1, 4, 2048, 64] as one tensor.
    let shape = [44, 4, 2048, 64];
    let count: usize = shape.iter().product();
    let values: Vec<f32> = (0..count)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 8) as f32 / 16_777_216.0 - 0.5)
        .collect();
    let kivi_keys = CodecParams {
        grid: Grid::Asymmetric,
        axis: Axis::Channel,
        ..CodecParams::adr002(64)
    };
    let methods = [
        ("ADR-002", CodecParams::adr002(64), 3),
        (
            "int3 sym token",
            CodecParams {
                bits: 3,
                axis: Axis::Token,
                ..CodecParams::adr002(64)
            },
            1,
        ),
        ("int4 asym channel (KIVI keys)", kivi_keys.clone(), 1),
        (
            "int4 rotated sym token",
            CodecParams {
                rotation_seed: Some(1),
                axis: Axis::Token,
                ..CodecParams::adr002(64)
            },
            1,
        ),
        (
            "int4 sparsity 0.5",
            CodecParams {
                sparsity: 0.5,
                ..CodecParams::adr002(64)
            },
            1,
        ),
    ];
    let megabytes = (count * 4) as f64 / 1e6;
    for (name, params, repeats) in methods {
        for _ in 0..repeats {
            let start = Instant::now();
            let encoded = encode(&values, &shape, &params).unwrap();
            let encode_s = start.elapsed().as_secs_f64();
            let start = Instant::now();
            let decoded = decode(&encoded.payload, &shape, &params, &encoded.layout).unwrap();
            let decode_s = start.elapsed().as_secs_f64();
            assert_eq!(decoded.len(), count);
            println!(
                "{name}, {megabytes:.0} MB of F32: encode {:.0} MB/s, decode {:.0} MB/s",
                megabytes / encode_s,
                megabytes / decode_s
            );
        }
    }
}
