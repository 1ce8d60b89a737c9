//! Issue 19's engines: the `--matrix engines` variants (every KV-cache
//! format an inference engine ships, kvformat's engine grids, bit-exact,
//! beside the best research methods at similar bits), which engine ships the
//! format a row's flags select, and the exact engine command lines that
//! deploy it. The sweep report's sections built on these (rows grouped by
//! engine, the deploy line) are `sweep`'s; this file knows no sweep type.

use kv_compress::flags::{Fp8Scale, Method, Options};
use kvformat::codec::{Grid, GRIDS};

use crate::run_types::Variant;

/// The research methods the engines are measured against: docs/fidelity.md's
/// recommendations at 4.35 and 3.35 bits/value, and 8-bit and 5.5-bit points
/// beside q8_0/fp8 and q5_*.
const RESEARCH: &[(&str, &str)] = &[
    ("int8", "-bits 8"),
    (
        "ecsq-r5.5-sink1",
        "-method kivi -grid ecsq -rate 5.5 -key-group-size 1024 -value-axis channel -value-group-size 1024 -sink-tokens 1",
    ),
    (
        "ecsq-r4.35-sink1",
        "-method kivi -grid ecsq -rate 4.35 -key-group-size 1024 -value-axis channel -value-group-size 1024 -sink-tokens 1",
    ),
    (
        "ecsq-r3.35-sink1",
        "-method kivi -grid ecsq -rate 3.35 -key-group-size 1024 -value-axis channel -value-group-size 1024 -sink-tokens 1",
    ),
];

/// Every engine format (vLLM's float8 and TensorRT-LLM's NVFP4 with unit
/// and calibrated scales, the llama.cpp ones unrotated and rotated as
/// llama.cpp does by default),
/// then [`RESEARCH`], as sweep variants.
pub fn engines_matrix() -> Vec<Variant> {
    let engine_rows = GRIDS
        .iter()
        .filter_map(|spec| spec.engine.as_ref())
        .flat_map(|engine| {
            let choices: &[(&str, &str)] = if engine.llama_rotation {
                &[("", ""), ("-rot", " -llama-rot")]
            } else if engine.unit_scale {
                &[
                    ("-unit", " -fp8-scale unit"),
                    ("-calibrated", " -fp8-scale calibrated"),
                ]
            } else {
                &[("", "")]
            };
            choices.iter().map(move |(suffix, flags)| {
                format!("{0}{suffix}=-method {0}{flags}", engine.method)
            })
        });
    let research = RESEARCH
        .iter()
        .map(|(label, flags)| format!("{label}={flags}"));
    engine_rows
        .chain(research)
        .map(|spec| Variant::parse(&spec).expect("the engines matrix parses"))
        .collect()
}

/// What the unit-scale rows assume of a TensorRT-LLM deployment.
const TRT_UNIT: &str = "a checkpoint without k/v scales runs with scale 1, as measured";

/// kv-compress's options for a row's flags, if they parse.
fn options(flags: &str) -> Option<Options> {
    let words: Vec<&str> = flags.split_whitespace().collect();
    let (_, options) = kv_compress::flags::split_words(&words).ok()?;
    Some(options)
}

/// The engine grid a row's kv-compress flags select, if any.
pub fn engine_grid(flags: &str) -> Option<Grid> {
    match options(flags)?.method {
        Method::Engine(grid) => Some(grid),
        _ => None,
    }
}

/// The engine that ships the format `flags` select, or that none does.
pub fn engine_name(flags: &str) -> &'static str {
    engine_grid(flags)
        .and_then(|grid| grid.spec().engine.as_ref())
        .map_or("research (kv-compress only)", |engine| engine.engine)
}

/// The commands that run an engine with the cache a row's flags measured.
pub fn deploy_commands(grid: Grid, flags: &str) -> Vec<String> {
    let (Some(engine), Some(options)) = (grid.spec().engine.as_ref(), options(flags)) else {
        return Vec::new();
    };
    let unit = options.fp8_scale == Fp8Scale::Unit;
    if grid.is_fp8() {
        let scales = match options.fp8_scale {
            Fp8Scale::Unit => "",
            Fp8Scale::Calibrated => {
                " --calculate-kv-scales   (or a checkpoint with per-layer k/v scales; the measured \
                 scale is per tensor and window, so one static scale may do a little worse)"
            }
            Fp8Scale::Dynamic => {
                "   (vLLM has no per-token fp8 scales: the measured format is not vLLM's)"
            }
        };
        let mut commands = vec![
            format!(
                "vLLM:   vllm serve MODEL --kv-cache-dtype {}{scales}",
                engine.cache_type
            ),
            format!(
                "SGLang: python -m sglang.launch_server --model-path MODEL --kv-cache-dtype {}",
                engine.cache_type
            ),
        ];
        if grid == Grid::Fp8E4m3 && unit {
            commands.push(format!(
                "TensorRT-LLM: trtllm-serve MODEL --extra_llm_api_options kv.yaml   \
                 (kv.yaml: `kv_cache_config: {{dtype: fp8}}`; {TRT_UNIT})"
            ));
        }
        commands
    } else if grid == Grid::Nvfp4 {
        let scales = if unit {
            TRT_UNIT
        } else {
            "a ModelOpt checkpoint with kv_cache_quant_algo NVFP4 holds per-layer k/v scales \
             amax/(6*448); the measured scale is per tensor and window"
        };
        vec![format!(
            "TensorRT-LLM: trtllm-serve MODEL --extra_llm_api_options kv.yaml   \
             (kv.yaml: `kv_cache_config: {{dtype: nvfp4}}`; {scales}; Blackwell GPUs)"
        )]
    } else if grid == Grid::Int8Trt {
        vec![
            "TensorRT-LLM (TensorRT-engine flow; its PyTorch backend has no int8 cache): \
             python examples/quantization/quantize.py --model_dir MODEL --kv_cache_dtype int8 ..., \
             then trtllm-build"
                .to_string(),
            "  Not the measured format exactly: TensorRT-LLM calibrates one scale per layer over \
             Q, K and V together; the measured scale is per K or V tensor and window, so the \
             engine's loss can be larger."
                .to_string(),
        ]
    } else if grid.is_quanto() {
        vec![format!(
            "transformers: model.generate(..., cache_implementation=\"quantized\", \
             cache_config={{\"backend\": \"quanto\", \"nbits\": {}}})   (pip install optimum-quanto; \
             axis 0 and q_group_size 64 as measured; the newest tokens, up to 127, stay in the \
             model's dtype until the cache quantizes everything again)",
            grid.spec().bits[0]
        )]
    } else if grid == Grid::Fp4Mx16 {
        vec![format!(
            "SGLang: python -m sglang.launch_server --model-path MODEL --kv-cache-dtype {}   \
             (fp4_e2m1 in releases before the rename; CUDA 12.8+)",
            engine.cache_type
        )]
    } else if options.llama_rot {
        vec![format!(
            "llama.cpp: llama-server -m MODEL -ctk {0} -ctv {0} -fa on   \
             (rotated as llama.cpp does by default since PR #21038)",
            engine.cache_type
        )]
    } else {
        vec![format!(
            "llama.cpp: LLAMA_ATTN_ROT_DISABLE=1 llama-server -m MODEL -ctk {0} -ctv {0} -fa on   \
             (newer llama.cpp rotates quantized caches by default, PR #21038; the measured format has no rotation)",
            engine.cache_type
        )]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_matrix_has_every_engine_format_and_parses() {
        let matrix = engines_matrix();
        let labels: std::collections::BTreeSet<&str> =
            matrix.iter().map(|v| v.label.as_str()).collect();
        assert_eq!(labels.len(), matrix.len(), "labels are unique");
        let engine_rows = matrix
            .iter()
            .filter(|v| engine_grid(&v.settings.extra_args.join(" ")).is_some())
            .count();
        assert_eq!(engine_rows, 6 * 2 + 3 * 2 + 1 + 2 + 1);
    }

    #[test]
    fn capacity_counts_the_engines_real_bytes_per_value() {
        let methods = crate::capacity::Method::defaults();
        let bits = |label: &str| {
            methods
                .iter()
                .find(|m| m.label == label)
                .map(|m| m.bits_per_value)
        };
        // ggml: 32 codes and an f16 d (and m) per block.
        assert_eq!(bits("llama-q8_0"), Some(8.5));
        assert_eq!(bits("llama-q4_0"), Some(4.5));
        assert_eq!(bits("llama-q4_1"), Some(5.0));
        assert_eq!(bits("llama-q5_0"), Some(5.5));
        assert_eq!(bits("llama-q5_1"), Some(6.0));
        assert_eq!(bits("llama-iq4_nl"), Some(4.5));
        // fp4: 16 codes and an 8-bit scale per block (NVFP4: and an f32 k_scale per tensor).
        assert_eq!(bits("sglang-fp4"), Some(4.5));
        // quanto: a half-precision scale and shift per 64 codes.
        assert_eq!(bits("hf-quanto-int4"), Some(4.5));
        assert_eq!(bits("hf-quanto-int2"), Some(2.5));
        assert_eq!(bits("trtllm-int8"), Some(8.0 + 32.0 / 4096.0));
        assert_eq!(bits("trtllm-nvfp4"), Some(4.5 + 32.0 / 4096.0));
        // fp8: a byte per value and one f32 scale per 64x64 tensor.
        assert_eq!(bits("vllm-fp8-e4m3"), Some(8.0 + 32.0 / 4096.0));
    }
}
