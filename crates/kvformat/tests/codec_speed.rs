//! Throughput of the ADR-002 hot path on a TinyLlama-sized cache (23M F32
//! values). Ignored by default; run with
//! `cargo test --release -p kvformat --test codec_speed -- --ignored --nocapture`.

use std::time::Instant;

use kvformat::codec::{decode, encode, CodecParams};

#[test]
#[ignore = "timing, not a check: run by hand in release mode"]
fn adr002_encode_and_decode_throughput() {
    // 22 layers x key/value x [1, 4, 2048, 64] as one flat run of values.
    let shape = [44, 4, 2048, 64];
    let count: usize = shape.iter().product();
    let values: Vec<f32> = (0..count)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 8) as f32 / 16_777_216.0 - 0.5)
        .collect();
    let params = CodecParams::adr002(64);
    let megabytes = (count * 4) as f64 / 1e6;
    for _ in 0..3 {
        let start = Instant::now();
        let encoded = encode(&values, &shape, &params).unwrap();
        let encode_s = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let decoded = decode(&encoded.payload, &shape, &params, &encoded.layout).unwrap();
        let decode_s = start.elapsed().as_secs_f64();
        assert_eq!(decoded.len(), count);
        println!(
            "ADR-002 {megabytes:.0} MB of F32: encode {:.0} MB/s, decode {:.0} MB/s",
            megabytes / encode_s,
            megabytes / decode_s
        );
    }
}
