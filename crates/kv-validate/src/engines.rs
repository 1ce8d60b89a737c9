//! Issue 19's engines: the `--matrix engines` variants (every KV-cache
//! format an inference engine ships, kvformat's engine grids, bit-exact,
//! beside the best research methods at similar bits), which engine ships the
//! format a row's flags select, and the exact engine command lines that
//! deploy it. The sweep report's sections built on these (rows grouped by
//! engine, the deploy line) are `sweep`'s; this file knows no sweep type.

use kv_compress::flags::Method;
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

/// Every engine format (the float8 ones with unit and calibrated scales),
/// then [`RESEARCH`], as sweep variants.
pub fn engines_matrix() -> Vec<Variant> {
    let engine_rows = GRIDS
        .iter()
        .filter_map(|spec| spec.engine.as_ref())
        .flat_map(|engine| {
            let fp8 = engine.method.starts_with("vllm-");
            let scales: &[&str] = if fp8 { &["unit", "calibrated"] } else { &[""] };
            scales.iter().map(move |scale| match *scale {
                "" => format!("{0}=-method {0}", engine.method),
                scale => format!("{0}-{scale}=-method {0} -fp8-scale {scale}", engine.method),
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

/// The engine grid a row's kv-compress flags select, if any.
pub fn engine_grid(flags: &str) -> Option<Grid> {
    let words: Vec<&str> = flags.split_whitespace().collect();
    let (_, options) = kv_compress::flags::split_words(&words).ok()?;
    match options.method {
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

/// The commands that run an engine with this grid's cache.
pub fn deploy_commands(grid: Grid, flags: &str) -> Vec<String> {
    let Some(engine) = grid.spec().engine.as_ref() else {
        return Vec::new();
    };
    if grid.is_fp8() {
        let calibrated = flags.contains("calibrated");
        let scales = if calibrated {
            " --calculate-kv-scales   (or a checkpoint with per-layer k/v scales)"
        } else {
            ""
        };
        vec![
            format!(
                "vLLM:   vllm serve MODEL --kv-cache-dtype {}{scales}",
                engine.cache_type
            ),
            format!(
                "SGLang: python -m sglang.launch_server --model-path MODEL --kv-cache-dtype {}",
                engine.cache_type
            ),
        ]
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
        assert_eq!(engine_rows, 5 + 2 * 2);
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
        // fp8: a byte per value and one f32 scale per 64x64 tensor.
        assert_eq!(bits("vllm-fp8-e4m3"), Some(8.0 + 32.0 / 4096.0));
    }
}
