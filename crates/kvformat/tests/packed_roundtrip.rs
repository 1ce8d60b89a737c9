//! The container round trip over random shapes, dtypes, group sizes and
//! values: what `PackedFile::unpack` returns is bit-identical to the
//! reconstruction the compressor measured, under the same names, dtypes and
//! shapes, with the input metadata restored.

use std::collections::BTreeMap;

use kvformat::codec::CodecParams;
use kvformat::packed::{pack_tensor, write_packed, PackedFile};
use kvformat::{CacheDtype, TensorFile};
use proptest::prelude::*;

fn dtype() -> impl Strategy<Value = CacheDtype> {
    prop_oneof![
        Just(CacheDtype::F32),
        Just(CacheDtype::F16),
        Just(CacheDtype::BF16)
    ]
}

/// A tensor: shape of rank 1 to 4, values from a mix of distributions
/// (normal-ish, zeros, huge and tiny magnitudes), rounded to `dtype`.
fn tensor(dtype: CacheDtype) -> impl Strategy<Value = (Vec<usize>, Vec<f32>)> {
    prop::collection::vec(1usize..9, 1..=4).prop_flat_map(move |shape| {
        let count: usize = shape.iter().product();
        let value = prop_oneof![
            4 => -4.0f32..4.0,
            1 => Just(0.0f32),
            1 => -1e-6f32..1e-6,
            1 => -3e4f32..3e4,
        ];
        prop::collection::vec(value, count).prop_map(move |values| {
            let stored = dtype.to_f32(&dtype.from_f32(&values)).into_owned();
            (shape.clone(), stored)
        })
    })
}

fn cache() -> impl Strategy<Value = Vec<(String, CacheDtype, Vec<usize>, Vec<f32>)>> {
    prop::collection::vec(dtype().prop_flat_map(|d| (Just(d), tensor(d))), 1..5).prop_map(
        |tensors| {
            tensors
                .into_iter()
                .enumerate()
                .map(|(i, (dtype, (shape, values)))| {
                    (
                        format!("layer_{}_{}", i / 2, ["key", "value"][i % 2]),
                        dtype,
                        shape,
                        values,
                    )
                })
                .collect()
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn unpack_equals_the_measured_reconstruction(
        tensors in cache(),
        group_size in prop::sample::select(vec![8usize, 16, 32, 64, 128]),
        sparsity in prop_oneof![3 => Just(0.0f64), 1 => 0.0f64..0.9],
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("packed.safetensors");
        let params = CodecParams { sparsity, ..CodecParams::adr002(group_size) };
        let mut packed = Vec::new();
        let mut reconstructions = Vec::new();
        for (name, dtype, shape, values) in &tensors {
            let (tensor, reconstruction) = pack_tensor(name, *dtype, shape, values, &params).unwrap();
            prop_assert_eq!(tensor.entry.stored_len, tensor.stored.len());
            packed.push(tensor);
            reconstructions.push(reconstruction);
        }
        let metadata = BTreeMap::from([("source".to_string(), "proptest".to_string())]);
        write_packed(&path, &packed, &metadata).unwrap();

        // Any safetensors reader sees one U8 tensor per input tensor.
        let file = TensorFile::open(&path).unwrap();
        prop_assert_eq!(file.tensors().len(), tensors.len());
        prop_assert_eq!(&file.metadata()["source"], "proptest");
        prop_assert_eq!(&file.metadata()["original_dtype"], tensors[0].1.torch_name());

        let opened = PackedFile::open(&path).unwrap();
        prop_assert_eq!(&opened.manifest().input_metadata, &metadata);
        for ((name, dtype, shape, _), reconstruction) in tensors.iter().zip(&reconstructions) {
            let entry = &opened.manifest().tensors[name];
            prop_assert_eq!((entry.dtype, &entry.shape), (*dtype, shape));
            let unpacked = opened.unpack(name).unwrap();
            prop_assert_eq!(
                unpacked.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                reconstruction.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }
}

/// A zero tensor compresses to a payload LZ4 shrinks, so the LZ4 path is
/// exercised and restored exactly.
#[test]
fn lz4_is_used_where_it_shrinks_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zeros.safetensors");
    let values = vec![0.0f32; 4096];
    let (tensor, reconstruction) = pack_tensor(
        "z",
        CacheDtype::F16,
        &[1, 1, 64, 64],
        &values,
        &CodecParams::adr002(64),
    )
    .unwrap();
    assert!(tensor.entry.lz4);
    assert!(tensor.entry.stored_len < tensor.entry.raw_len);
    write_packed(&path, &[tensor], &BTreeMap::new()).unwrap();
    assert_eq!(
        PackedFile::open(&path).unwrap().unpack("z").unwrap(),
        reconstruction
    );
    assert!(reconstruction.iter().all(|&v| v == 0.0));
}

/// A value at the edge of f32 whose 8-bit scale rounds up would reconstruct
/// beyond f32; the codec clamps it (docs/format.md), so it packs, finite,
/// with finite metrics, and round trips through the file.
#[test]
fn an_edge_of_f32_value_packs_to_a_finite_reconstruction() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edge.safetensors");
    let params = CodecParams {
        bits: 8,
        ..CodecParams::adr002(8)
    };
    let (tensor, reconstruction) =
        pack_tensor("edge", CacheDtype::F32, &[1], &[-f32::MAX], &params).unwrap();
    assert!(
        reconstruction[0].is_finite() && reconstruction[0] < -3.0e38,
        "{reconstruction:?}"
    );
    let m = tensor.entry.metrics;
    assert!(
        [m.rmse, m.snr_db, m.cosine, m.max_error]
            .iter()
            .all(|v| v.is_finite()),
        "{m:?}"
    );
    write_packed(&path, &[tensor], &BTreeMap::new()).unwrap();
    assert_eq!(
        PackedFile::open(&path).unwrap().unpack("edge").unwrap(),
        reconstruction
    );
}

/// The ecsq grid's payload has no fixed length; at its widest (rate 16,
/// groups of two with f32 means, heavy-tailed values beyond f16) it stays
/// within the reader's bound on a payload's size and round trips.
#[test]
fn an_ecsq_payload_at_its_widest_is_within_the_readers_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ecsq.safetensors");
    let values: Vec<f32> = (0..4096u32)
        .map(|i| {
            let hashed = i.wrapping_mul(2_654_435_761) >> 8;
            let unit = hashed as f32 / 16_777_216.0 - 0.5;
            unit * if i % 97 == 0 { 1.0e30 } else { 1.0e20 }
        })
        .collect();
    let params = CodecParams {
        grid: kvformat::codec::Grid::Ecsq,
        rate: Some(16.0),
        ..CodecParams::adr002(2)
    };
    let (tensor, reconstruction) =
        pack_tensor("wide", CacheDtype::F32, &[1, 1, 64, 64], &values, &params).unwrap();
    assert!(
        tensor.entry.raw_len <= 8 * values.len(),
        "{} bytes",
        tensor.entry.raw_len
    );
    write_packed(&path, &[tensor], &BTreeMap::new()).unwrap();
    assert_eq!(
        PackedFile::open(&path).unwrap().unpack("wide").unwrap(),
        reconstruction
    );
}
