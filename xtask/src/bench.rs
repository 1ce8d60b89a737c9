//! `cargo xtask bench`: throughput and memory of `kv-compress`, and the model
//! side of `kv-validate`, written to `docs/benchmarks.md`.
//!
//! The cache is TinyLlama-1.1B shaped (22 layers x key/value, [1, 4, 2048, 64]):
//! 92 MB in F32, 46 MB in F16. Each command runs several times; the table
//! reports the median wall time and the largest peak RSS, both measured on the
//! child alone (wait4), so the harness itself is never counted.

use crate::fetch_model::ensure_model;
use crate::util::{build_release_binaries, repo_root};
use anyhow::{bail, Context, Result};
use kvformat::codec::SplitMix64;
use kvformat::preset::{tensor_name, TensorKind};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A synthetic cache's shape: `layers` x key/value, each `[1, kv_heads, seq_len, head_dim]`.
#[derive(Clone, Copy)]
struct CacheShape {
    name: &'static str,
    layers: usize,
    kv_heads: usize,
    seq_len: usize,
    head_dim: usize,
}

impl CacheShape {
    fn values(&self) -> usize {
        2 * self.layers * self.kv_heads * self.seq_len * self.head_dim
    }

    fn bytes(&self, dtype: &str) -> usize {
        self.values() * if dtype == "F32" { 4 } else { 2 }
    }

    fn describe(&self) -> String {
        format!(
            "{} layers x key/value, [1, {}, {}, {}]",
            self.layers, self.kv_heads, self.seq_len, self.head_dim
        )
    }
}

/// The benchmark cache: one TinyLlama-1.1B window.
const TINYLLAMA: CacheShape = CacheShape {
    name: "tinyllama",
    layers: 22,
    kv_heads: 4,
    seq_len: 2048,
    head_dim: 64,
};

/// One Llama-2-7B window (MHA): the validator's largest exchange, 1.07 GB in BF16.
const LLAMA2_7B: CacheShape = CacheShape {
    name: "llama-2-7b",
    layers: 32,
    kv_heads: 32,
    seq_len: 2048,
    head_dim: 128,
};

struct Options {
    /// Fewer repetitions and no model benchmarks: a smoke run of the harness.
    quick: bool,
    /// A Python with torch + transformers + gguf + accelerate: also time
    /// PyTorch eager on the same model, the speed target's reference.
    torch_python: Option<String>,
    /// The Go original's binary: run side by side on the same files with
    /// the same flags, and the ratio printed.
    go: Option<PathBuf>,
}

impl Options {
    fn parse(args: &[String]) -> Result<Self> {
        let mut options = Options {
            quick: false,
            torch_python: None,
            go: None,
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--quick" => options.quick = true,
                "--torch" => {
                    options.torch_python = Some(
                        args.next()
                            .context("--torch needs a Python interpreter path")?
                            .clone(),
                    )
                }
                "--go" => {
                    options.go = Some(PathBuf::from(
                        args.next()
                            .context("--go needs the Go original's binary path")?,
                    ))
                }
                other => {
                    bail!("unknown bench argument `{other}` (expected --quick, --torch PYTHON or --go PATH)")
                }
            }
        }
        Ok(options)
    }
}

/// A command's name, the paths filling its template's empty slots for us
/// and for the Go original, and the template of its arguments.
type Case<'a> = (&'a str, Vec<&'a Path>, Vec<&'a Path>, Vec<&'a str>);

/// One measured command: wall times (fastest, median, slowest) and peak
/// resident memory.
struct Measurement {
    min: Duration,
    wall: Duration,
    max: Duration,
    peak_rss_bytes: u64,
}

pub fn run(args: &[String]) -> Result<()> {
    let options = Options::parse(args)?;
    let bin_dir = build_release_binaries()?;
    let kv_compress = bin_dir.join("kv-compress");
    let scratch = tempdir_in(&std::env::temp_dir(), "kv-bench")?;
    let repetitions = if options.quick { 1 } else { 5 };

    let mut report = String::new();
    writeln!(report, "# Benchmarks\n")?;
    writeln!(
        report,
        "Produced by `cargo xtask bench`{}; rerun it to refresh this file.\n",
        if options.quick { " --quick" } else { "" }
    )?;
    writeln!(report, "{}\n", machine_description())?;
    writeln!(report, "## kv-compress\n")?;
    writeln!(
        report,
        "TinyLlama-shaped cache: {}, random normal values. \
         {repetitions} runs each; MB/s is uncompressed cache bytes (10^6) per second of the median wall time, whole process \
         (start-up, reading, writing, fsync) included; peak RSS is the child's own maximum resident set.{}\n",
        TINYLLAMA.describe(),
        if options.go.is_some() {
            " The Go original ran on the same files with the same flags, interleaved run by run with ours \
             (its decompress reads its own packed file); \"Go x\" is its median wall time over ours."
        } else {
            ""
        }
    )?;
    let go_columns = if options.go.is_some() {
        " Go median (ms) | Go x |"
    } else {
        ""
    };
    let go_rule = if options.go.is_some() {
        "---:|---:|"
    } else {
        ""
    };
    writeln!(
        report,
        "| input | command | wall min / median / max (ms) | MB/s | peak RSS (MB) | RSS / input file |{go_columns}"
    )?;
    writeln!(report, "|---|---|---:|---:|---:|---:|{go_rule}")?;
    let mut family_inputs = Vec::new();
    for dtype in ["F32", "F16", "BF16"] {
        let input = scratch.join(format!("cache_{}.safetensors", dtype.to_lowercase()));
        generate_in_child(&input, dtype, TINYLLAMA)?;
        let input_bytes = TINYLLAMA.bytes(dtype);
        let packed = scratch.join("packed.safetensors");
        let restored = scratch.join("restored.safetensors");
        let go_packed = scratch.join("go_packed.safetensors");
        let go_restored = scratch.join("go_restored.safetensors");
        let cases: [Case<'_>; 3] = [
            (
                "compress",
                vec![&input, &packed],
                vec![&input, &go_packed],
                vec!["-input", "", "-output", ""],
            ),
            (
                "metrics-only",
                vec![&input],
                vec![&input],
                vec!["-input", "", "-metrics-only"],
            ),
            (
                "decompress",
                vec![&packed, &restored],
                vec![&go_packed, &go_restored],
                vec!["-decompress", "-input", "", "-output", ""],
            ),
        ];
        for (name, paths, go_paths, template) in cases {
            let ours = (kv_compress.as_path(), fill_paths(&template, &paths));
            let go = options
                .go
                .as_deref()
                .map(|go| (go, fill_paths(&template, &go_paths)));
            let (m, go_m) = measure_side_by_side(&ours, go.as_ref(), repetitions)?;
            let mb_s = input_bytes as f64 / 1e6 / m.wall.as_secs_f64();
            let rss_mb = m.peak_rss_bytes as f64 / 1e6;
            let file_mb = std::fs::metadata(paths[0])?.len() as f64 / 1e6;
            let go_cells = match &go_m {
                Some(go_m) => {
                    let ratio = go_m.wall.as_secs_f64() / m.wall.as_secs_f64();
                    eprintln!(
                        "bench: {dtype} {name}: Go original {:.1} ms, {ratio:.1}x our time",
                        ms(go_m.wall)
                    );
                    format!(" {:.1} | {ratio:.1}x |", ms(go_m.wall))
                }
                None => String::new(),
            };
            eprintln!(
                "bench: {dtype} {name}: {:.1} / {:.1} / {:.1} ms, {mb_s:.0} MB/s, peak RSS {rss_mb:.1} MB",
                ms(m.min),
                ms(m.wall),
                ms(m.max)
            );
            writeln!(
                report,
                "| {dtype} ({:.0} MB) | {name} | {:.1} / {:.1} / {:.1} | {mb_s:.0} | {rss_mb:.1} | {:.2}x |{go_cells}",
                input_bytes as f64 / 1e6,
                ms(m.min),
                ms(m.wall),
                ms(m.max),
                rss_mb / file_mb
            )?;
        }
        family_inputs.push((dtype, input));
    }
    report.push_str(&method_family_rows(
        &kv_compress,
        options.go.as_deref(),
        &family_inputs,
        &scratch,
        repetitions,
    )?);
    report.push_str(&exchange_rows(&kv_compress, repetitions)?);

    writeln!(
        report,
        "\nFor scale: the Go original takes about 4.3 s on the F32 file (about 22 MB/s) and writes a file as \
         large as its input. Targets (issue 11): compress and decompress F32 at 1,200 MB/s or more, metrics-only at 2,000, \
         F16 compress and decompress at 600 (the same values/s), at least 45x the Go original's speed; \
         peak memory at most 0.35x the input file for compress."
    )?;
    if options.quick {
        writeln!(report, "\nModel benchmarks skipped (--quick).")?;
    } else {
        model_benchmarks(
            &bin_dir,
            &scratch,
            options.torch_python.as_deref(),
            &mut report,
        )?;
    }
    std::fs::remove_dir_all(&scratch).ok();
    let out = repo_root().join("docs").join("benchmarks.md");
    // The GPU section is measured on another machine (xtask/gpu/): keep it.
    if let Some(gpu) = std::fs::read_to_string(&out)
        .ok()
        .and_then(|old| old.find(GPU_SECTION).map(|at| old[at..].to_string()))
    {
        report.push('\n');
        report.push_str(&gpu);
    }
    std::fs::write(&out, &report).with_context(|| format!("writing {}", out.display()))?;
    print!("{report}");
    eprintln!("bench: wrote {}", out.display());
    Ok(())
}

/// One row per method family of the default sweep matrix: the family and
/// the matrix variant that stands for it (its flags are the matrix's own).
const METHOD_FAMILIES: [(&str, &str); 8] = [
    ("ADR-002 (default)", "adr002-g64"),
    ("KIVI", "kivi4"),
    ("KIVI, rotated", "kivi4-rot"),
    ("KIVI, symmetric grid, rotated", "kivi4-sym-rot-sink4"),
    (
        "KIVI, rotated, `-fit mse`",
        "kivi4-rot-mse-k128-vf256-sink4",
    ),
    ("Lloyd-Max codebook", "lloyd4-rot-kch-sink4"),
    ("k-means codebook", "kmeans3-rot-kch-sink4"),
    ("ecsq (rANS coded)", "ecsq-r4.35-sink1"),
];

/// The flags of `variant` in kv-validate's default sweep matrix.
fn matrix_flags(variant: &str) -> Result<Vec<&'static str>> {
    kvformat::sweep_matrix::DEFAULT_MATRIX
        .iter()
        .find(|(label, _)| *label == variant)
        .map(|(_, flags)| flags.split_whitespace().collect())
        .with_context(|| format!("the default sweep matrix has no variant `{variant}`"))
}

/// kv-compress's step of the validator's exchange at 7B scale: one
/// Llama-2-7B window of BF16 cache, compressed and decompressed with the
/// flags kv-validate passes by default (its `CompressSettings::default()`),
/// where kv-validate puts its scratch files by default (its
/// `default_scratch_parent`: /dev/shm where there is one; xtask does not
/// link kv-validate, so the rule is restated here).
fn exchange_rows(kv_compress: &Path, repetitions: usize) -> Result<String> {
    let shm = Path::new("/dev/shm");
    let parent = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let dir = tempdir_in(&parent, "kv-bench-exchange")?;
    let result = (|| {
        let (cache, packed, decoded) = (
            dir.join("context.safetensors"),
            dir.join("packed.safetensors"),
            dir.join("decoded.safetensors"),
        );
        generate_in_child(&cache, "BF16", LLAMA2_7B)?;
        let bytes = LLAMA2_7B.bytes("BF16");
        let mut rows = String::new();
        writeln!(
            rows,
            "\nThe validator's exchange at 7B scale (issue 23): kv-compress on one Llama-2-7B window of BF16 cache \
             ({}; {:.2} GB) in {}, with the flags kv-validate passes by default \
             (`-group-size 64 -sparsity 0.0`, then `-decompress`), {repetitions} runs each, whole process.\n",
            LLAMA2_7B.describe(),
            bytes as f64 / 1e9,
            parent.display()
        )?;
        writeln!(
            rows,
            "| step | wall min / median / max (ms) | GB/s of cache | peak RSS (MB) |"
        )?;
        writeln!(rows, "|---|---:|---:|---:|")?;
        let steps: [(&str, Vec<&str>, [&Path; 2]); 2] = [
            (
                "compress",
                vec![
                    "-input",
                    "",
                    "-output",
                    "",
                    "-group-size",
                    "64",
                    "-sparsity",
                    "0.0",
                ],
                [&cache, &packed],
            ),
            (
                "decompress",
                vec!["-decompress", "-input", "", "-output", ""],
                [&packed, &decoded],
            ),
        ];
        let mut round_trip = Duration::ZERO;
        for (name, template, paths) in steps {
            let (m, _) = measure_side_by_side(
                &(kv_compress, fill_paths(&template, &paths)),
                None,
                repetitions,
            )?;
            round_trip += m.wall;
            let gb_s = bytes as f64 / 1e9 / m.wall.as_secs_f64();
            eprintln!(
                "bench: 7B exchange {name}: {:.1} ms, {gb_s:.2} GB/s",
                ms(m.wall)
            );
            writeln!(
                rows,
                "| {name} | {:.1} / {:.1} / {:.1} | {gb_s:.2} | {:.1} |",
                ms(m.min),
                ms(m.wall),
                ms(m.max),
                m.peak_rss_bytes as f64 / 1e6
            )?;
        }
        writeln!(
            rows,
            "| round trip (sum of medians) | {:.1} | {:.2} | |",
            ms(round_trip),
            bytes as f64 / 1e9 / round_trip.as_secs_f64()
        )?;
        Ok(rows)
    })();
    std::fs::remove_dir_all(&dir).ok();
    result
}

/// The method-family table: compress and decompress of each cache (`inputs`:
/// its dtype and file) with each family's flags; the Go original (ADR-002 on
/// F32 only) beside the default.
fn method_family_rows(
    kv_compress: &Path,
    go: Option<&Path>,
    inputs: &[(&str, PathBuf)],
    scratch: &Path,
    repetitions: usize,
) -> Result<String> {
    let mut rows = String::new();
    writeln!(
        rows,
        "\nMethod families of the default sweep matrix (`kv-validate --sweep`) on the same caches, \
         the matrix's flags, {repetitions} runs each, whole process; MB/s of the median, M values/s beside it. \
         Goal (issue 23): every family at 1,000 MB/s or more both ways on F32 (250 M values/s), F16 and BF16 \
         at the same values/s, decompress never slower than compress.{}\n",
        if go.is_some() { " The Go original has ADR-002 on F32 only: it runs beside that row." } else { "" }
    )?;
    let (go_columns, go_rule) = match go {
        Some(_) => (" Go compress / decompress median (ms) |", "---:|"),
        None => ("", ""),
    };
    writeln!(
        rows,
        "| method family | matrix variant | cache | compress min / median / max (ms) | MB/s | M values/s | decompress min / median / max (ms) | MB/s | M values/s | decompress / compress |{go_columns}"
    )?;
    writeln!(
        rows,
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|{go_rule}"
    )?;
    let packed = scratch.join("family_packed.safetensors");
    let restored = scratch.join("family_restored.safetensors");
    let go_packed = scratch.join("family_go_packed.safetensors");
    let go_restored = scratch.join("family_go_restored.safetensors");
    for (family, variant) in METHOD_FAMILIES {
        let flags = matrix_flags(variant)?;
        for (dtype, input) in inputs {
            let input_bytes = TINYLLAMA.bytes(dtype);
            let values = TINYLLAMA.values();
            let go = go.filter(|_| flags.is_empty() && *dtype == "F32");
            let mut compress = vec!["-input", "", "-output", ""];
            compress.extend(&flags);
            let decompress = ["-decompress", "-input", "", "-output", ""];
            let side_by_side = |template: &[&str], ours: [&Path; 2], theirs: [&Path; 2]| {
                measure_side_by_side(
                    &(kv_compress, fill_paths(template, &ours)),
                    go.map(|go| (go, fill_paths(template, &theirs))).as_ref(),
                    repetitions,
                )
            };
            let (c, go_c) = side_by_side(&compress, [input, &packed], [input, &go_packed])?;
            let (d, go_d) = side_by_side(
                &decompress,
                [&packed, &restored],
                [&go_packed, &go_restored],
            )?;
            let mb_s = |m: &Measurement| input_bytes as f64 / 1e6 / m.wall.as_secs_f64();
            let mvalues_s = |m: &Measurement| values as f64 / 1e6 / m.wall.as_secs_f64();
            eprintln!(
                "bench: {family} ({dtype}): compress {:.1} ms ({:.0} MB/s), decompress {:.1} ms ({:.0} MB/s)",
                ms(c.wall),
                mb_s(&c),
                ms(d.wall),
                mb_s(&d)
            );
            let go_cells = match (go_c, go_d) {
                (Some(go_c), Some(go_d)) => {
                    format!(" {:.1} / {:.1} |", ms(go_c.wall), ms(go_d.wall))
                }
                _ if go_columns.is_empty() => String::new(),
                _ => " — |".to_string(),
            };
            writeln!(
                rows,
                "| {family} | `{variant}` | {dtype} | {:.1} / {:.1} / {:.1} | {:.0} | {:.0} | {:.1} / {:.1} / {:.1} | {:.0} | {:.0} | {:.2}x |{go_cells}",
                ms(c.min),
                ms(c.wall),
                ms(c.max),
                mb_s(&c),
                mvalues_s(&c),
                ms(d.min),
                ms(d.wall),
                ms(d.max),
                mb_s(&d),
                mvalues_s(&d),
                d.wall.as_secs_f64() / c.wall.as_secs_f64()
            )?;
        }
    }
    Ok(rows)
}

/// The heading of docs/benchmarks.md's GPU section, which this task keeps as it is.
const GPU_SECTION: &str = "## GPU (NVIDIA H200)";

/// kv-validate on the offline model: forward-pass throughput, and where a
/// validation run's wall time goes.
fn model_benchmarks(
    bin_dir: &Path,
    scratch: &Path,
    torch_python: Option<&str>,
    report: &mut String,
) -> Result<()> {
    let model = ensure_model()?;
    let kv_validate = bin_dir.join("kv-validate");
    writeln!(
        report,
        "\n## kv-validate (SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to f32 at load, CPU)\n"
    )?;

    let forward_json = scratch.join("forward.json");
    let status = Command::new(&kv_validate)
        .arg("--gguf")
        .arg(&model)
        .args(["--bench-forward", "512,2048", "--quiet", "--json"])
        .arg(&forward_json)
        .status()
        .context("running kv-validate --bench-forward")?;
    if !status.success() {
        bail!("kv-validate --bench-forward failed ({status})");
    }
    let forward: serde_json::Value = serde_json::from_slice(&std::fs::read(&forward_json)?)?;
    let torch = match torch_python {
        Some(python) => Some(torch_reference(python, &model)?),
        None => None,
    };
    writeln!(report, "Forward pass of N random tokens from an empty cache, median of runs, tokens/s. \"prefill\": the cache and the last position's logits (what each window's context costs); \"all logits\": logits at every position too (what scoring costs, and PyTorch's default):\n")?;
    writeln!(report, "| context | kv-validate prefill | PyTorch eager prefill | kv-validate all logits | PyTorch eager all logits |")?;
    writeln!(report, "|---:|---:|---:|---:|---:|")?;
    let ours = forward["forward"]
        .as_array()
        .context("--bench-forward JSON has no `forward` array")?;
    for entry in ours {
        let reference = |key: &str| {
            torch
                .as_ref()
                .and_then(|t| {
                    t["forward"]
                        .as_array()?
                        .iter()
                        .find(|r| r["context"] == entry["context"])?[key]
                        .as_f64()
                })
                .map_or("not run (`--torch PYTHON`)".to_string(), |tps| {
                    format!("{tps:.0}")
                })
        };
        let ours = |key: &str| format!("{:.0}", entry[key].as_f64().unwrap_or(f64::NAN));
        writeln!(
            report,
            "| {} | {} | {} | {} | {} |",
            entry["context"],
            ours("tokens_per_second"),
            reference("tokens_per_second"),
            ours("all_logits_tokens_per_second"),
            reference("all_logits_tokens_per_second")
        )?;
    }
    writeln!(
        report,
        "\nTarget: at least PyTorch eager's tokens/s on the same model and CPU."
    )?;
    if let Some(torch) = &torch {
        writeln!(report, "\nPyTorch {} with {} threads, `xtask/python/torch_forward_bench.py` on the same GGUF (transformers dequantizes it to f32), eager attention.", torch["torch"].as_str().unwrap_or("?"), torch["threads"])?;
    }

    let validate_json = scratch.join("validate.json");
    let text = repo_root().join("testdata").join("prose.txt");
    let started = Instant::now();
    let status = Command::new(&kv_validate)
        .env("KV_COMPRESS_PATH", bin_dir.join("kv-compress"))
        .arg("--gguf")
        .arg(&model)
        .arg("--text-file")
        .arg(&text)
        .args(["--max-windows", "3", "--quiet", "--json"])
        .arg(&validate_json)
        .status()
        .context("running kv-validate")?;
    let wall = started.elapsed();
    if status.code() == Some(2) {
        bail!("kv-validate failed ({status})");
    }
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&validate_json)?)?;
    let timing = &v["timing"];
    writeln!(report, "\nWhere a validation run's time goes (`kv-validate --max-windows 3` on testdata/prose.txt, {:.1} s wall):\n", wall.as_secs_f64())?;
    writeln!(report, "Target: the compressor's share under 10%.\n")?;
    writeln!(report, "| part | seconds | share |")?;
    writeln!(report, "|---|---:|---:|")?;
    let total = timing["wall_seconds"]
        .as_f64()
        .unwrap_or(wall.as_secs_f64());
    for (key, label) in [
        ("model_seconds", "model forward passes"),
        ("cache_write_seconds", "writing caches"),
        ("compressor_seconds", "kv-compress (compress + decompress)"),
        ("cache_read_seconds", "reading caches"),
    ] {
        if let Some(s) = timing[key].as_f64() {
            writeln!(report, "| {label} | {s:.2} | {:.1}% |", 100.0 * s / total)?;
        }
    }
    Ok(())
}

/// Writes the synthetic cache from a child process: Linux carries a parent's
/// peak RSS across fork+exec into the child's `ru_maxrss`, so the measuring
/// process must never hold the generated tensors itself.
fn generate_in_child(path: &Path, dtype: &str, shape: CacheShape) -> Result<()> {
    let status = Command::new(std::env::current_exe()?)
        .args([GENERATE_TASK, dtype])
        .arg(path)
        .arg(shape.name)
        .status()
        .context("starting the cache generator")?;
    if !status.success() {
        bail!("generating {} failed ({status})", path.display());
    }
    Ok(())
}

/// The hidden task `generate_in_child` runs:
/// `__bench-cache F32|F16|BF16 PATH [tinyllama|llama-2-7b]`.
pub const GENERATE_TASK: &str = "__bench-cache";

pub fn generate_task(args: &[String]) -> Result<()> {
    let usage = || format!("usage: {GENERATE_TASK} F32|F16|BF16 PATH [tinyllama|llama-2-7b]");
    let (dtype, path, shape) = match args {
        [dtype, path] => (dtype, path, TINYLLAMA),
        [dtype, path, shape] => (
            dtype,
            path,
            [TINYLLAMA, LLAMA2_7B]
                .into_iter()
                .find(|s| s.name == shape)
                .with_context(usage)?,
        ),
        _ => bail!(usage()),
    };
    if !["F32", "F16", "BF16"].contains(&dtype.as_str()) {
        bail!(usage());
    }
    write_synthetic_cache(Path::new(path), dtype, shape)
}

/// Times PyTorch eager on the same model with `xtask/python/torch_forward_bench.py`.
fn torch_reference(python: &str, model: &Path) -> Result<serde_json::Value> {
    eprintln!("bench: PyTorch eager reference ({python})...");
    let script = repo_root()
        .join("xtask")
        .join("python")
        .join("torch_forward_bench.py");
    let output = Command::new(python)
        .arg(&script)
        .arg(model)
        .arg("512,2048")
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("starting {python}"))?;
    if !output.status.success() {
        bail!(
            "{} failed ({}); it needs torch, transformers, gguf and accelerate",
            script.display(),
            output.status
        );
    }
    serde_json::from_slice(&output.stdout).context("parsing the PyTorch reference's JSON")
}

/// Runs `program args` and, when given, the other (program, args)
/// `repetitions` times each, alternating run by run so that both see the
/// same machine state; wall times and max peak RSS of each.
fn measure_side_by_side(
    ours: &(&Path, Vec<String>),
    other: Option<&(&Path, Vec<String>)>,
    repetitions: usize,
) -> Result<(Measurement, Option<Measurement>)> {
    let mut ours_runs = Vec::with_capacity(repetitions);
    let mut other_runs = Vec::with_capacity(repetitions);
    for _ in 0..repetitions {
        ours_runs.push(run_once(ours.0, &ours.1)?);
        if let Some((program, args)) = other {
            other_runs.push(run_once(program, args)?);
        }
    }
    let ours = Measurement::of(ours_runs);
    Ok((ours, other.map(|_| Measurement::of(other_runs))))
}

impl Measurement {
    /// From (wall, peak RSS) of each run.
    fn of(mut runs: Vec<(Duration, u64)>) -> Measurement {
        let peak_rss_bytes = runs.iter().map(|&(_, rss)| rss).max().unwrap_or(0);
        runs.sort();
        Measurement {
            min: runs[0].0,
            wall: runs[runs.len() / 2].0,
            max: runs[runs.len() - 1].0,
            peak_rss_bytes,
        }
    }
}

/// One run of `program args`: its wall time and its own peak RSS.
fn run_once(program: &Path, args: &[String]) -> Result<(Duration, u64)> {
    let started = Instant::now();
    let child = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    let (ok, rss) = wait_with_rusage(child)?;
    let wall = started.elapsed();
    if !ok {
        bail!("{} {} failed", program.display(), args.join(" "));
    }
    Ok((wall, rss))
}

/// Waits for `child` with wait4 so that its own peak RSS is known.
fn wait_with_rusage(mut child: std::process::Child) -> Result<(bool, u64)> {
    let stderr = child.stderr.take();
    // Drain stderr on a thread so a chatty child never blocks on a full pipe.
    let drain = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut s) = stderr {
            use std::io::Read;
            s.read_to_string(&mut text).ok();
        }
        text
    });
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain old data; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if rc != pid {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    let text = drain.join().unwrap_or_default();
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    if !ok {
        eprintln!("{text}");
    }
    // Linux reports ru_maxrss in KiB.
    Ok((ok, usage.ru_maxrss as u64 * 1024))
}

fn fill_paths(template: &[&str], paths: &[&Path]) -> Vec<String> {
    let mut paths = paths.iter();
    template
        .iter()
        .map(|t| {
            if t.is_empty() {
                paths.next().expect("a path per slot").display().to_string()
            } else {
                t.to_string()
            }
        })
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `parent/name-PID`, created.
fn tempdir_in(parent: &Path, name: &str) -> Result<PathBuf> {
    let dir = parent.join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// CPU model, core count and date: a figure means little without them.
fn machine_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(repo_root())
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let flags = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("flags")).map(|l| {
                l.split(':')
                    .nth(1)
                    .unwrap_or("")
                    .split_whitespace()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
        })
        .unwrap_or_default();
    let features: Vec<&str> = [
        "sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512bw", "avx512dq",
        "avx512vl",
    ]
    .into_iter()
    .filter(|feature| flags.iter().any(|flag| flag == feature))
    .collect();
    let features = if features.is_empty() {
        "none of note".to_string()
    } else {
        features.join(" ")
    };
    format!(
        "Machine: {cpu}, {cores} cores available; CPU features: {features}; kvformat's kernels run at the {} level{}. \
         Commit {commit}, {date}.",
        kvformat::simd::level().name(),
        if std::env::var_os("KVFORMAT_SIMD").is_some() { " (capped by KVFORMAT_SIMD)" } else { "" }
    )
}

/// Writes a cache of `shape` with seeded random values through kvformat:
/// values standard normal, keys with a few 6x outlier channels as real
/// post-RoPE keys have, so the quantizer sees realistic group maxima.
fn write_synthetic_cache(path: &Path, dtype: &str, cache: CacheShape) -> Result<()> {
    let dtype = match dtype {
        "F32" => kvformat::CacheDtype::F32,
        "BF16" => kvformat::CacheDtype::BF16,
        _ => kvformat::CacheDtype::F16,
    };
    let shape = [1, cache.kv_heads, cache.seq_len, cache.head_dim];
    let per_tensor = cache.kv_heads * cache.seq_len * cache.head_dim;
    let mut rng = SplitMix64(0x6b76_2d62_656e_6368);
    let mut names = Vec::new();
    let mut data = Vec::new();
    for layer in 0..cache.layers {
        for kind in TensorKind::BOTH {
            let values: Vec<f32> = (0..per_tensor)
                .map(|i| {
                    let outlier = kind == TensorKind::Key && (i % cache.head_dim) % 16 == 3;
                    normal(&mut rng) * if outlier { 6.0 } else { 1.0 }
                })
                .collect();
            names.push(tensor_name(layer, kind));
            data.push(values);
        }
    }
    let tensors: Vec<kvformat::CacheTensor<'_>> = names
        .iter()
        .zip(&data)
        .map(|(name, values)| kvformat::CacheTensor {
            name,
            dtype,
            shape: &shape,
            values,
        })
        .collect();
    kvformat::write_cache(path, &tensors, &Default::default())
        .with_context(|| format!("writing the synthetic cache {}", path.display()))
}

/// Standard normal (Box-Muller, one of the pair) from the seeded generator:
/// the benchmark input must be the same every run.
fn normal(rng: &mut SplitMix64) -> f32 {
    let mut uniform = || ((rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    let (u, v) = (uniform(), uniform());
    ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_family_names_a_variant_of_the_matrix_and_only_the_default_has_no_flags() {
        for (family, variant) in METHOD_FAMILIES {
            let flags = matrix_flags(variant).unwrap();
            assert_eq!(flags.is_empty(), variant == "adr002-g64", "{family}");
        }
        assert!(matrix_flags("no-such-variant").is_err());
    }
}
