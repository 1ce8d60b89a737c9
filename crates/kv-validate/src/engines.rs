//! Issue 19's engines matrix (`--sweep --matrix engines`): every KV-cache
//! format an inference engine ships (kvformat's engine grids, bit-exact)
//! beside the best research methods at similar bits, the report grouped by
//! engine, and the deploy line: the exact engine flags of the recommended
//! setting where an engine offers exactly it, and a plain statement where not.

use kv_compress::flags::Method;
use kvformat::codec::{Grid, GRIDS};

use crate::run_types::Variant;
use crate::sweep::{SweepRow, SweepTable};

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

fn engine_name(row: &SweepRow) -> &'static str {
    engine_grid(&row.flags)
        .and_then(|grid| grid.spec().engine.as_ref())
        .map_or("research (kv-compress only)", |engine| engine.engine)
}

/// The table's rows grouped by engine, each group by bits/value.
pub fn render_by_engine(table: &SweepTable) -> Vec<String> {
    let mut engines: Vec<&str> = table.rows.iter().map(engine_name).collect();
    engines.dedup();
    engines.sort();
    engines.dedup();
    let mut lines = vec!["By engine (bits/value, delta, mean KLD, top-1 %):".to_string()];
    for engine in engines {
        lines.push(format!("  {engine}"));
        for row in table.rows.iter().filter(|row| engine_name(row) == engine) {
            lines.push(format!(
                "    {:<32} {:>7.3}  {:>+9.4}  {:>9}  {:>6}  {}",
                row.label,
                row.bits_per_value,
                row.delta,
                row.kld_mean.map_or("-".into(), |k| format!("{k:.6}")),
                row.top1_agreement_percent
                    .map_or("-".into(), |t| format!("{t:.2}")),
                if row.passed { "passes" } else { "fails" }
            ));
        }
    }
    lines
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

/// The deploy line: for the recommended row, the engine flags where an
/// engine ships it; else that no engine does, and the engine formats that pass.
pub fn deploy_lines(table: &SweepTable) -> Vec<String> {
    let Some(best) = table.recommended() else {
        return vec!["Deploy: nothing passed, so no engine setting is recommended.".into()];
    };
    if let Some(grid) = engine_grid(&best.flags) {
        let mut lines = vec![format!("Deploy {} as:", best.label)];
        lines.extend(
            deploy_commands(grid, &best.flags)
                .into_iter()
                .map(|c| format!("  {c}")),
        );
        return lines;
    }
    let mut lines = vec![format!(
        "Deploy: the recommended {} is kv-compress's own format; no inference engine ships it.",
        best.label
    )];
    let passing = table
        .rows
        .iter()
        .filter(|row| row.passed)
        .find_map(|row| engine_grid(&row.flags).map(|grid| (row, grid)));
    match passing {
        Some((row, grid)) => {
            lines.push(format!(
                "  The fewest-bits engine format that passes is {} ({:.3} bits/value):",
                row.label, row.bits_per_value
            ));
            lines.extend(
                deploy_commands(grid, &row.flags)
                    .into_iter()
                    .map(|c| format!("    {c}")),
            );
        }
        None => lines.push("  No engine format passes the criteria.".into()),
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::tests::table_of;

    #[test]
    fn the_matrix_has_every_engine_format_and_parses() {
        let matrix = engines_matrix();
        crate::sweep::ensure_unique_labels(&matrix).unwrap();
        let engine_rows = matrix
            .iter()
            .filter(|v| engine_grid(&v.settings.extra_args.join(" ")).is_some())
            .count();
        assert_eq!(engine_rows, 5 + 2 * 2);
    }

    #[test]
    fn deploy_line_gives_engine_flags_or_says_no_engine_ships_it() {
        let mut table = table_of(&[("llama-q4_0", 4.5, 10.1), ("ecsq", 4.35, 10.05)]);
        for row in &mut table.rows {
            row.flags = if row.label == "ecsq" {
                "-grid ecsq -rate 4.35".into()
            } else {
                "-method llama-q4_0".into()
            };
        }
        let text = deploy_lines(&table).join("\n");
        assert!(text.contains("no inference engine ships it"), "{text}");
        assert!(text.contains("-ctk q4_0 -ctv q4_0 -fa on"), "{text}");
        assert!(text.contains("LLAMA_ATTN_ROT_DISABLE=1"), "{text}");
        let fp8 = deploy_commands(Grid::Fp8E4m3, "-method vllm-fp8-e4m3 -fp8-scale calibrated")
            .join("\n");
        assert!(
            fp8.contains("vllm serve MODEL --kv-cache-dtype fp8_e4m3 --calculate-kv-scales"),
            "{fp8}"
        );
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
