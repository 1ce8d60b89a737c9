//! File-level round trip under hostile value distributions: a KV cache file
//! (F32, F16 or BF16) with zeros, denormals, dtype-extreme and tiny
//! magnitudes and constant groups is packed to a file, unpacked and written
//! back as a cache file, and that file must restore every name, dtype and
//! shape, hold only finite values, and keep every value within the method's
//! documented error bound (docs/format.md, "Scales, offsets, codes").
//!
//! The bound is derived here from the original values alone, independently
//! of the codec: per group, `range/2` of the exact scale, widened for the
//! f16 storage of scales and offsets, plus the output dtype's rounding. A
//! dropped value (sparsity) decodes to 0 and is no larger than the
//! `floor(s * n)`-th smallest magnitude. (Rotation and FP16 kept tokens are
//! covered at the codec level by codec_properties.rs.)

use std::collections::BTreeMap;
use std::path::Path;

use kvformat::codec::{Axis, CodecParams, Grid};
use kvformat::packed::{pack_tensor, write_packed, PackedFile};
use kvformat::{write_cache, CacheDtype, CacheTensor, KvCache};
use proptest::prelude::*;

/// The largest finite value of each dtype.
fn dtype_max(dtype: CacheDtype) -> f32 {
    match dtype {
        CacheDtype::F32 => f32::MAX,
        CacheDtype::F16 => half::f16::MAX.to_f32(),
        CacheDtype::BF16 => half::bf16::MAX.to_f32(),
    }
}

/// Relative rounding error of storing an f32 in `dtype` (half an ulp), and
/// the absolute error near zero (half the smallest subnormal).
fn dtype_rounding(dtype: CacheDtype) -> (f32, f32) {
    match dtype {
        CacheDtype::F32 => (0.0, 0.0),
        CacheDtype::F16 => (2f32.powi(-11), 2f32.powi(-25)),
        CacheDtype::BF16 => (2f32.powi(-8), 2f32.powi(-134)),
    }
}

/// A distribution class of one tensor's values.
#[derive(Clone, Copy, Debug)]
enum Distribution {
    Normal,
    Zeros,
    Denormal,
    DtypeExtreme,
    Tiny,
    ConstantGroups,
}

fn values(count: usize, dtype: CacheDtype, distribution: Distribution, seed: u64) -> Vec<f32> {
    let mut state = seed | 1;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0
    };
    let raw: Vec<f32> = (0..count)
        .map(|i| match distribution {
            Distribution::Normal => uniform() * 3.0,
            Distribution::Zeros => 0.0,
            Distribution::Denormal => uniform() * 1e-40,
            // Every fifth value is exactly the dtype's largest, with either sign.
            Distribution::DtypeExtreme if i % 5 == 0 => dtype_max(dtype).copysign(uniform()),
            Distribution::DtypeExtreme => uniform() * dtype_max(dtype),
            Distribution::Tiny => uniform() * 1e-6,
            Distribution::ConstantGroups => [0.75, -2.5, 1e-3][i / 7 % 3],
        })
        .collect();
    dtype.to_f32(&dtype.from_f32(&raw)).into_owned()
}

/// The group of each value (row-major index), as docs/format.md defines them.
fn group_of(shape: &[usize], params: &CodecParams) -> Vec<usize> {
    let count: usize = shape.iter().product();
    let g = params.group_size;
    (0..count)
        .map(|i| match (params.axis, shape) {
            (Axis::Flat, _) => i / g,
            (Axis::Token, [_, _, _, d]) => (i / d) * d.div_ceil(g) + (i % d) / g,
            (Axis::Channel, [_, _, s, d]) => {
                let (head, token, channel) = (i / (s * d), i / d % s, i % d);
                (head * d + channel) * s.div_ceil(g) + token / g
            }
            _ => unreachable!("per-token and per-channel axes are only drawn for 4-D shapes"),
        })
        .collect()
}

/// The documented bound of every value, from the original values alone.
fn bounds(original: &[f32], shape: &[usize], params: &CodecParams) -> Vec<f32> {
    let groups = group_of(shape, params);
    let group_count = groups.iter().max().map_or(0, |g| g + 1);
    let (mut min, mut max) = (
        vec![f64::INFINITY; group_count],
        vec![f64::NEG_INFINITY; group_count],
    );
    for (&x, &g) in original.iter().zip(&groups) {
        min[g] = min[g].min(f64::from(x));
        max[g] = max[g].max(f64::from(x));
    }
    let levels = f64::from((1u32 << params.bits) - 1);
    let qmax = f64::from((1u32 << (params.bits - 1)) - 1);
    groups
        .iter()
        .map(|&g| {
            let magnitude = max[g].abs().max(min[g].abs());
            let scale = match params.grid {
                Grid::Symmetric => magnitude / qmax,
                Grid::Asymmetric => (max[g] - min[g]) / levels,
                _ => {
                    unreachable!("codebook, ecsq and engine grids have their own tests")
                }
            };
            // scale/2, the stored scale and offset off by f16's relative
            // rounding (2^-11, doubled for slack), and f32's smallest normal
            // for scales clamped up to it.
            let bound = scale / 2.0
                + levels * scale * 2f64.powi(-10)
                + magnitude * 2f64.powi(-10)
                + 2f64.powi(-126);
            bound as f32
        })
        .collect()
}

fn shapes() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        (
            1usize..3,
            1usize..4,
            1usize..20,
            prop::sample::select(vec![1usize, 4, 16, 64])
        )
            .prop_map(|(b, h, s, d)| vec![b, h, s, d]),
        prop::collection::vec(1usize..50, 1..3),
    ]
}

fn distributions() -> impl Strategy<Value = Distribution> {
    prop::sample::select(vec![
        Distribution::Normal,
        Distribution::Zeros,
        Distribution::Denormal,
        Distribution::DtypeExtreme,
        Distribution::Tiny,
        Distribution::ConstantGroups,
    ])
}

fn params(four_d: bool) -> impl Strategy<Value = CodecParams> {
    let axes = if four_d {
        vec![Axis::Flat, Axis::Token, Axis::Channel]
    } else {
        vec![Axis::Flat]
    };
    (
        prop::sample::select(vec![2u8, 3, 4, 4, 5, 6, 8]),
        prop::sample::select(vec![Grid::Symmetric, Grid::Symmetric, Grid::Asymmetric]),
        prop::sample::select(axes),
        prop::sample::select(vec![8usize, 32, 64, 128]),
        prop_oneof![3 => Just(0.0f64), 1 => 0.0f64..0.9],
    )
        .prop_map(|(bits, grid, axis, group_size, sparsity)| CodecParams {
            bits,
            grid,
            axis,
            group_size,
            sparsity,
            ..CodecParams::adr002(group_size)
        })
}

/// Cache -> packed file -> restored cache file, as `kv-compress` and
/// `kv-compress -decompress` do it; returns the restored file's tensors.
fn round_trip(
    dir: &Path,
    tensors: &[(String, CacheDtype, Vec<usize>, Vec<f32>)],
    params: &CodecParams,
) -> Vec<(String, CacheDtype, Vec<usize>, Vec<f32>)> {
    let input = dir.join("cache.safetensors");
    let views: Vec<CacheTensor<'_>> = tensors
        .iter()
        .map(|(name, dtype, shape, values)| CacheTensor {
            name,
            dtype: *dtype,
            shape,
            values,
        })
        .collect();
    write_cache(&input, &views, &BTreeMap::new()).unwrap();
    let cache = KvCache::open(&input).unwrap();
    let packed: Vec<_> = cache
        .tensors()
        .map(|(entry, dtype)| {
            let values = cache.values(entry, dtype).unwrap();
            pack_tensor(&entry.name, dtype, &entry.shape, &values, params)
                .unwrap()
                .0
        })
        .collect();
    let packed_path = dir.join("packed.safetensors");
    write_packed(&packed_path, &packed, cache.file().metadata()).unwrap();

    let opened = PackedFile::open(&packed_path).unwrap();
    let unpacked: Vec<(String, CacheDtype, Vec<usize>, Vec<f32>)> = opened
        .manifest()
        .tensors
        .iter()
        .map(|(name, t)| {
            (
                name.clone(),
                t.dtype,
                t.shape.clone(),
                opened.unpack(name).unwrap(),
            )
        })
        .collect();
    let restored_path = dir.join("restored.safetensors");
    let views: Vec<CacheTensor<'_>> = unpacked
        .iter()
        .map(|(name, dtype, shape, values)| CacheTensor {
            name,
            dtype: *dtype,
            shape,
            values,
        })
        .collect();
    write_cache(&restored_path, &views, &opened.manifest().input_metadata).unwrap();
    let restored = KvCache::open(&restored_path).unwrap();
    restored
        .tensors()
        .map(|(entry, dtype)| {
            let values = restored
                .values(entry, dtype)
                .unwrap_or_else(|e| panic!("restored file: {e}"));
            (
                entry.name.clone(),
                dtype,
                entry.shape.clone(),
                values.into_owned(),
            )
        })
        .collect()
}

fn tensors() -> impl Strategy<Value = Vec<(String, CacheDtype, Vec<usize>, Vec<f32>)>> {
    let dtype = prop::sample::select(vec![CacheDtype::F32, CacheDtype::F16, CacheDtype::BF16]);
    prop::collection::vec((dtype, shapes(), distributions(), any::<u64>()), 1..4).prop_map(
        |specs| {
            specs
                .into_iter()
                .enumerate()
                .map(|(i, (dtype, shape, distribution, seed))| {
                    let count = shape.iter().product();
                    (
                        format!("layer_{}_{}", i / 2, ["key", "value"][i % 2]),
                        dtype,
                        shape,
                        values(count, dtype, distribution, seed),
                    )
                })
                .collect()
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn restored_file_is_within_the_documented_bound(
        tensors in tensors(),
        flat_params in params(false),
        head_params in params(true),
    ) {
        let all_4d = tensors.iter().all(|(_, _, shape, _)| shape.len() == 4);
        let params = if all_4d { head_params } else { flat_params };
        let dir = tempfile::tempdir().unwrap();
        let restored = round_trip(dir.path(), &tensors, &params);
        prop_assert_eq!(restored.len(), tensors.len());
        let by_name: BTreeMap<&str, _> = tensors.iter().map(|t| (t.0.as_str(), t)).collect();
        for (name, dtype, shape, values) in &restored {
            let (_, original_dtype, original_shape, original) = by_name[name.as_str()];
            prop_assert_eq!((dtype, shape), (original_dtype, original_shape));
            let (relative, absolute) = dtype_rounding(*dtype);
            let mut magnitudes: Vec<f32> = original.iter().map(|x| x.abs()).collect();
            magnitudes.sort_by(f32::total_cmp);
            let dropped = (params.sparsity * original.len() as f64).floor() as usize;
            let drop_threshold = if dropped == 0 { -1.0 } else { magnitudes[dropped - 1] };
            for (i, ((&x, &restored), bound)) in original.iter().zip(values).zip(bounds(original, shape, &params)).enumerate() {
                let error = (x - restored).abs();
                let within = error <= bound + restored.abs() * relative + absolute;
                let dropped_to_zero = restored == 0.0 && x.abs() <= drop_threshold;
                prop_assert!(
                    within || dropped_to_zero,
                    "{name} {dtype:?} {shape:?} value {i}: {x} restored as {restored}, error {error} > bound {bound} ({params:?})"
                );
            }
        }
    }
}

/// Codebook grids at the extremes (f32::MAX, F16's largest, denormals, a
/// huge value beside tiny ones): encoding succeeds and decoding is finite.
#[test]
fn codebooks_stay_finite_at_the_extremes() {
    use kvformat::codec::{decode, encode, CodecParams, Fit};
    let cases: [&[f32]; 5] = [
        &[
            f32::MAX,
            -f32::MAX,
            f32::MAX,
            1.0,
            -f32::MAX,
            0.0,
            3.0e38,
            -1.0,
        ],
        &[
            65504.0, -65504.0, 65504.0, 65504.0, -65504.0, 1.0, 0.5, -0.25,
        ],
        &[
            1.0e-40, -1.0e-44, 3.0e-39, 0.0, -2.0e-45, 1.0e-41, 0.0, 7.0e-40,
        ],
        &[
            1.0e30, 1.0e-30, -1.0e-30, 0.0, 2.0e-30, -3.0e-30, 1.0e-30, 0.0,
        ],
        &[0.0; 8],
    ];
    for values in cases {
        for grid in [Grid::Lloyd, Grid::Kmeans] {
            for (bits, fit) in [(2, Fit::MinMax), (3, Fit::Mse), (4, Fit::MinMax)] {
                let params = CodecParams {
                    bits,
                    grid,
                    fit,
                    ..CodecParams::adr002(4)
                };
                let encoded = encode(values, &[8], &params)
                    .unwrap_or_else(|e| panic!("{values:?} {params:?}: {e}"));
                let restored = decode(&encoded.payload, &[8], &params, &encoded.layout).unwrap();
                assert!(
                    restored.iter().all(|x| x.is_finite()),
                    "{values:?} {params:?}: {restored:?}"
                );
            }
        }
    }
}
