//! Two CPU kernels the forward pass spends real time in, fused and vectorized
//! where candle's generic ops are not: the causal softmax of attention scores
//! and SwiGLU's `silu(gate) * up`.
//!
//! candle computes `exp` one scalar libm call at a time and needs a separate
//! mask tensor, a broadcast add and a temporary per step; at a 512-token
//! prefill that was about 15% of the forward pass. These kernels read their
//! input once, skip the masked part of each score row outright, and use an
//! `exp` that the compiler vectorizes (AVX-512 or AVX2 where the CPU has it,
//! chosen at run time). Both are checked against candle's own ops in tests.
//! On the CPU they are f32 kernels. With the `cuda` feature, their CUDA twins
//! in `kernels.cu` run on the GPU in every dtype (f32 arithmetic inside): one
//! pass each where candle's ops took about eight kernels (casts, a mask built
//! per call, a broadcast `where`, the softmax), the cost that grows with the
//! context. On an H200 that took a 2048-token bf16 prefill of a TinyLlama
//! shape from 12,212 to 89,143 tokens/s (docs/benchmarks.md). Other devices
//! and dtypes take the same math in candle's ops, with the softmax in f32.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// Calls the widest copy of a kernel loop that this CPU runs.
macro_rules! multiversion {
    ($kernel:ident($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has the features this copy is compiled for.
                unsafe { wide::avx512::$kernel($($arg),*) }
            } else if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: as above.
                unsafe { wide::avx2::$kernel($($arg),*) }
            } else {
                $kernel($($arg),*)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $kernel($($arg),*)
        }
    }};
}

/// Values per rayon task (whole rows): enough work that scheduling is noise.
const MIN_VALUES_PER_TASK: usize = 16 * 1024;

/// Softmax over the last dimension of `[.., rows, keys]` attention scores where
/// row `r` (counted within the last two dimensions) may see keys
/// `0..=first_key + r` only, and of those the last `window` if one is given
/// (a sliding-window layer); the rest of the row comes out 0, as if masked
/// with -inf. With `first_key = keys - 1` every row sees every key (a single
/// new token attending to its whole past).
/// The result has the scores' dtype; the softmax itself runs in f32.
pub fn causal_softmax(scores: &Tensor, first_key: usize, window: Option<usize>) -> Result<Tensor> {
    if window == Some(0) {
        candle_core::bail!("causal-softmax: a window of 0 keys");
    }
    if is_cpu_f32(scores) {
        return scores.apply_op1_no_bwd(&CausalSoftmax { first_key, window });
    }
    // The CUDA kernel has no window: sliding layers take candle's ops below.
    #[cfg(feature = "cuda")]
    if scores.device().is_cuda() && window.is_none() {
        return scores
            .contiguous()?
            .apply_op1_no_bwd(&CausalSoftmax { first_key, window });
    }
    let (rows, keys) = softmax_dims(scores.dims(), first_key)?;
    let device = scores.device();
    // Row r sees key j when j <= first_key + r (and j > first_key + r - window).
    let last_visible =
        Tensor::arange(first_key as u32, (first_key + rows) as u32, device)?.reshape((rows, 1))?;
    let key_index = Tensor::arange(0u32, keys as u32, device)?.reshape((1, keys))?;
    let mut visible = key_index.broadcast_le(&last_visible)?;
    if let Some(window) = window {
        let first_visible: Vec<u32> = (first_key..first_key + rows)
            .map(|last| (last + 1).saturating_sub(window) as u32)
            .collect();
        let first_visible = Tensor::from_vec(first_visible, (rows, 1), device)?;
        visible = (visible * key_index.broadcast_ge(&first_visible)?)?;
    }
    let visible = visible.broadcast_as(scores.shape())?;
    let masked = Tensor::new(f32::NEG_INFINITY, device)?.broadcast_as(scores.shape())?;
    let probabilities = candle_nn::ops::softmax_last_dim(
        &visible.where_cond(&scores.to_dtype(DType::F32)?, &masked)?,
    )?;
    probabilities.to_dtype(scores.dtype())
}

/// `silu(x[.., :n]) * x[.., n..]` for `x: [.., 2n]`: the fused gate and up
/// projections of a SwiGLU MLP in, the down projection's input out.
pub fn swiglu(gate_up: &Tensor) -> Result<Tensor> {
    if is_cpu_f32(gate_up) {
        return gate_up.apply_op1_no_bwd(&SwiGlu);
    }
    #[cfg(feature = "cuda")]
    if gate_up.device().is_cuda() {
        return gate_up.contiguous()?.apply_op1_no_bwd(&SwiGlu);
    }
    let width = gate_up.dim(D::Minus1)?;
    if width % 2 != 0 {
        candle_core::bail!(
            "swiglu needs an even last dimension, got {:?}",
            gate_up.dims()
        );
    }
    let n = width / 2;
    gate_up.narrow(D::Minus1, 0, n)?.silu()? * gate_up.narrow(D::Minus1, n, n)?
}

/// Where the fused kernels apply.
fn is_cpu_f32(tensor: &Tensor) -> bool {
    tensor.device().is_cpu() && tensor.dtype() == DType::F32
}

struct CausalSoftmax {
    first_key: usize,
    window: Option<usize>,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let scores = contiguous_f32(storage, layout, self.name())?;
        let (rows, keys) = softmax_dims(layout.shape().dims(), self.first_key)?;
        let mut probabilities = vec![0f32; scores.len()];
        let rows_per_task = (MIN_VALUES_PER_TASK / keys).max(1);
        probabilities
            .par_chunks_mut(keys * rows_per_task)
            .zip(scores.par_chunks(keys * rows_per_task))
            .enumerate()
            .for_each(|(task, (out, scores))| {
                for (i, (out, scores)) in out.chunks_mut(keys).zip(scores.chunks(keys)).enumerate()
                {
                    let row = (task * rows_per_task + i) % rows;
                    let end = (self.first_key + row + 1).min(keys);
                    let start = self.window.map_or(0, |window| end.saturating_sub(window));
                    softmax_row(&scores[start..end], &mut out[start..end]);
                }
            });
        Ok((CpuStorage::F32(probabilities), layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, keys) = softmax_dims(layout.shape().dims(), self.first_key)?;
        let count = layout.shape().elem_count();
        let config = cuda::LaunchConfig {
            grid_dim: ((count / keys) as u32, 1, 1),
            block_dim: (cuda::SOFTMAX_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let scalars = [rows, keys, self.first_key].map(|n| n as u32);
        let out = cuda::launch(
            storage,
            layout,
            "causal_softmax",
            count,
            config,
            &scalars,
            None,
        )?;
        Ok((out, layout.shape().clone()))
    }
}

/// `(rows, keys)` of `[.., rows, keys]` scores whose first row sees key `first_key`.
fn softmax_dims(dims: &[usize], first_key: usize) -> Result<(usize, usize)> {
    let (rows, keys) = match dims {
        [.., rows, keys] if *keys > 0 => (*rows, *keys),
        _ => candle_core::bail!("causal-softmax needs [.., rows, keys], got {dims:?}"),
    };
    if first_key >= keys {
        candle_core::bail!("causal-softmax: first key {first_key} of {keys}");
    }
    Ok((rows, keys))
}

/// SwiGLU's output dims for `[.., 2 width]`, and `width`.
fn swiglu_dims(dims: &[usize]) -> Result<(Vec<usize>, usize)> {
    let mut out = dims.to_vec();
    match out.last_mut() {
        Some(last) if *last % 2 == 0 && *last > 0 => {
            *last /= 2;
            let width = *last;
            Ok((out, width))
        }
        _ => candle_core::bail!("swiglu needs an even last dimension, got {dims:?}"),
    }
}

struct SwiGlu;

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let gate_up = contiguous_f32(storage, layout, self.name())?;
        let (dims, width) = swiglu_dims(layout.shape().dims())?;
        let mut out = vec![0f32; gate_up.len() / 2];
        let rows_per_task = (MIN_VALUES_PER_TASK / width).max(1);
        out.par_chunks_mut(width * rows_per_task)
            .zip(gate_up.par_chunks(2 * width * rows_per_task))
            .for_each(|(out, gate_up)| {
                for (out, gate_up) in out.chunks_mut(width).zip(gate_up.chunks(2 * width)) {
                    let (gate, up) = gate_up.split_at(width);
                    silu_times(gate, up, out);
                }
            });
        Ok((CpuStorage::F32(out), Shape::from_dims(&dims)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (dims, width) = swiglu_dims(layout.shape().dims())?;
        let count = layout.shape().elem_count() / 2;
        let config = cuda::LaunchConfig::for_num_elems(count as u32);
        let out = cuda::launch(
            storage,
            layout,
            "swiglu",
            count,
            config,
            &[width as u32],
            Some(count as u64),
        )?;
        Ok((out, Shape::from_dims(&dims)))
    }
}

/// Launches `src/model/kernels.cu`'s kernels (PTX built by build.rs).
#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    pub use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, Layout, Result};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));
    /// Threads per row of `causal_softmax` (`SOFTMAX_THREADS` in kernels.cu).
    pub const SOFTMAX_THREADS: u32 = 256;

    /// Runs `{kernel}_{f32,f16,bf16}(input, output, scalars.., tail)` on a
    /// contiguous input; the output has `out_len` values of the input's dtype.
    pub fn launch(
        storage: &CudaStorage,
        layout: &Layout,
        kernel: &str,
        out_len: usize,
        config: LaunchConfig,
        scalars: &[u32],
        tail: Option<u64>,
    ) -> Result<CudaStorage> {
        let device = storage.device();
        let run = |suffix: &str| Call {
            device,
            layout,
            name: format!("{kernel}_{suffix}"),
            out_len,
            config,
            scalars,
            tail,
        };
        let slice = match &storage.slice {
            CudaStorageSlice::F32(input) => CudaStorageSlice::F32(run("f32").on(input)?),
            CudaStorageSlice::F16(input) => CudaStorageSlice::F16(run("f16").on(input)?),
            CudaStorageSlice::BF16(input) => CudaStorageSlice::BF16(run("bf16").on(input)?),
            _ => candle_core::bail!(
                "{kernel} supports f32, f16 and bf16, got {:?}",
                storage.dtype()
            ),
        };
        Ok(CudaStorage {
            slice,
            device: device.clone(),
        })
    }

    struct Call<'a> {
        device: &'a CudaDevice,
        layout: &'a Layout,
        name: String,
        out_len: usize,
        config: LaunchConfig,
        scalars: &'a [u32],
        tail: Option<u64>,
    }

    impl Call<'_> {
        fn on<T: DeviceRepr>(&self, input: &CudaSlice<T>) -> Result<CudaSlice<T>> {
            let Some((start, end)) = self.layout.contiguous_offsets() else {
                candle_core::bail!("{} needs a contiguous input", self.name);
            };
            let input = input.slice(start..end);
            let function =
                self.device
                    .get_or_load_custom_func(&self.name, "kv_validate_kernels", PTX)?;
            // SAFETY: the kernel writes every one of the `out_len` values.
            let out = unsafe { self.device.alloc::<T>(self.out_len)? };
            let mut builder = function.builder();
            builder.arg(&input);
            builder.arg(&out);
            for scalar in self.scalars {
                builder.arg(scalar);
            }
            if let Some(tail) = &self.tail {
                builder.arg(tail);
            }
            // SAFETY: the argument list matches the kernel's signature in kernels.cu.
            unsafe { builder.launch(self.config) }.w()?;
            Ok(out)
        }
    }
}

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(values) = storage else {
        candle_core::bail!("{op} supports f32 only, got {:?}", storage.dtype());
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&values[start..end]),
        None => candle_core::bail!("{op} needs a contiguous input"),
    }
}

/// `out = softmax(scores)` over the visible part of one row.
fn softmax_row(scores: &[f32], out: &mut [f32]) {
    let max = multiversion!(max_of(scores));
    let sum = multiversion!(exp_shifted(scores, max, out));
    let scale = 1.0 / sum;
    out.iter_mut().for_each(|p| *p *= scale);
}

/// `out = silu(gate) * up`.
fn silu_times(gate: &[f32], up: &[f32], out: &mut [f32]) {
    multiversion!(silu_times_body(gate, up, out))
}

/// Lanes of the partial sums and maxima below: one AVX-512 register. Keeping
/// them apart lets the loops vectorize (f32 addition does not reassociate).
const LANES: usize = 16;

/// The largest value (NaN-ignoring, -inf for none).
#[inline(always)]
fn max_of(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &value) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(value);
        }
    }
    tail.iter()
        .chain(&lanes)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

/// `out[i] = exp(scores[i] - max)`; returns the sum of `out`.
#[inline(always)]
fn exp_shifted(scores: &[f32], max: f32, out: &mut [f32]) -> f32 {
    for (out, &score) in out.iter_mut().zip(scores) {
        *out = exp(score - max);
    }
    let mut lanes = [0f32; LANES];
    let chunks = out.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &value) in lanes.iter_mut().zip(chunk) {
            *lane += value;
        }
    }
    tail.iter().chain(&lanes).sum()
}

/// `out[i] = gate[i] * up[i] / (1 + exp(-gate[i]))`.
#[inline(always)]
fn silu_times_body(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((out, &gate), &up) in out.iter_mut().zip(gate).zip(up) {
        *out = gate * up / (1.0 + exp(-gate));
    }
}

/// `e^x` to about 1 ulp, branch-free so that loops over it vectorize:
/// `x = n·ln 2 + r` with `|r| <= ln 2 / 2`, `e^r` by Cephes' `expf`
/// polynomial, `2^n` built in the exponent bits. Inputs are clamped to
/// [-87, 88], where `2^n` stays a normal f32, so the result is never 0 or
/// infinite; NaN stays NaN.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n·LN2_HIGH is exact for the n that occur.
    const LN2_HIGH: f32 = 0.693_359_4;
    const LN2_LOW: f32 = -2.121_944_4e-4;
    // Adding 1.5·2^23 rounds to an integer, which lands in the low bits.
    const ROUND: f32 = 12_582_912.0;
    let clamped = x.clamp(-87.0, 88.0);
    let shifted = clamped * LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = (clamped - n * LN2_HIGH) - n * LN2_LOW;
    let p = 1.987_569_2e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let polynomial = p * r * r + r + 1.0;
    let exponent = (shifted.to_bits() as i32 - ROUND.to_bits() as i32 + 127) << 23;
    let value = polynomial * f32::from_bits(exponent as u32);
    if x.is_nan() {
        x
    } else {
        value
    }
}

/// The kernels' loops compiled again with wider vectors, for CPUs that have
/// them (the binary's baseline, plain x86-64, has 4-lane SSE2).
#[cfg(target_arch = "x86_64")]
mod wide {
    macro_rules! copies {
        ($module:ident, $features:literal) => {
            pub mod $module {
                #[target_feature(enable = $features)]
                pub fn max_of(values: &[f32]) -> f32 {
                    super::super::max_of(values)
                }

                #[target_feature(enable = $features)]
                pub fn exp_shifted(scores: &[f32], max: f32, out: &mut [f32]) -> f32 {
                    super::super::exp_shifted(scores, max, out)
                }

                #[target_feature(enable = $features)]
                pub fn silu_times_body(gate: &[f32], up: &[f32], out: &mut [f32]) {
                    super::super::silu_times_body(gate, up, out)
                }
            }
        };
    }
    copies!(avx512, "avx512f");
    copies!(avx2, "avx2,fma");
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, IndexOp};

    fn random(shape: &[usize], scale: f64) -> Tensor {
        (Tensor::randn(0f32, 1f32, shape, &Device::Cpu).unwrap() * scale).unwrap()
    }

    fn max_abs_difference(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// The reference: candle's softmax over `[.., rows, keys]` scores plus a
    /// mask of -inf where `visible(row, key)` is false.
    fn masked_softmax(scores: &Tensor, visible: impl Fn(usize, usize) -> bool) -> Tensor {
        let dims = scores.dims();
        let (rows, keys) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        let mask: Vec<f32> = (0..rows)
            .flat_map(|r| (0..keys).map(move |k| (r, k)))
            .map(|(r, k)| {
                if visible(r, k) {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (rows, keys), &Device::Cpu).unwrap();
        candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask).unwrap()).unwrap()
    }

    #[test]
    fn exp_is_within_about_an_ulp_of_libm_over_the_range_softmax_and_silu_use() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let relative = ((exp(x) - x.exp()) / x.exp()).abs();
            worst = worst.max(relative);
            x += 0.001_37;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(-1000.0) > 0.0 && exp(-1000.0) < 1e-37);
        assert!(exp(1000.0).is_finite());
    }

    #[test]
    fn causal_softmax_equals_masked_softmax() {
        // Two blocks of 3 query rows over 7 keys, the first row seeing 5 keys
        // (4 of the past and itself), as a block starting at position 4.
        let (rows, keys, first_key) = (3, 7, 4);
        // Widths that exercise the 16-lane loops and their tails.
        for keys in [keys, 40] {
            let scores = random(&[1, 2, 3, rows, keys], 4.0);
            let expected = masked_softmax(&scores, |r, k| k <= first_key + r);
            let actual = causal_softmax(&scores, first_key, None).unwrap();
            assert_eq!(actual.dims(), scores.dims());
            assert!(max_abs_difference(&actual, &expected) < 1e-6);
            // Masked probabilities are exactly 0; every row sums to 1.
            assert_eq!(
                actual
                    .i((0, 1, 2, 0, first_key + 1))
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
                0.0
            );
            let sums = actual
                .sum(4)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-6), "{sums:?}");
        }
    }

    #[test]
    fn a_sliding_window_hides_keys_older_than_the_window_in_both_paths() {
        // 4 rows over 10 keys, row 0 is position 6, window 3: row r sees
        // keys 4 + r ..= 6 + r.
        let (rows, keys, first_key, window) = (4, 10, 6, 3);
        let scores = random(&[1, 2, rows, keys], 4.0);
        let expected = masked_softmax(&scores, |r, k| {
            k <= first_key + r && k + window > first_key + r
        });
        let fused = causal_softmax(&scores, first_key, Some(window)).unwrap();
        assert!(max_abs_difference(&fused, &expected) < 1e-6);
        let f16 = causal_softmax(
            &scores.to_dtype(DType::F16).unwrap(),
            first_key,
            Some(window),
        )
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
        assert!(max_abs_difference(&f16, &expected) < 1e-3);
        // Key 3 is one older than row 0's window: exactly 0.
        assert_eq!(
            fused.i((0, 0, 0, 3)).unwrap().to_scalar::<f32>().unwrap(),
            0.0
        );
        assert!(causal_softmax(&scores, first_key, Some(0)).is_err());
    }

    #[test]
    fn causal_softmax_of_a_single_token_sees_every_key() {
        let scores = random(&[1, 3, 1, 33], 3.0);
        let expected = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        let actual = causal_softmax(&scores, 32, None).unwrap();
        assert!(max_abs_difference(&actual, &expected) < 1e-6);
    }

    #[test]
    fn causal_softmax_spreads_nan_instead_of_hiding_it() {
        let mut values = vec![0.5f32; 8];
        values[3] = f32::NAN;
        let scores = Tensor::from_vec(values, (1, 8), &Device::Cpu).unwrap();
        let out = causal_softmax(&scores, 7, None)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!(out[0].iter().all(|p| p.is_nan()));
    }

    #[test]
    fn swiglu_equals_silu_of_gate_times_up() {
        for width in [5, 48] {
            let gate_up = random(&[1, 7, 2 * width], 6.0);
            let gate = gate_up.narrow(2, 0, width).unwrap();
            let up = gate_up.narrow(2, width, width).unwrap();
            let expected = (candle_nn::ops::silu(&gate).unwrap() * up).unwrap();
            let actual = swiglu(&gate_up).unwrap();
            assert_eq!(actual.dims(), &[1, 7, width]);
            let scale = expected
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap();
            let relative =
                max_abs_difference(&actual, &expected) / scale.to_scalar::<f32>().unwrap();
            assert!(relative < 1e-6, "relative difference {relative}");
        }
    }

    #[test]
    fn kernels_refuse_what_they_cannot_compute() {
        let odd = random(&[2, 5], 1.0);
        assert!(swiglu(&odd)
            .unwrap_err()
            .to_string()
            .contains("even last dimension"));
        // The candle-op path for other dtypes refuses the same shapes.
        let f16 = odd.to_dtype(candle_core::DType::F16).unwrap();
        assert!(swiglu(&f16)
            .unwrap_err()
            .to_string()
            .contains("even last dimension"));
        assert!(causal_softmax(&f16, 5, None)
            .unwrap_err()
            .to_string()
            .contains("first key 5 of 5"));
        assert!(causal_softmax(&odd, 5, None)
            .unwrap_err()
            .to_string()
            .contains("first key 5 of 5"));
        let strided = random(&[4, 6], 1.0).t().unwrap();
        assert!(swiglu(&strided)
            .unwrap_err()
            .to_string()
            .contains("contiguous"));
    }

    /// The CUDA kernels (kernels.cu) against the CPU's fused f32 kernels, in
    /// every dtype, on shapes with masked tails, rows longer than one block of
    /// threads and a GQA group. Runs where the crate is built with
    /// `cuda` and a GPU is present (the H200 runs in docs/benchmarks.md).
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_kernels_match_the_cpu_kernels() {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("no CUDA device: cuda_kernels_match_the_cpu_kernels not run");
            return;
        };
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let tolerance = match dtype {
                DType::F32 => 1e-6,
                DType::BF16 => 8e-3,
                _ => 1e-3,
            };
            for (shape, first_key) in [(vec![1, 4, 2, 7, 40], 30), (vec![1, 2, 3, 5, 700], 690)] {
                let scores = random(&shape, 4.0).to_dtype(dtype).unwrap();
                let exact =
                    causal_softmax(&scores.to_dtype(DType::F32).unwrap(), first_key, None).unwrap();
                let on_gpu =
                    causal_softmax(&scores.to_device(&gpu).unwrap(), first_key, None).unwrap();
                assert_eq!(on_gpu.dtype(), dtype);
                let on_gpu = on_gpu
                    .to_device(&Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap();
                let difference = max_abs_difference(&on_gpu, &exact);
                assert!(
                    difference < tolerance,
                    "{dtype:?} {shape:?} softmax off by {difference}"
                );
                // Masked keys are exactly 0 on the GPU too.
                let masked = on_gpu.i((0, 0, 0, 0, first_key + 1)).unwrap();
                assert_eq!(masked.to_scalar::<f32>().unwrap(), 0.0);
            }
            let gate_up = random(&[2, 37, 2 * 300], 3.0).to_dtype(dtype).unwrap();
            let exact = swiglu(&gate_up.to_dtype(DType::F32).unwrap()).unwrap();
            let on_gpu = swiglu(&gate_up.to_device(&gpu).unwrap()).unwrap();
            assert_eq!(on_gpu.dims(), &[2, 37, 300]);
            let on_gpu = on_gpu
                .to_device(&Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let scale = exact.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            let relative = max_abs_difference(&on_gpu, &exact) / scale.to_scalar::<f32>().unwrap();
            assert!(
                relative < 2.0 * tolerance,
                "{dtype:?} swiglu off by {relative} (relative)"
            );
        }
    }

    /// The path other dtypes and devices take (candle's ops) computes what
    /// the fused f32 kernels do, to the input's rounding: bf16 has an 8-bit
    /// significand, so a probability or SwiGLU output near 1 moves by at most
    /// about 2^-8 from rounding the result alone.
    #[test]
    fn the_candle_op_path_for_half_dtypes_matches_the_fused_kernels() {
        for dtype in [DType::BF16, DType::F16] {
            let tolerance = if dtype == DType::BF16 { 8e-3 } else { 1e-3 };
            let scores = random(&[1, 2, 2, 5, 40], 4.0).to_dtype(dtype).unwrap();
            let exact = causal_softmax(&scores.to_dtype(DType::F32).unwrap(), 30, None).unwrap();
            let half = causal_softmax(&scores, 30, None).unwrap();
            assert_eq!(half.dtype(), dtype);
            let difference = max_abs_difference(&half.to_dtype(DType::F32).unwrap(), &exact);
            assert!(
                difference < tolerance,
                "{dtype:?} softmax off by {difference}"
            );
            // The mask is the same: the key after row 0's last visible one is 0.
            let masked = half
                .i((0, 0, 0, 0, 31))
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            assert_eq!(masked.to_scalar::<f32>().unwrap(), 0.0);

            let gate_up = random(&[2, 3, 48], 2.0).to_dtype(dtype).unwrap();
            let exact = swiglu(&gate_up.to_dtype(DType::F32).unwrap()).unwrap();
            let half = swiglu(&gate_up).unwrap().to_dtype(DType::F32).unwrap();
            let relative = max_abs_difference(&half, &exact)
                / exact
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
            assert!(
                relative < 2.0 * tolerance,
                "{dtype:?} swiglu off by {relative} (relative)"
            );
        }
    }
}
