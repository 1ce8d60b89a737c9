//! Property tests of the codecs over shapes, bit widths, grids, axes, group
//! sizes, sparsity, rotation, kept tokens and value distributions (zeros,
//! denormals, huge and tiny magnitudes, constant groups).
//!
//! The checks re-derive the payload layout and group membership from
//! docs/format.md rather than calling the codec's internals: every value must
//! be within its group's error bound, computed from the scales and offsets
//! read back out of the payload. Which values were dropped is read from the
//! bitmap, or in the dense form re-derived from the documented ranking.

use half::f16;
use kvformat::codec::{
    decode, decode_into, encode, payload_len, Axis, CodecError, CodecParams, EntropyCoder, Fit,
    Grid, Layout, ScaleDtype, SparseForm,
};
use proptest::prelude::*;

/// `[batch, heads, seq, head_dim]` with small dims, or a flat shape.
fn shapes() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        (
            1usize..3,
            1usize..4,
            0usize..12,
            prop::sample::select(vec![1usize, 2, 4, 8, 16, 64])
        )
            .prop_map(|(b, h, s, d)| vec![b, h, s, d]),
        prop::collection::vec(1usize..40, 1..3),
    ]
}

/// Values of one tensor: a base magnitude (tiny, normal, huge or denormal)
/// with zeros and constant runs mixed in.
fn values(count: usize) -> impl Strategy<Value = Vec<f32>> {
    let magnitude = prop::sample::select(vec![
        1.0f32, 1.0e-3, 3.0e4, 1.0e30, 3.0e38, 1.0e-30, 1.0e-40, 1.0e-44,
    ]);
    (
        magnitude,
        prop::collection::vec((-1.0f32..1.0, 0u8..10), count),
    )
        .prop_map(|(magnitude, raw)| {
            let mut constant = 0.0;
            raw.iter()
                .map(|&(x, kind)| match kind {
                    0 => 0.0,
                    1 => {
                        constant = if constant == 0.0 {
                            x * magnitude
                        } else {
                            constant
                        };
                        constant
                    }
                    2 => -0.0,
                    _ => x * magnitude,
                })
                .collect()
        })
}

fn params_for(shape: &[usize]) -> impl Strategy<Value = CodecParams> {
    let four_d = shape.len() == 4;
    let head_dim = if four_d { shape[3] } else { 0 };
    let axes = if four_d {
        vec![Axis::Flat, Axis::Token, Axis::Channel]
    } else {
        vec![Axis::Flat]
    };
    (
        prop::sample::select(vec![2u8, 3, 4, 5, 6, 8]),
        prop::sample::select(vec![Grid::Symmetric, Grid::Asymmetric]),
        prop::sample::select(axes),
        prop::sample::select(vec![1usize, 2, 3, 4, 7, 16, 32, 64, 128]),
        prop_oneof![Just(0.0f64), 0.0f64..0.95],
        prop::option::of(any::<u64>()),
        0usize..4,
        0usize..4,
    )
        .prop_map(
            move |(bits, grid, axis, group_size, sparsity, seed, sink, recent)| CodecParams {
                bits,
                grid,
                axis,
                group_size,
                rotation_seed: seed.filter(|_| four_d && head_dim.is_power_of_two()),
                sink_tokens: if four_d { sink } else { 0 },
                recent_tokens: if four_d { recent } else { 0 },
                sparsity,
                fit: Fit::MinMax,
                outliers: 0.0,
                rate: None,
                unit_scale: false,
                llama_rotation: None,
                model_dtype: None,
            },
        )
}

/// Outliers of a tensor: `floor(F · n)` per block of 65,536 quantized values.
fn outlier_count(shape: &[usize], params: &CodecParams) -> usize {
    let quantized = View::new(shape, params).quantized_count();
    let per_block = |n: usize| (n as f64 * params.outliers).floor() as usize;
    per_block(65_536) * (quantized / 65_536) + per_block(quantized % 65_536)
}

fn case() -> impl Strategy<Value = (Vec<usize>, CodecParams, Vec<f32>)> {
    shapes().prop_flat_map(|shape| {
        let count = shape.iter().product();
        (Just(shape.clone()), params_for(&shape), values(count))
    })
}

/// The tensor seen as `[heads, seq, head_dim]` with its kept tokens split
/// off, as docs/format.md describes.
struct View {
    heads: usize,
    seq: usize,
    head_dim: usize,
    mid_start: usize,
    mid_len: usize,
}

impl View {
    fn new(shape: &[usize], params: &CodecParams) -> Self {
        let (heads, seq, head_dim) = match *shape {
            [b, h, s, d] => (b * h, s, d),
            _ => (1, 1, shape.iter().product()),
        };
        let (sink, recent) = (params.sink_tokens, params.recent_tokens);
        let (mid_start, mid_len) = if (sink > 0 || recent > 0) && sink + recent >= seq {
            (seq, 0)
        } else {
            (sink, seq - sink - recent)
        };
        View {
            heads,
            seq,
            head_dim,
            mid_start,
            mid_len,
        }
    }

    fn is_kept_token(&self, token: usize) -> bool {
        token < self.mid_start || token >= self.mid_start + self.mid_len
    }

    /// Quantized values, row-major over `[heads, mid_len, head_dim]`.
    fn middle(&self, values: &[f32]) -> Vec<f32> {
        let mut out = Vec::new();
        for head in 0..self.heads {
            for token in self.mid_start..self.mid_start + self.mid_len {
                let start = (head * self.seq + token) * self.head_dim;
                out.extend_from_slice(&values[start..start + self.head_dim]);
            }
        }
        out
    }

    /// Kept-token values in storage order: per head, kept tokens ascending.
    fn kept(&self, values: &[f32]) -> Vec<f32> {
        let mut out = Vec::new();
        for head in 0..self.heads {
            for token in (0..self.seq).filter(|&t| self.is_kept_token(t)) {
                let start = (head * self.seq + token) * self.head_dim;
                out.extend_from_slice(&values[start..start + self.head_dim]);
            }
        }
        out
    }

    fn quantized_count(&self) -> usize {
        self.heads * self.mid_len * self.head_dim
    }

    fn group_count(&self, axis: Axis, group_size: usize) -> usize {
        match axis {
            Axis::Flat => self.quantized_count().div_ceil(group_size),
            Axis::Token => self.heads * self.mid_len * self.head_dim.div_ceil(group_size),
            Axis::Channel => self.heads * self.head_dim * self.mid_len.div_ceil(group_size),
        }
    }

    /// Position of the `index`-th middle value (row-major) in group order.
    fn group_position(&self, index: usize, axis: Axis) -> usize {
        let (head, token, channel) = (
            index / (self.mid_len * self.head_dim),
            index / self.head_dim % self.mid_len,
            index % self.head_dim,
        );
        match axis {
            Axis::Flat | Axis::Token => index,
            Axis::Channel => (head * self.head_dim + channel) * self.mid_len + token,
        }
    }

    /// Group of the `index`-th middle value (row-major).
    fn group_of(&self, index: usize, axis: Axis, group_size: usize) -> usize {
        let (head, token, channel) = (
            index / (self.mid_len * self.head_dim),
            index / self.head_dim % self.mid_len,
            index % self.head_dim,
        );
        match axis {
            Axis::Flat => index / group_size,
            Axis::Token => {
                (head * self.mid_len + token) * self.head_dim.div_ceil(group_size)
                    + channel / group_size
            }
            Axis::Channel => {
                (head * self.head_dim + channel) * self.mid_len.div_ceil(group_size)
                    + token / group_size
            }
        }
    }
}

/// The payload's sections, read as docs/format.md lays them out.
struct Sections {
    scales: Vec<f64>,
    offsets: Vec<f64>,
    kept: Vec<f32>,
    /// Kept bit per middle value: from the bitmap, else all true (see
    /// [`mark_dense_drops`] for the dense form).
    stored: Vec<bool>,
    code_bytes: usize,
}

fn read_sections(payload: &[u8], view: &View, params: &CodecParams, layout: &Layout) -> Sections {
    let groups = view.group_count(params.axis, params.group_size);
    // This independent reader covers the research grids' dtypes; the
    // engine grids' bytes are checked against the engines (engine_fixtures.rs).
    let width = match layout.scale_dtype {
        ScaleDtype::F16 => 2,
        ScaleDtype::F32 => 4,
        other => unreachable!("research grids store f16 or f32 scales, not {other:?}"),
    };
    let read = |bytes: &[u8]| -> Vec<f64> {
        bytes
            .chunks_exact(width)
            .map(|c| match layout.scale_dtype {
                ScaleDtype::F16 => f64::from(f16::from_le_bytes([c[0], c[1]]).to_f32()),
                _ => f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            })
            .collect()
    };
    let mut at = 0;
    let mut take = |len: usize| {
        let section = &payload[at..at + len];
        at += len;
        section
    };
    let scales = read(take(groups * width));
    let offsets = if params.grid == Grid::Asymmetric {
        read(take(groups * width))
    } else {
        vec![0.0; groups]
    };
    let kept_count = view.heads * (view.seq - view.mid_len) * view.head_dim;
    let kept = take(2 * kept_count)
        .chunks_exact(2)
        .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect();
    let n = view.quantized_count();
    let stored = if params.sparsity > 0.0 && layout.sparse_form == SparseForm::Bitmap {
        let bitmap = take(n.div_ceil(8));
        (0..n).map(|i| bitmap[i / 8] >> (i % 8) & 1 == 1).collect()
    } else {
        vec![true; n]
    };
    let code_bytes = payload.len() - at;
    Sections {
        scales,
        offsets,
        kept,
        stored,
        code_bytes,
    }
}

/// The largest error a value of a group may have (docs/format.md): half a
/// step, plus for the asymmetric grid what rounding the offset and scale to
/// their dtype costs (`exact` is the group's (min, max) over stored values).
fn bound(params: &CodecParams, scale: f64, offset: f64, exact: (f64, f64), magnitude: f64) -> f64 {
    let float_slop = scale * 1.0e-5 + magnitude * 2.0f64.powi(-22);
    match params.grid {
        Grid::Symmetric => scale / 2.0 + float_slop,
        Grid::Asymmetric => {
            let levels = f64::from((1u32 << params.bits) - 1);
            let exact_scale = (exact.1 - exact.0) / levels;
            let offset_error = (offset - exact.0).abs();
            let scale_error = if exact.1 > exact.0 {
                (scale - exact_scale).abs()
            } else {
                0.0
            };
            scale / 2.0 + offset_error + levels * scale_error + float_slop
        }
        _ => {
            unreachable!("codebook and ecsq grids have their own checks")
        }
    }
}

fn check_round_trip(
    shape: &[usize],
    params: &CodecParams,
    values: &[f32],
) -> Result<(), TestCaseError> {
    let view = View::new(shape, params);
    let encoded = match encode(values, shape, params) {
        Ok(encoded) => encoded,
        Err(CodecError::KeptTokenOverflow { value }) => {
            prop_assert!(f16::from_f32(value).is_infinite());
            return Ok(());
        }
        Err(CodecError::RotationOverflow) => {
            prop_assert!(params.rotation_seed.is_some());
            prop_assert!(values.iter().any(|x| x.abs() > 1.0e36));
            return Ok(());
        }
        Err(other) => return Err(TestCaseError::fail(format!("encode failed: {other}"))),
    };
    let payload = &encoded.payload;
    let decoded = decode(payload, shape, params, &encoded.layout)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(decoded.len(), values.len());
    prop_assert!(decoded.iter().all(|x| x.is_finite()));
    prop_assert_eq!(
        payload_len(shape, params, &encoded.layout),
        Ok(payload.len())
    );

    let mut sections = read_sections(payload, &view, params, &encoded.layout);
    let n = view.quantized_count();
    let kept_count = n - (params.sparsity * n as f64).floor() as usize;
    let has_bitmap = params.sparsity > 0.0 && encoded.layout.sparse_form == SparseForm::Bitmap;
    if has_bitmap {
        prop_assert_eq!(sections.stored.iter().filter(|&&s| s).count(), kept_count);
    } else if params.sparsity > 0.0 {
        prop_assert_eq!(params.grid, Grid::Symmetric);
        mark_dense_drops(&mut sections, &view, params, values, payload)?;
    }
    let coded_count = if has_bitmap { kept_count } else { n };
    prop_assert_eq!(
        sections.code_bytes,
        (coded_count * usize::from(params.bits)).div_ceil(8)
    );

    // Kept tokens: exactly their f16 values, in the payload and decoded.
    let kept_in = view.kept(values);
    let kept_out = view.kept(&decoded);
    for ((&x, &stored), &out) in kept_in.iter().zip(&sections.kept).zip(&kept_out) {
        prop_assert_eq!(stored.to_bits(), f16::from_f32(x).to_f32().to_bits());
        prop_assert_eq!(out.to_bits(), stored.to_bits());
    }

    let quantized = Quantized {
        view: &view,
        params,
        sections: &sections,
        middle_in: view.middle(values),
        middle_out: view.middle(&decoded),
    };
    if params.rotation_seed.is_some() {
        check_rotated(&quantized)
    } else {
        check_per_value(&quantized)
    }
}

/// Dense form: every middle value has a code, a dropped one the symmetric
/// code of 0 (`2^(bits-1)`). Without rotation the dropped values are the
/// first `floor(s n)` by (|x|, index), which must hold that code and are
/// marked not stored. With rotation the ranking is over rotated values this
/// test does not compute, so every value holding the zero code is marked
/// (its error is then bounded by the vector norm) and there must be at least
/// `floor(s n)` of them.
fn mark_dense_drops(
    sections: &mut Sections,
    view: &View,
    params: &CodecParams,
    values: &[f32],
    payload: &[u8],
) -> Result<(), TestCaseError> {
    let n = view.quantized_count();
    let bits = usize::from(params.bits);
    let codes_start = payload.len() - sections.code_bytes;
    let zero_code = 1u32 << (bits - 1);
    let code_at = |position: usize| {
        (0..bits)
            .map(|bit| {
                let stream_bit = position * bits + bit;
                u32::from(payload[codes_start + stream_bit / 8] >> (stream_bit % 8) & 1) << bit
            })
            .sum::<u32>()
    };
    let holds_zero: Vec<bool> = (0..n)
        .map(|i| code_at(view.group_position(i, params.axis)) == zero_code)
        .collect();
    let dropped = (params.sparsity * n as f64).floor() as usize;
    if params.rotation_seed.is_some() {
        prop_assert!(holds_zero.iter().filter(|&&zero| zero).count() >= dropped);
        sections.stored = holds_zero.iter().map(|&zero| !zero).collect();
        return Ok(());
    }
    let middle = view.middle(values);
    let mut ranking: Vec<usize> = (0..n).collect();
    ranking.sort_by(|&a, &b| middle[a].abs().total_cmp(&middle[b].abs()).then(a.cmp(&b)));
    for &i in &ranking[..dropped] {
        prop_assert!(holds_zero[i], "dropped value {} holds the zero code", i);
        sections.stored[i] = false;
    }
    Ok(())
}

/// The quantized part of one round trip, with its payload read back.
struct Quantized<'a> {
    view: &'a View,
    params: &'a CodecParams,
    sections: &'a Sections,
    middle_in: Vec<f32>,
    middle_out: Vec<f32>,
}

impl Quantized<'_> {
    fn group_of(&self, index: usize) -> usize {
        self.view
            .group_of(index, self.params.axis, self.params.group_size)
    }
}

fn check_per_value(quantized: &Quantized) -> Result<(), TestCaseError> {
    let Quantized {
        params,
        sections,
        middle_in,
        middle_out,
        ..
    } = quantized;
    let group_of = |i: usize| quantized.group_of(i);
    let groups = sections.scales.len();
    let mut exact = vec![(f64::INFINITY, f64::NEG_INFINITY); groups];
    for (i, &x) in middle_in
        .iter()
        .enumerate()
        .filter(|&(i, _)| sections.stored[i])
    {
        let (min, max) = &mut exact[group_of(i)];
        *min = min.min(f64::from(x));
        *max = max.max(f64::from(x));
    }
    let largest_dropped = (0..middle_in.len())
        .filter(|&i| !sections.stored[i])
        .map(|i| middle_in[i].abs())
        .fold(0.0, f32::max);
    let smallest_stored = (0..middle_in.len())
        .filter(|&i| sections.stored[i])
        .map(|i| middle_in[i].abs())
        .fold(f32::INFINITY, f32::min);
    prop_assert!(
        largest_dropped <= smallest_stored,
        "dropped the smallest magnitudes"
    );
    for (i, (&x, &y)) in middle_in.iter().zip(middle_out).enumerate() {
        if !sections.stored[i] {
            prop_assert_eq!(y, 0.0, "dropped value {} decodes to 0", i);
            continue;
        }
        let group = group_of(i);
        let limit = bound(
            params,
            sections.scales[group],
            sections.offsets[group],
            exact[group],
            f64::from(x).abs(),
        );
        let error = (f64::from(x) - f64::from(y)).abs();
        prop_assert!(
            error <= limit,
            "value {} of group {}: {} -> {}, error {} > {}",
            i,
            group,
            x,
            y,
            error,
            limit
        );
    }
    Ok(())
}

/// With rotation the per-value bound holds in the rotated domain, so check
/// its image: each head vector's L2 error is at most the L2 norm of its
/// values' bounds (the rotation is orthonormal), plus float rounding.
fn check_rotated(quantized: &Quantized) -> Result<(), TestCaseError> {
    let Quantized {
        view,
        params,
        sections,
        middle_in,
        middle_out,
    } = quantized;
    let group_of = |i: usize| quantized.group_of(i);
    let dim = view.head_dim.max(1);
    for (vector, (x, y)) in middle_in
        .chunks(dim)
        .zip(middle_out.chunks(dim))
        .enumerate()
    {
        let norm = x.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt();
        let error = x
            .iter()
            .zip(y)
            .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
            .sum::<f64>()
            .sqrt();
        let mut budget = 0.0;
        for i in vector * dim..(vector + 1) * dim {
            let group = group_of(i);
            let (scale, offset) = (sections.scales[group], sections.offsets[group]);
            let per_value = if !sections.stored[i] {
                // A dropped rotated value is at most as large as any stored one
                // of its tensor; bound it by the vector norm.
                norm
            } else {
                match params.grid {
                    Grid::Symmetric => scale / 2.0,
                    // Offset and scale rounding, bounded by their dtype's precision.
                    Grid::Asymmetric => {
                        let levels = f64::from((1u32 << params.bits) - 1);
                        scale / 2.0
                            + offset.abs() * 2.0f64.powi(-11)
                            + 2.0f64.powi(-25)
                            + levels * scale * 2.0f64.powi(-10)
                    }
                    _ => {
                        unreachable!("codebook and ecsq grids have their own checks")
                    }
                }
            };
            budget += per_value * per_value;
        }
        let limit = budget.sqrt() * (1.0 + 1.0e-5) + norm * 1.0e-5 + 1.0e-30;
        prop_assert!(
            error <= limit,
            "head vector {}: L2 error {} > {}",
            vector,
            error,
            limit
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 600, ..ProptestConfig::default() })]

    #[test]
    fn every_value_is_within_its_group_bound((shape, params, values) in case()) {
        check_round_trip(&shape, &params, &values)?;
    }

    /// On the symmetric grid dropping values never grows the payload: the
    /// dense form is exactly the `sparsity = 0` payload's size.
    #[test]
    fn symmetric_sparsity_never_grows_the_payload((shape, params, values) in case()) {
        let symmetric = CodecParams { grid: Grid::Symmetric, ..params };
        let without = CodecParams { sparsity: 0.0, ..symmetric.clone() };
        if let (Ok(sparse), Ok(dense)) = (encode(&values, &shape, &symmetric), encode(&values, &shape, &without)) {
            prop_assert!(sparse.payload.len() <= dense.payload.len(), "{} > {}", sparse.payload.len(), dense.payload.len());
            if sparse.layout.sparse_form == SparseForm::Dense && sparse.layout.scale_dtype == dense.layout.scale_dtype {
                prop_assert_eq!(sparse.payload.len(), dense.payload.len());
            }
        }
    }

    /// `-fit mse` only moves scales and offsets: the same payload size, and
    /// a total squared error no larger than min/max's.
    #[test]
    fn mse_fit_never_does_worse_than_min_max((shape, params, values) in case()) {
        let fitted = CodecParams { fit: Fit::Mse, ..params.clone() };
        if let (Ok(min_max), Ok(mse)) = (encode(&values, &shape, &params), encode(&values, &shape, &fitted)) {
            if min_max.layout.scale_dtype == mse.layout.scale_dtype {
                prop_assert_eq!(min_max.payload.len(), mse.payload.len());
            }
            let squared_error = |encoded: &kvformat::codec::Encoded, params: &CodecParams| -> f64 {
                let restored = decode(&encoded.payload, &shape, params, &encoded.layout).unwrap();
                restored.iter().zip(&values).map(|(&r, &v)| (f64::from(r) - f64::from(v)).powi(2)).sum()
            };
            let (min_max_error, mse_error) = (squared_error(&min_max, &params), squared_error(&mse, &fitted));
            // The fit judges in f64; decoding (and rotating back) rounds
            // each value to f32, an error of order f32::EPSILON·|x|, and
            // among subnormals of order their spacing, 2^-149.
            let energy: f64 = values.iter().map(|&v| f64::from(v).powi(2)).sum();
            let subnormal_rounding = values.len() as f64 * 2f64.powi(-149).powi(2);
            prop_assert!(
                mse_error <= min_max_error * (1.0 + 1e-6) + 1e-12 * energy + subnormal_rounding,
                "mse fit {} > min/max {}", mse_error, min_max_error
            );
        }
    }

    /// Outliers change only the values they keep, each to its f16, and so
    /// the error by at most those values' f16 rounding; the payload has the
    /// documented length.
    #[test]
    fn outliers_keep_values_as_f16_and_touch_nothing_else(
        (shape, params, values) in case(),
        fraction in 0.0f64..0.3,
    ) {
        let without = CodecParams { sparsity: 0.0, ..params };
        let with = CodecParams { outliers: fraction, ..without.clone() };
        match (encode(&values, &shape, &without), encode(&values, &shape, &with)) {
            (Ok(plain), Ok(kept)) => {
                prop_assert_eq!(kept.payload.len(), payload_len(&shape, &with, &kept.layout).unwrap());
                let plain_values = decode(&plain.payload, &shape, &without, &plain.layout).unwrap();
                let kept_values = decode(&kept.payload, &shape, &with, &kept.layout).unwrap();
                let squared = |restored: &[f32]| -> f64 {
                    restored.iter().zip(&values).map(|(&r, &v)| (f64::from(r) - f64::from(v)).powi(2)).sum()
                };
                let f16_rounding: f64 = values
                    .iter()
                    .map(|&v| (f64::from(v) - f64::from(f16::from_f32(v).to_f32())).powi(2))
                    .filter(|e| e.is_finite())
                    .sum();
                let energy: f64 = values.iter().map(|&v| f64::from(v).powi(2)).sum();
                prop_assert!(squared(&kept_values) <= squared(&plain_values) * (1.0 + 1e-6) + f16_rounding + 1e-12 * energy);
                if without.rotation_seed.is_none() {
                    let changed = plain_values.iter().zip(&kept_values).zip(&values)
                        .filter(|((p, k), _)| p.to_bits() != k.to_bits())
                        .inspect(|((_, &k), &v)| assert_eq!(k, f16::from_f32(v).to_f32()))
                        .count();
                    prop_assert!(changed <= outlier_count(&shape, &with));
                }
            }
            (Ok(_), Err(CodecError::OutlierOverflow { .. })) => {}
            (Err(_), _) => {}
            (Ok(_), Err(error)) => prop_assert!(false, "{}", error),
        }
    }

    #[test]
    fn decode_never_panics_on_arbitrary_payloads(
        (shape, params, _values) in case(),
        payload in prop::collection::vec(any::<u8>(), 0..600),
        f32_scales in any::<bool>(),
        dense in any::<bool>(),
    ) {
        let layout = Layout {
            scale_dtype: if f32_scales { ScaleDtype::F32 } else { ScaleDtype::F16 },
            sparse_form: if dense { SparseForm::Dense } else { SparseForm::Bitmap },
            coded_bytes: None,
            coder: None,
        };
        if let Ok(values) = decode(&payload, &shape, &params, &layout) {
            prop_assert_eq!(values.len(), shape.iter().product::<usize>());
        }
    }

    #[test]
    fn decode_never_panics_on_extreme_shapes(
        shape in prop::collection::vec(
            prop_oneof![0usize..5, Just(1usize << 20), Just(1usize << 33), Just(usize::MAX / 3)],
            0..6,
        ),
        params in params_for(&[1, 1, 1, 64]),
        payload in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let layout = Layout {
            scale_dtype: ScaleDtype::F16,
            sparse_form: SparseForm::Bitmap,
            coded_bytes: None,
            coder: None,
        };
        if let Ok(values) = decode(&payload, &shape, &params, &layout) {
            prop_assert_eq!(values.len(), shape.iter().product::<usize>());
        }
    }

    /// decode_into gives decode's values whatever the buffer held before.
    #[test]
    fn decode_into_overwrites_a_reused_buffer((shape, params, values) in case()) {
        if let Ok(encoded) = encode(&values, &shape, &params) {
            let expected = decode(&encoded.payload, &shape, &params, &encoded.layout).unwrap();
            let mut reused = vec![f32::NAN; values.len()];
            decode_into(&encoded.payload, &shape, &params, &encoded.layout, &mut reused).unwrap();
            prop_assert_eq!(
                reused.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                expected.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
            let mut wrong = vec![0.0; values.len() + 1];
            prop_assert_eq!(
                decode_into(&encoded.payload, &shape, &params, &encoded.layout, &mut wrong),
                Err(CodecError::ValueCount { expected: values.len(), actual: values.len() + 1 })
            );
        }
    }

    #[test]
    fn truncated_or_extended_payloads_are_rejected((shape, params, values) in case(), cut in 1usize..8, extra in 1usize..8) {
        if let Ok(encoded) = encode(&values, &shape, &params) {
            let len = encoded.payload.len();
            let short = &encoded.payload[..len.saturating_sub(cut)];
            if short.len() < len {
                prop_assert_eq!(
                    decode(short, &shape, &params, &encoded.layout),
                    Err(CodecError::PayloadSize { expected: len, actual: short.len() })
                );
            }
            let mut long = encoded.payload.clone();
            long.extend(std::iter::repeat_n(0u8, extra));
            prop_assert_eq!(
                decode(&long, &shape, &params, &encoded.layout),
                Err(CodecError::PayloadSize { expected: len, actual: len + extra })
            );
        }
    }
}

#[test]
fn decode_rejects_shapes_whose_size_overflows_before_allocating() {
    let params = CodecParams::adr002(64);
    let layout = Layout {
        scale_dtype: ScaleDtype::F16,
        sparse_form: SparseForm::Dense,
        coded_bytes: None,
        coder: None,
    };
    for shape in [vec![usize::MAX, 2], vec![1 << 40, 1 << 30], vec![1 << 62]] {
        assert_eq!(
            decode(&[0; 16], &shape, &params, &layout),
            Err(CodecError::ShapeOverflow),
            "{shape:?}"
        );
    }
    // Huge but representable: the payload length check fails first.
    assert!(matches!(
        decode(&[0; 16], &[1 << 40], &params, &layout),
        Err(CodecError::PayloadSize { .. })
    ));
}

/// Payload sizes per method, written out by hand for one [1, 2, 8, 16] tensor
/// (256 values).
#[test]
fn payload_sizes_per_method() {
    let shape = [1, 2, 8, 16];
    let values: Vec<f32> = (0..256)
        .map(|i| ((i * 7919) % 256) as f32 / 128.0 - 1.0)
        .collect();
    let base = CodecParams::adr002(16);
    let cases = [
        // 16 groups x 2 B scales + 256 x 4 bits.
        (base.clone(), 16 * 2 + 128),
        (
            CodecParams {
                bits: 3,
                ..base.clone()
            },
            32 + 96,
        ),
        (
            CodecParams {
                bits: 2,
                ..base.clone()
            },
            32 + 64,
        ),
        (
            CodecParams {
                bits: 8,
                ..base.clone()
            },
            32 + 256,
        ),
        // Offsets double the per-group bytes.
        (
            CodecParams {
                grid: Grid::Asymmetric,
                ..base.clone()
            },
            64 + 128,
        ),
        // Channel groups: 2 heads x 16 channels x ceil(8/4) runs = 64 groups.
        (
            CodecParams {
                axis: Axis::Channel,
                group_size: 4,
                ..base.clone()
            },
            128 + 128,
        ),
        (
            CodecParams {
                axis: Axis::Token,
                group_size: 5,
                ..base.clone()
            },
            2 * 8 * 4 * 2 + 128,
        ),
        (
            CodecParams {
                rotation_seed: Some(3),
                ..base.clone()
            },
            32 + 128,
        ),
        // 1 sink + 2 recent tokens of 8: 2 x 3 x 16 = 96 FP16 values, 160 quantized (10 groups).
        (
            CodecParams {
                sink_tokens: 1,
                recent_tokens: 2,
                ..base.clone()
            },
            10 * 2 + 96 * 2 + 80,
        ),
        // floor(0.5 x 256) = 128 dropped: 32-byte bitmap, 128 codes.
        (
            CodecParams {
                sparsity: 0.5,
                ..base.clone()
            },
            32 + 32 + 64,
        ),
        // floor(0.1 x 256) = 25 dropped: bitmap 32 + ceil(231 / 2) = 148 > 128
        // code bytes, so the dense form, as large as without sparsity.
        (
            CodecParams {
                sparsity: 0.1,
                ..base.clone()
            },
            32 + 128,
        ),
        // 3 bits, 0.3 < 1/3: bitmap 32 + ceil(180 x 3 / 8) = 100 > 96.
        (
            CodecParams {
                bits: 3,
                sparsity: 0.3,
                ..base.clone()
            },
            32 + 96,
        ),
        // 8 bits, 0.2 > 1/8: 51 dropped, bitmap 32 + 205 < 256.
        (
            CodecParams {
                bits: 8,
                sparsity: 0.2,
                ..base.clone()
            },
            32 + 32 + 205,
        ),
        // The asymmetric grid has no exact 0 code: always the bitmap, here
        // 32 + ceil(231 / 2) bytes against 128 without sparsity.
        (
            CodecParams {
                grid: Grid::Asymmetric,
                sparsity: 0.1,
                ..base.clone()
            },
            64 + 32 + 116,
        ),
    ];
    for (params, expected) in cases {
        let encoded = encode(&values, &shape, &params).unwrap();
        assert_eq!(encoded.layout.scale_dtype, ScaleDtype::F16);
        assert_eq!(encoded.payload.len(), expected, "{params:?}");
    }
}

/// Codebook grids (`lloyd`, `kmeans`): a value is `level[code] · scale`,
/// the scale the group's RMS (docs/format.md, "Codebook grids").
mod codebook {
    use super::*;
    use kvformat::codec::gaussian_levels;

    /// Values of sane magnitude (scales stay normal f16), with zeros and
    /// repeated values.
    fn sane_values(count: usize) -> impl Strategy<Value = Vec<f32>> {
        (
            prop::sample::select(vec![1.0f32, 1.0e-2, 3.0e2]),
            prop::collection::vec((-1.0f32..1.0, 0u8..8), count),
        )
            .prop_map(|(magnitude, raw)| {
                raw.iter()
                    .map(|&(x, kind)| match kind {
                        0 => 0.0,
                        1 => 0.5 * magnitude,
                        _ => x * magnitude,
                    })
                    .collect()
            })
    }

    /// A row-major tensor whose groups are contiguous runs: flat, or per
    /// token of a 4-D tensor; `(shape, params, values, run length)`.
    fn case() -> impl Strategy<Value = (Vec<usize>, CodecParams, Vec<f32>, usize)> {
        (
            prop::sample::select(vec![Grid::Lloyd, Grid::Kmeans]),
            2u8..=4,
            prop::sample::select(vec![1usize, 3, 8, 16, 64]),
            1usize..4,
            1usize..6,
            prop::sample::select(vec![1usize, 5, 8, 32]),
            any::<bool>(),
        )
            .prop_flat_map(
                |(grid, bits, group_size, heads, seq, head_dim, per_token)| {
                    let shape = vec![1, heads, seq, head_dim];
                    let count = heads * seq * head_dim;
                    let (axis, run) = if per_token {
                        (Axis::Token, head_dim)
                    } else {
                        (Axis::Flat, count)
                    };
                    let params = CodecParams {
                        bits,
                        grid,
                        axis,
                        ..CodecParams::adr002(group_size)
                    };
                    (Just(shape), Just(params), sane_values(count), Just(run))
                },
            )
    }

    fn squared_error(values: &[f32], restored: &[f32]) -> f64 {
        values
            .iter()
            .zip(restored)
            .map(|(&v, &r)| (f64::from(v) - f64::from(r)).powi(2))
            .sum()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

        /// Lloyd: each value errs at most half the widest gap between
        /// levels, or, beyond the outer level, `sqrt(n) - l_max` (a value of
        /// a group of n cannot exceed sqrt(n) RMS), times its group's scale.
        #[test]
        fn lloyd_values_are_within_their_group_bound((shape, params, values, run) in case()) {
            let params = CodecParams { grid: Grid::Lloyd, ..params };
            let encoded = encode(&values, &shape, &params).unwrap();
            prop_assert_eq!(encoded.payload.len(), payload_len(&shape, &params, &encoded.layout).unwrap());
            let restored = decode(&encoded.payload, &shape, &params, &encoded.layout).unwrap();
            let levels = gaussian_levels(params.bits);
            let half_gap = levels.windows(2).map(|p| f64::from(p[1] - p[0]) / 2.0).fold(0.0, f64::max);
            let outer = f64::from(levels[levels.len() - 1]);
            for (run_index, (values, restored)) in values.chunks(run).zip(restored.chunks(run)).enumerate() {
                for (group, (values, restored)) in values.chunks(params.group_size).zip(restored.chunks(params.group_size)).enumerate() {
                    let n = values.len() as f64;
                    let rms = (values.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / n).sqrt();
                    // The stored scale is the RMS rounded to f16 (or 2^-14 for a zero group).
                    let scale = (rms * (1.0 + 1.0 / 1024.0)).max(6.2e-5);
                    let bound = scale * half_gap.max(n.sqrt() - outer) + 1e-6 * rms;
                    for (&x, &r) in values.iter().zip(restored) {
                        let error = (f64::from(x) - f64::from(r)).abs();
                        prop_assert!(error <= bound, "run {} group {}: |{} - {}| = {} > {}", run_index, group, x, r, error, bound);
                    }
                }
            }
        }

        /// k-means starts from the Gaussian levels and Lloyd iterations never
        /// raise the error: fitted levels err no more than Lloyd's, up to
        /// their rounding to FP16; the payload is longer by the levels only.
        #[test]
        fn kmeans_never_does_worse_than_the_gaussian_levels((shape, params, values, _run) in case()) {
            let lloyd = CodecParams { grid: Grid::Lloyd, ..params.clone() };
            let kmeans = CodecParams { grid: Grid::Kmeans, ..params };
            let (fixed, fitted) = (encode(&values, &shape, &lloyd).unwrap(), encode(&values, &shape, &kmeans).unwrap());
            if fixed.layout.scale_dtype == fitted.layout.scale_dtype {
                prop_assert_eq!(fitted.payload.len(), fixed.payload.len() + (2 << kmeans.bits));
            }
            let fixed_error = squared_error(&values, &decode(&fixed.payload, &shape, &lloyd, &fixed.layout).unwrap());
            let fitted_error = squared_error(&values, &decode(&fitted.payload, &shape, &kmeans, &fitted.layout).unwrap());
            let energy: f64 = values.iter().map(|&v| f64::from(v).powi(2)).sum();
            prop_assert!(
                fitted_error <= fixed_error * 1.01 + 1e-3 * energy / 1024.0,
                "kmeans {} > lloyd {}", fitted_error, fixed_error
            );
        }

        /// `-fit mse` on a codebook keeps a refined scale only when it errs less.
        #[test]
        fn codebook_mse_fit_never_does_worse((shape, params, values, _run) in case()) {
            let fitted = CodecParams { fit: Fit::Mse, ..params.clone() };
            let plain = encode(&values, &shape, &params).unwrap();
            let refined = encode(&values, &shape, &fitted).unwrap();
            let plain_error = squared_error(&values, &decode(&plain.payload, &shape, &params, &plain.layout).unwrap());
            let refined_error = squared_error(&values, &decode(&refined.payload, &shape, &fitted, &refined.layout).unwrap());
            let energy: f64 = values.iter().map(|&v| f64::from(v).powi(2)).sum();
            prop_assert!(refined_error <= plain_error * (1.0 + 1e-6) + 1e-12 * energy, "{} > {}", refined_error, plain_error);
        }

        /// Codebook payloads compose with sparsity, kept tokens, rotation and
        /// outliers, round trip through their documented length, and arbitrary
        /// bytes decode to values or an error, never a panic.
        #[test]
        fn codebook_options_compose_and_hostile_payloads_never_panic(
            (shape, params, values, _run) in case(),
            sparsity in prop_oneof![Just(0.0f64), 0.0f64..0.9],
            sinks in 0usize..3,
            rotate in any::<bool>(),
            outliers in prop_oneof![Just(0.0f64), 0.0f64..0.2],
            payload in prop::collection::vec(any::<u8>(), 0..400),
        ) {
            let params = CodecParams {
                sparsity,
                outliers: if sparsity > 0.0 { 0.0 } else { outliers },
                sink_tokens: sinks,
                rotation_seed: (rotate && shape[3].is_power_of_two()).then_some(7),
                ..params
            };
            let encoded = encode(&values, &shape, &params).unwrap();
            prop_assert_eq!(encoded.payload.len(), payload_len(&shape, &params, &encoded.layout).unwrap());
            if sparsity > 0.0 {
                prop_assert_eq!(encoded.layout.sparse_form, SparseForm::Bitmap);
            }
            let restored = decode(&encoded.payload, &shape, &params, &encoded.layout).unwrap();
            prop_assert!(restored.iter().all(|x| x.is_finite()));
            if let Ok(decoded) = decode(&payload, &shape, &params, &encoded.layout) {
                prop_assert_eq!(decoded.len(), values.len());
            }
        }
    }

    /// On Gaussian values in large groups (the RMS is then σ) the Lloyd
    /// levels reach the Gaussian MSE/σ² of the shipped table: 0.1175,
    /// 0.0345, 0.0095 at 2, 3, 4 bits, below the best uniform grid's.
    #[test]
    fn lloyd_reaches_the_gaussian_mse_on_gaussian_values() {
        let mut rng = kvformat::codec::SplitMix64(42);
        let mut uniform = move || ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let values: Vec<f32> = (0..1 << 17)
            .map(|_| {
                ((-2.0 * uniform().ln()).sqrt() * (std::f64::consts::TAU * uniform()).cos()) as f32
            })
            .collect();
        let energy: f64 = values.iter().map(|&v| f64::from(v).powi(2)).sum();
        for (bits, expected) in [(2u8, 0.1175), (3, 0.0345), (4, 0.0095)] {
            let params = CodecParams {
                bits,
                grid: Grid::Lloyd,
                ..CodecParams::adr002(1024)
            };
            let encoded = encode(&values, &[values.len()], &params).unwrap();
            let restored =
                decode(&encoded.payload, &[values.len()], &params, &encoded.layout).unwrap();
            let relative = squared_error(&values, &restored) / energy;
            assert!(
                (relative - expected).abs() < 0.04 * expected,
                "{bits} bits: MSE/σ² {relative}, expected {expected}"
            );
        }
    }
}

/// The entropy-coded grid (`-grid ecsq`) over every shape, axis, group
/// size, kept-token count and magnitude: every value within half a step of
/// its original (1.5 beside f32's limits) where nothing is rotated, kept
/// tokens as FP16, and arbitrary payloads decoding to values or errors.
mod ecsq {
    use super::*;

    fn params_for(shape: &[usize]) -> impl Strategy<Value = CodecParams> {
        let four_d = shape.len() == 4;
        let axes = if four_d {
            vec![Axis::Flat, Axis::Token, Axis::Channel]
        } else {
            vec![Axis::Flat]
        };
        (
            prop::sample::select(vec![2u8, 3, 4, 8]),
            prop::option::of(0.5f64..16.0),
            prop::sample::select(axes),
            prop::sample::select(vec![1usize, 3, 16, 1024]),
            0usize..3,
        )
            .prop_map(move |(bits, rate, axis, group_size, sink)| CodecParams {
                bits,
                grid: Grid::Ecsq,
                axis,
                rate,
                sink_tokens: if four_d { sink } else { 0 },
                ..CodecParams::adr002(group_size)
            })
    }

    fn case() -> impl Strategy<Value = (Vec<usize>, CodecParams, Vec<f32>)> {
        shapes().prop_flat_map(|shape| {
            let count = shape.iter().product();
            (Just(shape.clone()), params_for(&shape), values(count))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

        #[test]
        fn ecsq_values_stay_within_a_step(
            (shape, params, values) in case(),
        ) {
            let encoded = match encode(&values, &shape, &params) {
                Ok(encoded) => encoded,
                Err(CodecError::KeptTokenOverflow { value }) => {
                    prop_assert!(f16::from_f32(value).is_infinite());
                    return Ok(());
                }
                Err(error) => return Err(TestCaseError::fail(format!("{error}"))),
            };
            let coded = encoded.layout.coded_bytes.expect("ecsq stores its codes' length");
            let view = View::new(&shape, &params);
            let kept_values = view.heads * view.seq * view.head_dim - view.quantized_count();
            let step_at = encoded.payload.len() - coded - 2 * kept_values - 4;
            let step = f32::from_le_bytes(encoded.payload[step_at..step_at + 4].try_into().unwrap());
            prop_assert!(step.is_normal() && step > 0.0);
            let decoded = decode(&encoded.payload, &shape, &params, &encoded.layout).unwrap();
            prop_assert_eq!(decoded.len(), values.len());
            for (i, (&x, &y)) in values.iter().zip(&decoded).enumerate() {
                prop_assert!(y.is_finite());
                let token = (i / view.head_dim.max(1)) % view.seq.max(1);
                if view.is_kept_token(token) {
                    prop_assert_eq!(y, f16::from_f32(x).to_f32());
                } else {
                    let error = (f64::from(x) - f64::from(y)).abs();
                    let slop = f64::from(x).abs() * 1.0e-6 + 1.0e-37;
                    // Beside f32's limits the nearest level may not exist:
                    // the one before it is within 1.5 steps.
                    let steps = if f64::from(y).abs() + 2.0 * f64::from(step) > f64::from(f32::MAX) {
                        1.5
                    } else {
                        0.5
                    };
                    prop_assert!(
                        error <= f64::from(step) * steps * 1.000_001 + slop,
                        "value {} = {} decoded {} with step {}", i, x, y, step
                    );
                }
            }
            let rotated = CodecParams { rotation_seed: Some(3), ..params };
            if shape.len() == 4 && shape[3].is_power_of_two() {
                if let Ok(encoded) = encode(&values, &shape, &rotated) {
                    let decoded = decode(&encoded.payload, &shape, &rotated, &encoded.layout).unwrap();
                    prop_assert_eq!(decoded.len(), values.len());
                }
            }
        }

        #[test]
        fn ecsq_decode_never_panics_on_arbitrary_payloads(
            (shape, params, _values) in case(),
            payload in prop::collection::vec(any::<u8>(), 0..400),
            coded in 0usize..400,
            f32_offsets in any::<bool>(),
            rans in any::<bool>(),
        ) {
            let layout = Layout {
                scale_dtype: if f32_offsets { ScaleDtype::F32 } else { ScaleDtype::F16 },
                sparse_form: SparseForm::Dense,
                coded_bytes: Some(coded),
                coder: rans.then_some(EntropyCoder::Rans),
            };
            if let Ok(values) = decode(&payload, &shape, &params, &layout) {
                prop_assert_eq!(values.len(), shape.iter().product::<usize>());
            }
        }
    }
}
