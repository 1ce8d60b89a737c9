//! The grids and what each supports, one row per grid in [`GRIDS`]: the
//! checks, the payload layout, the sparse forms, the fast path and the
//! command line ask a grid's [`GridSpec`] instead of matching on [`Grid`].
//! Only the seam (`group_quantizer`) and each grid's own quantizer file
//! branch on the grid, for its math. A new grid is a variant, a row here
//! and its quantizer behind the seam.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::scales::ScaleDtype;

/// The code widths every uniform grid supports: 5 and 6 bits give a
/// per-layer allocation steps between 4 and 8 (kv-validate's `allocate`).
pub const SUPPORTED_BITS: [u8; 6] = [2, 3, 4, 5, 6, 8];

/// The widths of the codebook grids: their Gaussian levels are tabled for these.
const CODEBOOK_BITS: [u8; 3] = [2, 3, 4];

/// Quantization grid of a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Grid {
    /// `scale = max|x| / qmax`, codes in `[-2^(b-1), 2^(b-1)-1]` (ADR-002 for b = 4).
    Symmetric,
    /// `scale = (max - min) / (2^b - 1)` plus an offset, codes in `[0, 2^b - 1]`.
    Asymmetric,
    /// Codebook: the Lloyd-Max levels of the unit Gaussian times the group's
    /// RMS (for rotated values; `codebook.rs`). 2, 3 or 4 bits.
    Lloyd,
    /// Codebook: levels fitted to the tensor by k-means, stored in FP16,
    /// times the group's RMS. 2, 3 or 4 bits.
    Kmeans,
    /// Entropy-coded uniform quantization (`ecsq.rs`): one step per tensor,
    /// an offset (the mean) per group, codes range coded; `bits` sets the
    /// step, and the stored bits per value come out near it.
    Ecsq,
    /// llama.cpp's `q8_0` cache type (`ggml.rs`): blocks of 32 along
    /// head_dim, an f16 scale `max|x| / 127`, int8 codes.
    #[serde(rename = "q8_0")]
    Q8_0,
    /// llama.cpp's `q4_0`: an f16 scale `x_max / -8` (x_max the value of
    /// largest magnitude), 4-bit codes biased by 8.
    #[serde(rename = "q4_0")]
    Q4_0,
    /// llama.cpp's `q4_1`: f16 scale `(max - min) / 15` and f16 min, 4-bit codes.
    #[serde(rename = "q4_1")]
    Q4_1,
    /// llama.cpp's `q5_0`: an f16 scale `x_max / -16`, 5-bit codes biased by 16.
    #[serde(rename = "q5_0")]
    Q5_0,
    /// llama.cpp's `q5_1`: f16 scale `(max - min) / 31` and f16 min, 5-bit codes.
    #[serde(rename = "q5_1")]
    Q5_1,
    /// llama.cpp's `iq4_nl`: an f16 scale per block of 32 (a weighted
    /// least-squares fit), 4-bit indices into a non-uniform table of 16 levels.
    #[serde(rename = "iq4_nl")]
    Iq4Nl,
    /// vLLM's and SGLang's `fp8_e4m3` cache (`fp8.rs`): `x / scale` saturated
    /// to +-448 and rounded to float8 e4m3fn; one f32 scale per group.
    #[serde(rename = "fp8-e4m3")]
    Fp8E4m3,
    /// vLLM's `fp8_e5m2` cache: `x / scale` saturated to +-57344, float8 e5m2.
    #[serde(rename = "fp8-e5m2")]
    Fp8E5m2,
    /// TensorRT-LLM's NVFP4 cache (`fp4.rs`): e2m1 codes, an e4m3 scale per
    /// block of 16 along head_dim, and one f32 `k_scale` per tensor.
    #[serde(rename = "nvfp4")]
    Nvfp4,
    /// SGLang's `fp4_mx_block16` cache: e2m1 codes and a power-of-two
    /// (E8M0) scale per block of 16 along head_dim.
    #[serde(rename = "fp4-mx16")]
    Fp4Mx16,
    /// transformers' `QuantizedCache` (quanto backend, `nbits=4`,
    /// `quanto.rs`): a scale and shift per 64 consecutive values, in the
    /// model's dtype.
    #[serde(rename = "quanto-int4")]
    QuantoInt4,
    /// The same with `nbits=2`.
    #[serde(rename = "quanto-int2")]
    QuantoInt2,
    /// TensorRT-LLM's INT8 cache (`int8.rs`): `x / scale` rounded to even
    /// and saturated to int8; one f32 scale per tensor.
    #[serde(rename = "int8-trt")]
    Int8Trt,
}

/// An engine that ships a grid as a KV-cache type, and how it is asked for.
#[derive(Debug, PartialEq)]
pub struct EngineFormat {
    /// The engines, as the reports name them (`llama.cpp`, `vLLM, SGLang`).
    pub engine: &'static str,
    /// Its `kv-compress -method` spelling (`llama-q4_0`, `vllm-fp8-e4m3`).
    pub method: &'static str,
    /// The engine's own name of the cache type (`q4_0`, `fp8_e4m3`).
    pub cache_type: &'static str,
    /// The consecutive values of the tensor (row-major) that share one
    /// scale, where the engine groups them so (quanto's 64).
    pub flat_group: Option<usize>,
    /// The values along head_dim that share one scale (llama.cpp's 32),
    /// fixed by the engine; `None` where the scale mode chooses the groups
    /// (float8: per tensor, or per token and head).
    pub block: Option<usize>,
    /// Whether the engine rotates this cache type (llama.cpp's attention
    /// rotation, PR #21038), so `llama_rotation` may be asked for.
    pub llama_rotation: bool,
    /// Whether the engine runs it with unit scales when the checkpoint has
    /// none (vLLM's fp8, TensorRT-LLM's NVFP4), so `unit_scale` may be asked for.
    pub unit_scale: bool,
}

/// What one grid is and supports.
#[derive(Debug, PartialEq)]
pub struct GridSpec {
    pub grid: Grid,
    /// Its `-grid` spelling.
    pub flag: &'static str,
    /// The code widths it takes.
    pub bits: &'static [u8],
    /// Per-group payload sections: a scale, an offset.
    pub scales: bool,
    pub offsets: bool,
    /// Whether code 0 decodes to exactly 0, so dropped values can be coded
    /// in place (the dense sparse form).
    pub exact_zero: bool,
    /// Whether the codes are entropy coded: the codes section's length is
    /// then stored in the layout (`coded_bytes`), not given by the shape.
    pub entropy_coded: bool,
    /// Whether it takes `sparsity` and `outliers` (values dropped or kept
    /// beside the codes, which a grid that never clips does not need).
    pub sparsity: bool,
    pub outliers: bool,
    /// Whether a `rate` (bits per value) sizes its step.
    pub rate: bool,
    /// Whether the fused one-pass path (`fused.rs`, ADR-002's) applies when
    /// every value is coded.
    pub fused_fast_path: bool,
    /// Whether scales may be any finite value (zero, negative, subnormal) as
    /// an engine computes them, rather than positive normal numbers.
    pub any_finite_scales: bool,
    /// The dtypes its scales may be stored in (a manifest naming another is
    /// refused); an engine grid's first is its memory cost (quanto's: a
    /// half-precision model's).
    pub scale_dtypes: &'static [ScaleDtype],
    /// The engine that ships this grid as a cache type; `None` for the
    /// research grids. Engine grids are stored without the LZ4 stage, so
    /// their bits per value are the engine's memory cost.
    pub engine: Option<EngineFormat>,
}

/// Every grid, in the order of [`Grid`]'s variants.
pub const GRIDS: [GridSpec; 18] = [
    GridSpec {
        grid: Grid::Symmetric,
        flag: "sym",
        bits: &SUPPORTED_BITS,
        scales: true,
        offsets: false,
        exact_zero: true,
        entropy_coded: false,
        sparsity: true,
        outliers: true,
        rate: false,
        fused_fast_path: true,
        any_finite_scales: false,
        scale_dtypes: &[ScaleDtype::F16, ScaleDtype::F32],
        engine: None,
    },
    GridSpec {
        grid: Grid::Asymmetric,
        flag: "asym",
        bits: &SUPPORTED_BITS,
        scales: true,
        offsets: true,
        exact_zero: false,
        entropy_coded: false,
        sparsity: true,
        outliers: true,
        rate: false,
        fused_fast_path: false,
        any_finite_scales: false,
        scale_dtypes: &[ScaleDtype::F16, ScaleDtype::F32],
        engine: None,
    },
    GridSpec {
        grid: Grid::Lloyd,
        flag: "lloyd",
        bits: &CODEBOOK_BITS,
        scales: true,
        offsets: false,
        exact_zero: false,
        entropy_coded: false,
        sparsity: true,
        outliers: true,
        rate: false,
        fused_fast_path: false,
        any_finite_scales: false,
        scale_dtypes: &[ScaleDtype::F16, ScaleDtype::F32],
        engine: None,
    },
    GridSpec {
        grid: Grid::Kmeans,
        flag: "kmeans",
        bits: &CODEBOOK_BITS,
        scales: true,
        offsets: false,
        exact_zero: false,
        entropy_coded: false,
        sparsity: true,
        outliers: true,
        rate: false,
        fused_fast_path: false,
        any_finite_scales: false,
        scale_dtypes: &[ScaleDtype::F16, ScaleDtype::F32],
        engine: None,
    },
    GridSpec {
        grid: Grid::Ecsq,
        flag: "ecsq",
        bits: &SUPPORTED_BITS,
        scales: false,
        offsets: true,
        exact_zero: false,
        entropy_coded: true,
        sparsity: false,
        outliers: false,
        rate: true,
        fused_fast_path: false,
        any_finite_scales: false,
        scale_dtypes: &[ScaleDtype::F16, ScaleDtype::F32],
        engine: None,
    },
    GridSpec {
        grid: Grid::Q8_0,
        flag: "q8_0",
        bits: &[8],
        scales: true,
        offsets: false,
        exact_zero: true,
        entropy_coded: false,
        sparsity: false,
        outliers: false,
        rate: false,
        fused_fast_path: false,
        any_finite_scales: true,
        scale_dtypes: &[ScaleDtype::F16],
        engine: Some(EngineFormat {
            engine: "llama.cpp",
            method: "llama-q8_0",
            cache_type: "q8_0",
            flat_group: None,
            block: Some(super::ggml::BLOCK),
            llama_rotation: true,
            unit_scale: false,
        }),
    },
    GridSpec {
        grid: Grid::Q4_0,
        flag: "q4_0",
        bits: &[4],
        scales: true,
        offsets: false,
        exact_zero: true,
        entropy_coded: false,
        sparsity: false,
        outliers: false,
        rate: false,
        fused_fast_path: false,
        any_finite_scales: true,
        scale_dtypes: &[ScaleDtype::F16],
        engine: Some(EngineFormat {
            engine: "llama.cpp",
            method: "llama-q4_0",
            cache_type: "q4_0",
            flat_group: None,
            block: Some(super::ggml::BLOCK),
            llama_rotation: true,
            unit_scale: false,
        }),
    },
    GridSpec {
        grid: Grid::Q4_1,
        flag: "q4_1",
        bits: &[4],
        scales: true,
        offsets: true,
        exact_zero: false,
        entropy_coded: false,
        sparsity: false,
        outliers: false,
        rate: false,
        fused_fast_path: false,
        any_finite_scales: true,
        scale_dtypes: &[ScaleDtype::F16],
        engine: Some(EngineFormat {
            engine: "llama.cpp",
            method: "llama-q4_1",
            cache_type: "q4_1",
            flat_group: None,
            block: Some(super::ggml::BLOCK),
            llama_rotation: true,
            unit_scale: false,
        }),
    },
    GridSpec {
        grid: Grid::Q5_0,
        flag: "q5_0",
        bits: &[5],
        scales: true,
        offsets: false,
        exact_zero: true,
        entropy_coded: false,
        sparsity: false,
        outliers: false,
        rate: false,
        fused_fast_path: false,
        any_finite_scales: true,
        scale_dtypes: &[ScaleDtype::F16],
        engine: Some(EngineFormat {
            engine: "llama.cpp",
            method: "llama-q5_0",
            cache_type: "q5_0",
            flat_group: None,
            block: Some(super::ggml::BLOCK),
            llama_rotation: true,
            unit_scale: false,
        }),
    },
    GridSpec {
        grid: Grid::Q5_1,
        flag: "q5_1",
        bits: &[5],
        scales: true,
        offsets: true,
        exact_zero: false,
        entropy_coded: false,
        sparsity: false,
        outliers: false,
        rate: false,
        fused_fast_path: false,
        any_finite_scales: true,
        scale_dtypes: &[ScaleDtype::F16],
        engine: Some(EngineFormat {
            engine: "llama.cpp",
            method: "llama-q5_1",
            cache_type: "q5_1",
            flat_group: None,
            block: Some(super::ggml::BLOCK),
            llama_rotation: true,
            unit_scale: false,
        }),
    },
    GridSpec {
        grid: Grid::Iq4Nl,
        flag: "iq4_nl",
        bits: &[4],
        scales: true,
        offsets: false,
        exact_zero: false,
        entropy_coded: false,
        sparsity: false,
        outliers: false,
        rate: false,
        fused_fast_path: false,
        any_finite_scales: true,
        scale_dtypes: &[ScaleDtype::F16],
        engine: Some(EngineFormat {
            engine: "llama.cpp",
            method: "llama-iq4_nl",
            cache_type: "iq4_nl",
            flat_group: None,
            block: Some(super::ggml::BLOCK),
            llama_rotation: true,
            unit_scale: false,
        }),
    },
    GridSpec {
        grid: Grid::Fp8E4m3,
        flag: "fp8-e4m3",
        bits: &[8],
        scales: true,
        offsets: false,
        exact_zero: true,
        entropy_coded: false,
        sparsity: false,
        outliers: false,
        rate: false,
        fused_fast_path: false,
        any_finite_scales: false,
        scale_dtypes: &[ScaleDtype::F32],
        engine: Some(EngineFormat {
            engine: "vLLM, SGLang",
            method: "vllm-fp8-e4m3",
            cache_type: "fp8_e4m3",
            flat_group: None,
            block: None,
            llama_rotation: false,
            unit_scale: true,
        }),
    },
    GridSpec {
        grid: Grid::Fp8E5m2,
        flag: "fp8-e5m2",
        bits: &[8],
        scales: true,
        offsets: false,
        exact_zero: true,
        entropy_coded: false,
        sparsity: false,
        outliers: false,
        rate: false,
        fused_fast_path: false,
        any_finite_scales: false,
        scale_dtypes: &[ScaleDtype::F32],
        engine: Some(EngineFormat {
            engine: "vLLM, SGLang",
            method: "vllm-fp8-e5m2",
            cache_type: "fp8_e5m2",
            flat_group: None,
            block: None,
            llama_rotation: false,
            unit_scale: true,
        }),
    },
    GridSpec {
        grid: Grid::Nvfp4,
        flag: "nvfp4",
        bits: &[4],
        scales: true,
        offsets: false,
        exact_zero: true,
        entropy_coded: false,
        sparsity: false,
        outliers: false,
        rate: false,
        fused_fast_path: false,
        any_finite_scales: true,
        scale_dtypes: &[ScaleDtype::E4m3],
        engine: Some(EngineFormat {
            engine: "TensorRT-LLM",
            method: "trtllm-nvfp4",
            cache_type: "nvfp4",
            flat_group: None,
            block: Some(super::fp4::BLOCK),
            llama_rotation: false,
            unit_scale: true,
        }),
    },
    GridSpec {
        grid: Grid::Fp4Mx16,
        flag: "fp4-mx16",
        bits: &[4],
        scales: true,
        offsets: false,
        exact_zero: true,
        entropy_coded: false,
        sparsity: false,
        outliers: false,
        rate: false,
        fused_fast_path: false,
        any_finite_scales: true,
        scale_dtypes: &[ScaleDtype::E8m0],
        engine: Some(EngineFormat {
            engine: "SGLang",
            method: "sglang-fp4",
            cache_type: "fp4_mx_block16",
            flat_group: None,
            block: Some(super::fp4::BLOCK),
            llama_rotation: false,
            unit_scale: false,
        }),
    },
    GridSpec {
        grid: Grid::QuantoInt4,
        flag: "quanto-int4",
        bits: &[4],
        scales: true,
        offsets: true,
        exact_zero: false,
        entropy_coded: false,
        sparsity: false,
        outliers: false,
        rate: false,
        fused_fast_path: false,
        any_finite_scales: true,
        scale_dtypes: &[ScaleDtype::F16, ScaleDtype::Bf16, ScaleDtype::F32],
        engine: Some(EngineFormat {
            engine: "transformers",
            method: "hf-quanto-int4",
            cache_type: "quantized (quanto, nbits=4)",
            flat_group: Some(super::quanto::GROUP),
            block: None,
            llama_rotation: false,
            unit_scale: false,
        }),
    },
    GridSpec {
        grid: Grid::QuantoInt2,
        flag: "quanto-int2",
        bits: &[2],
        scales: true,
        offsets: true,
        exact_zero: false,
        entropy_coded: false,
        sparsity: false,
        outliers: false,
        rate: false,
        fused_fast_path: false,
        any_finite_scales: true,
        scale_dtypes: &[ScaleDtype::F16, ScaleDtype::Bf16, ScaleDtype::F32],
        engine: Some(EngineFormat {
            engine: "transformers",
            method: "hf-quanto-int2",
            cache_type: "quantized (quanto, nbits=2)",
            flat_group: Some(super::quanto::GROUP),
            block: None,
            llama_rotation: false,
            unit_scale: false,
        }),
    },
    GridSpec {
        grid: Grid::Int8Trt,
        flag: "int8-trt",
        bits: &[8],
        scales: true,
        offsets: false,
        exact_zero: true,
        entropy_coded: false,
        sparsity: false,
        outliers: false,
        rate: false,
        fused_fast_path: false,
        any_finite_scales: false,
        scale_dtypes: &[ScaleDtype::F32],
        engine: Some(EngineFormat {
            engine: "TensorRT-LLM",
            method: "trtllm-int8",
            cache_type: "int8",
            flat_group: None,
            block: None,
            llama_rotation: false,
            unit_scale: false,
        }),
    },
];

impl Grid {
    /// This grid's row of [`GRIDS`].
    pub fn spec(self) -> &'static GridSpec {
        &GRIDS[self as usize]
    }

    /// The grid spelled `flag` on the command line (`sym`, `asym`, ...).
    pub fn from_flag(flag: &str) -> Option<Grid> {
        GRIDS
            .iter()
            .find(|spec| spec.flag == flag)
            .map(|spec| spec.grid)
    }
}

impl Grid {
    /// The engine grid whose `-method` spelling is `method` (`llama-q4_0`).
    pub fn from_engine_method(method: &str) -> Option<Grid> {
        GRIDS
            .iter()
            .find(|spec| spec.engine.as_ref().is_some_and(|e| e.method == method))
            .map(|spec| spec.grid)
    }

    /// Whether an engine ships this grid (its bytes are the engine's).
    pub fn is_engine_format(self) -> bool {
        self.spec().engine.is_some()
    }

    /// The engine's fixed block along head_dim, if it has one (llama.cpp's 32).
    pub fn engine_block(self) -> Option<usize> {
        self.spec().engine.as_ref().and_then(|engine| engine.block)
    }

    /// Whether this is one of the float8 grids (one f32 scale per group).
    pub fn is_fp8(self) -> bool {
        matches!(self, Grid::Fp8E4m3 | Grid::Fp8E5m2)
    }

    /// The engine's fixed group of consecutive values, if it has one (quanto's 64).
    pub fn engine_flat_group(self) -> Option<usize> {
        self.spec()
            .engine
            .as_ref()
            .and_then(|engine| engine.flat_group)
    }

    /// Whether this is one of transformers' quanto grids (`quanto.rs`).
    pub fn is_quanto(self) -> bool {
        matches!(self, Grid::QuantoInt4 | Grid::QuantoInt2)
    }

    /// Whether this is one of the e2m1 grids (`fp4.rs`).
    pub fn is_fp4(self) -> bool {
        matches!(self, Grid::Nvfp4 | Grid::Fp4Mx16)
    }
}

impl fmt::Display for Grid {
    /// Its `-grid` spelling.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.spec().flag)
    }
}

/// `2, 3 or 4`: a list of widths as the messages spell it.
pub fn spoken_list<T: fmt::Display>(items: &[T]) -> String {
    match items.split_last() {
        None => String::new(),
        Some((last, [])) => last.to_string(),
        Some((last, rest)) => {
            let rest: Vec<String> = rest.iter().map(T::to_string).collect();
            format!("{} or {last}", rest.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_sits_at_its_grids_index_and_has_its_own_flag() {
        for (index, spec) in GRIDS.iter().enumerate() {
            assert_eq!(spec.grid as usize, index, "{spec:?}");
            assert_eq!(Grid::from_flag(spec.flag), Some(spec.grid));
            assert_eq!(spec.grid.to_string(), spec.flag);
        }
        assert_eq!(Grid::from_flag("symmetric"), None);
    }

    #[test]
    fn widths_are_spoken_as_the_messages_spell_them() {
        assert_eq!(spoken_list(&CODEBOOK_BITS), "2, 3 or 4");
        assert_eq!(spoken_list(&SUPPORTED_BITS), "2, 3, 4, 5, 6 or 8");
        assert_eq!(spoken_list(&[8]), "8");
    }
}
