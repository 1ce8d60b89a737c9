//! Runtime CPU dispatch for the hot loops: each is written once as plain
//! (auto-vectorizable) Rust and compiled three times, for AVX-512, for AVX2
//! and for the baseline, by [`multiversion!`]; the best level the CPU has is
//! picked once per process. Every version does the same IEEE operations in
//! the same order (no fast-math, no FMA contraction), so all three give the
//! same bits: the unit tests of each kernel compare them.
//!
//! `KVFORMAT_SIMD=scalar|avx2|avx512` caps the level (never above what the
//! CPU has), so the AVX2 path can be measured on an AVX-512 machine.

use std::sync::OnceLock;

/// An instruction-set level a kernel is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// The build's baseline (SSE2 on x86-64).
    Scalar,
    /// AVX2 + FMA + BMI2 + F16C.
    Avx2,
    /// AVX-512 F/BW/DQ/VL on top of AVX2.
    Avx512,
}

impl Level {
    /// The levels this CPU can run, lowest first.
    pub fn available() -> Vec<Level> {
        let best = detected();
        [Level::Scalar, Level::Avx2, Level::Avx512]
            .into_iter()
            .filter(|&level| level <= best)
            .collect()
    }

    pub fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }
}

/// The best level this CPU supports.
fn detected() -> Level {
    static DETECTED: OnceLock<Level> = OnceLock::new();
    *DETECTED.get_or_init(detect)
}

fn detect() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("bmi2")
            && is_x86_feature_detected!("f16c");
        let avx512 = avx2
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx512vl");
        if avx512 {
            return Level::Avx512;
        }
        if avx2 {
            return Level::Avx2;
        }
    }
    Level::Scalar
}

/// The level the kernels run at: the CPU's best, capped by `KVFORMAT_SIMD`.
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = match std::env::var("KVFORMAT_SIMD").as_deref() {
            Ok("scalar") => Level::Scalar,
            Ok("avx2") => Level::Avx2,
            _ => Level::Avx512,
        };
        detected().min(cap)
    })
}

/// `level`, or the CPU's best if that is lower.
pub(crate) fn capped(level: Level) -> Level {
    level.min(detected())
}

/// `x.round()` (half away from zero) in operations every level vectorizes
/// (`round` itself is a libm call in a loop): `x - trunc(x)` is exact, so
/// comparing it with ±0.5 decides exactly; the same bits as `f64::round`.
#[inline(always)]
pub(crate) fn round(x: f64) -> f64 {
    let t = x.trunc();
    let fraction = x - t;
    if fraction >= 0.5 {
        t + 1.0
    } else if fraction <= -0.5 {
        t - 1.0
    } else {
        t
    }
}

/// `x.clamp(lo, hi)` for `lo <= hi` as selects (NaN passes through, as in `clamp`).
#[inline(always)]
pub(crate) fn clamp<T: PartialOrd + Copy>(x: T, lo: T, hi: T) -> T {
    let x = if x < lo { lo } else { x };
    if x > hi {
        hi
    } else {
        x
    }
}

/// `multiversion!(fn name / name_at(args) -> R => generic)` defines
/// `name(args)`, which runs `generic(args)` compiled for [`level()`], and
/// `name_at(level, args)` for tests; `generic` must be `#[inline(always)]`
/// (and so must what it calls, for it to be compiled at the level).
/// A `level` above the CPU's runs at the CPU's. Attributes before `fn`
/// apply to `name` (say `#[allow(dead_code)]` where callers pass a level).
macro_rules! multiversion {
    ($(#[$attr:meta])* $vis:vis fn $name:ident / $name_at:ident ($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? => $generic:path) => {
        $(#[$attr])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            $name_at($crate::simd::level(), $($arg),*)
        }

        #[allow(unused_variables, clippy::too_many_arguments)]
        pub(crate) fn $name_at(level: $crate::simd::Level, $($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi1,bmi2,f16c")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $generic($($arg),*)
                }
                #[target_feature(enable = "avx2,fma,bmi1,bmi2,f16c")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $generic($($arg),*)
                }
                // SAFETY: capped at what `is_x86_feature_detected!` found.
                match $crate::simd::capped(level) {
                    $crate::simd::Level::Avx512 => return unsafe { avx512($($arg),*) },
                    $crate::simd::Level::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::simd::Level::Scalar => {}
                }
            }
            $generic($($arg),*)
        }
    };
}
pub(crate) use multiversion;

multiversion!(pub(crate) fn moments / moments_at(values: &[f32], center: f64) -> (f64, f64)
    => moments_generic);

/// `(Σ (x - center), Σ (x - center)²)` in f64, in [`MOMENT_LANES`]
/// interleaved partial sums (so that they vectorize) added in lane order at
/// the end: the same bits at every level.
#[inline(always)]
pub(crate) fn moments_generic(values: &[f32], center: f64) -> (f64, f64) {
    let (mut sums, mut squares) = ([0.0f64; MOMENT_LANES], [0.0f64; MOMENT_LANES]);
    let chunks = values.chunks_exact(MOMENT_LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for lane in 0..MOMENT_LANES {
            let deviation = f64::from(chunk[lane]) - center;
            sums[lane] += deviation;
            squares[lane] += deviation * deviation;
        }
    }
    for (lane, &x) in tail.iter().enumerate() {
        let deviation = f64::from(x) - center;
        sums[lane] += deviation;
        squares[lane] += deviation * deviation;
    }
    let total = |partials: [f64; MOMENT_LANES]| partials.iter().fold(0.0, |sum, &p| sum + p);
    (total(sums), total(squares))
}

/// Partial sums of [`moments`]: two AVX-512 registers of f64.
const MOMENT_LANES: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moments_are_the_same_bits_at_every_level_and_the_exact_sums_to_rounding() {
        // Lengths that leave every remainder of the lanes, values whose
        // squares span many magnitudes.
        let mut generator = crate::codec::SplitMix64(5);
        for len in [0usize, 1, 7, 15, 16, 17, 33, 1000, 1023] {
            let values: Vec<f32> = (0..len)
                .map(|_| {
                    let u = (generator.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
                    (u - 0.3) * (1 << (generator.next_u64() % 12)) as f32
                })
                .collect();
            let center = 0.75;
            let exact = values.iter().fold((0.0f64, 0.0f64), |(sum, squares), &x| {
                let d = f64::from(x) - center;
                (sum + d, squares + d * d)
            });
            let at_best = moments_at(*Level::available().last().unwrap(), &values, center);
            for level in Level::available() {
                let (sum, squares) = moments_at(level, &values, center);
                assert_eq!(
                    (sum.to_bits(), squares.to_bits()),
                    (at_best.0.to_bits(), at_best.1.to_bits()),
                    "{level:?}, {len}"
                );
            }
            let scale = values
                .iter()
                .map(|&x| (f64::from(x) - center).abs())
                .sum::<f64>()
                .max(1.0);
            assert!(
                (at_best.0 - exact.0).abs() <= scale * 1e-12,
                "{len}: {at_best:?} vs {exact:?}"
            );
            assert!(
                (at_best.1 - exact.1).abs() <= exact.1 * 1e-12,
                "{len}: {at_best:?} vs {exact:?}"
            );
        }
    }
}
