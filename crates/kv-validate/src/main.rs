//! `kv-validate`: the command line over the library. It parses flags, wires
//! model, text, windows and compressor together, prints the report and maps
//! the outcome to the exit code (0 passed, 1 failed, 2 error).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use candle_core::DType;
use clap::{Parser, ValueEnum};
use kvformat::CacheDtype;

use kv_validate::bench;
use kv_validate::bridge::{CompressSettings, CompressTimeout, KvCompress};
use kv_validate::data::{load_text, TextSource};
use kv_validate::evaluate::{default_scratch_parent, evaluate, EvalOptions};
use kv_validate::model::device::{dtype_name, open_device, DeviceRequest};
use kv_validate::model::load::{load_model, LoadedModel, ModelSource, DEFAULT_HUB_REPO};
use kv_validate::output;
use kv_validate::perplexity::{plan_windows, Protocol};
use kv_validate::quick_test::run_quick_test;
use kv_validate::report::{RunDescription, ValidationReport};
use kv_validate::sweep::{ensure_unique_labels, SweepReport, Variant};

const EXAMPLES: &str = "\
Examples:
  # The original's validation: TinyLlama on WikiText-2 from the hub
  kv-validate

  # Offline: a GGUF model and a local text, 4 windows only
  kv-validate --gguf .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf \\
      --text-file testdata/prose.txt --max-windows 4

  # Fixed windows: the cache of 384 context tokens is compressed, 128 tokens scored on it
  kv-validate --gguf model.gguf --text-file wiki.txt --context 384 --targets 128

  # Pass extra flags to kv-compress, write the figures as JSON
  kv-validate --group-size 32 --compress-arg=-bits --compress-arg=8 --json report.json

  # No model at all: a synthetic cache through the whole file contract
  kv-validate --quick-test

  # Compare methods: the built-in matrix, a table, CSV and a plot (docs/fidelity.md)
  kv-validate --gguf model.gguf --text-file wiki.txt --context 384 --targets 128 \\
      --sweep --sweep-csv sweep.csv --sweep-plot sweep.svg

  # A sweep of exactly these variants (LABEL=kv-compress flags)
  kv-validate --gguf model.gguf --variant \"kivi3=-method kivi -bits 3\" --variant int8=-bits=8

Exit status: 0 passed (delta < threshold), 1 failed, 2 error. A sweep exits 0
when some variant passes (the recommendation exists), 1 when none does.
kv-compress is found through KV_COMPRESS_PATH, beside this binary, bin/, then PATH.
It runs in a process group of its own, killed on --compress-timeout, on Ctrl-C
(SIGINT), SIGTERM or SIGHUP; the scratch directory of caches is removed then too.
The hub honours HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE.";

/// Measure the perplexity a compressed KV cache costs, end to end.
///
/// For each window of the text, the model prefills the context once, the
/// cache goes through kv-compress (compress, then -decompress) as files, and
/// the window's remaining tokens are scored both on the original cache
/// (baseline) and on the reconstruction (compressed).
#[derive(Debug, Parser)]
#[command(name = "kv-validate", version, after_help = EXAMPLES)]
struct Cli {
    /// Hugging Face model repository to download (or find in the HF cache).
    #[arg(long, value_name = "REPO", default_value = DEFAULT_HUB_REPO)]
    model: String,
    /// Revision (branch, tag or commit) of --model.
    #[arg(long, default_value = "main")]
    revision: String,
    /// A local Hugging Face model directory (config.json, safetensors, tokenizer.json).
    #[arg(long, value_name = "DIR", conflicts_with = "gguf")]
    model_dir: Option<PathBuf>,
    /// A GGUF model file with its embedded tokenizer.
    #[arg(long, value_name = "FILE")]
    gguf: Option<PathBuf>,
    /// Score this text file (read byte for byte) instead of WikiText-2 raw test.
    #[arg(long, value_name = "FILE")]
    text_file: Option<PathBuf>,
    /// Evaluate only the first N windows (quick runs).
    #[arg(long, value_name = "N")]
    max_windows: Option<usize>,
    /// Fixed windows: context tokens per window whose cache is compressed
    /// (back-to-back windows; needs --targets). Default: the original's
    /// sliding window (model context capped at 2048, stride 512).
    #[arg(long, value_name = "C", requires = "targets")]
    context: Option<usize>,
    /// Tokens scored per window after --context.
    #[arg(long, value_name = "T", requires = "context")]
    targets: Option<usize>,
    /// kv-compress -group-size.
    #[arg(long, default_value_t = 64)]
    group_size: u32,
    /// kv-compress -sparsity.
    #[arg(long, default_value_t = 0.0)]
    sparsity: f64,
    /// Kill a kv-compress run (compress or decompress) that takes longer than
    /// this. Default: 600 s plus 1800 s per GiB of the cache file.
    #[arg(long, value_name = "SECONDS", value_parser = parse_timeout)]
    compress_timeout: Option<Duration>,
    /// An extra kv-compress flag, passed through verbatim (repeatable; use
    /// --compress-arg=-flag for values that start with a dash).
    #[arg(long = "compress-arg", value_name = "ARG", allow_hyphen_values = true)]
    compress_args: Vec<String>,
    /// Element type of the cache files handed to kv-compress (default: the
    /// model's dtype, float32 with --quick-test). The baseline scores the cache
    /// rounded to it too, so the delta is compression alone.
    #[arg(long, value_enum)]
    cache_dtype: Option<CacheDtypeArg>,
    /// No model: push a synthetic cache with TinyLlama's dimensions (22 layers,
    /// 4 KV heads, head_dim 64) through write, compress, decompress and read,
    /// and check the compressor's metrics against our own. Passes when the
    /// contract holds; the threshold does not apply.
    #[arg(long)]
    quick_test: bool,
    /// Run on the CPU even when a GPU is available (the same as --device cpu).
    #[arg(long, conflicts_with = "device")]
    cpu: bool,
    /// Where the model runs: auto (GPU 0 when built with CUDA and one opens,
    /// else the CPU), cpu, cuda, or cuda:N. A GPU asked for but unavailable
    /// is an error.
    #[arg(long, value_name = "DEVICE", default_value = "auto")]
    device: DeviceRequest,
    /// Weights' and activations' element type: f32, f16 or bf16 (default:
    /// bf16 on a GPU, f32 on the CPU). GGUF weights are dequantized to it.
    #[arg(long, value_enum)]
    dtype: Option<DTypeArg>,
    /// Directory for each window's cache files (default: /dev/shm where it
    /// exists, else the temporary directory). A fresh subdirectory is made
    /// there and removed at the end.
    #[arg(long, value_name = "DIR")]
    scratch_dir: Option<PathBuf>,
    /// Largest acceptable perplexity increase (compressed - baseline).
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    threshold: f64,
    /// No progress bars or status lines on stderr (the report still prints).
    #[arg(long)]
    quiet: bool,
    /// Instead of validating, time a forward pass of each of these context
    /// lengths (comma-separated, e.g. 512,2048), with the last position's
    /// logits and with all of them, and report tokens/s (cargo xtask bench).
    #[arg(long, value_name = "N,N,...", value_delimiter = ',', num_args = 1..)]
    bench_forward: Vec<usize>,
    /// Also write the report as JSON to FILE (atomically).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Sweep the built-in matrix of methods and bit widths over the same
    /// windows, print a table and recommend the fewest bits that pass.
    #[arg(long)]
    sweep: bool,
    /// A sweep variant, LABEL=FLAGS (kv-compress flags, space-separated;
    /// repeatable). When given, the sweep is exactly these variants.
    #[arg(
        long = "variant",
        value_name = "LABEL=FLAGS",
        allow_hyphen_values = true
    )]
    variants: Vec<String>,
    /// Write the sweep table as CSV to FILE (atomically).
    #[arg(long, value_name = "FILE")]
    sweep_csv: Option<PathBuf>,
    /// Write the sweep as an SVG plot (delta against bits/value) to FILE (atomically).
    #[arg(long, value_name = "FILE.svg")]
    sweep_plot: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum CacheDtypeArg {
    Float32,
    Float16,
    Bfloat16,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DTypeArg {
    F32,
    F16,
    Bf16,
}

impl From<DTypeArg> for DType {
    fn from(arg: DTypeArg) -> Self {
        match arg {
            DTypeArg::F32 => DType::F32,
            DTypeArg::F16 => DType::F16,
            DTypeArg::Bf16 => DType::BF16,
        }
    }
}

/// The cache file dtype that stores a model dtype exactly.
fn cache_dtype_of(dtype: DType) -> CacheDtype {
    match dtype {
        DType::F16 => CacheDtype::F16,
        DType::BF16 => CacheDtype::BF16,
        _ => CacheDtype::F32,
    }
}

impl From<CacheDtypeArg> for CacheDtype {
    fn from(arg: CacheDtypeArg) -> Self {
        match arg {
            CacheDtypeArg::Float32 => CacheDtype::F32,
            CacheDtypeArg::Float16 => CacheDtype::F16,
            CacheDtypeArg::Bfloat16 => CacheDtype::BF16,
        }
    }
}

/// `--compress-timeout`: a positive number of seconds.
fn parse_timeout(text: &str) -> Result<Duration, String> {
    text.parse::<f64>()
        .ok()
        .filter(|seconds| *seconds > 0.0)
        .and_then(|seconds| Duration::try_from_secs_f64(seconds).ok())
        .ok_or_else(|| format!("expected a positive number of seconds, got {text:?}"))
}

fn main() -> ExitCode {
    // candle captures a backtrace into every error it makes when
    // RUST_BACKTRACE is set, and prints it as part of the error's text. Error
    // values carry none here (panics still get theirs), so every error stays
    // one line; an explicit RUST_LIB_BACKTRACE still wins. Set before any
    // thread exists and before the first capture reads it.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    let cli = Cli::parse();
    if let Err(error) = kv_validate::cleanup::install_signal_handlers() {
        eprintln!("error: cannot handle SIGINT/SIGTERM: {error}");
        return ExitCode::from(2);
    }
    match run(&cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("error: {}", one_line(&error));
            ExitCode::from(2)
        }
    }
}

/// The error and its causes on one line, each cause once: errors whose
/// message already shows their source (thiserror's `{source}`) would
/// otherwise print it twice.
fn one_line(error: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !message.contains(text.trim()) {
            if !message.is_empty() {
                message.push_str(": ");
            }
            message.push_str(&text);
        }
    }
    message
        .lines()
        .map(str::trim_end)
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Runs the validation; `Ok(passed)`.
fn run(cli: &Cli) -> anyhow::Result<bool> {
    if !(cli.threshold.is_finite() && cli.threshold >= 0.0) {
        bail!(
            "--threshold must be a non-negative number, got {}",
            cli.threshold
        );
    }
    let settings = CompressSettings {
        group_size: cli.group_size,
        sparsity: cli.sparsity,
        extra_args: cli.compress_args.clone(),
    };
    let sweep = sweep_variants(cli)?;
    let compressor = KvCompress::locate()?.with_timeout(
        cli.compress_timeout
            .map_or(CompressTimeout::ScaledWithCache, CompressTimeout::Fixed),
    );
    let status = |message: &str| {
        if !cli.quiet {
            eprintln!("{message}");
        }
    };

    if cli.quick_test {
        status(&format!(
            "quick test with {}",
            compressor.program().display()
        ));
        let cache_dtype = cli.cache_dtype.map_or(CacheDtype::F32, CacheDtype::from);
        let report = run_quick_test(&compressor, &settings, cache_dtype)?;
        print!("{}", report.render_text());
        write_json(cli, &report)?;
        return Ok(report.passed);
    }

    let opened = open_device(if cli.cpu {
        DeviceRequest::Cpu
    } else {
        cli.device
    })?;
    if let Some(reason) = &opened.fallback_reason {
        status(reason);
    }
    let dtype = cli
        .dtype
        .map_or_else(|| opened.default_dtype(), DType::from);
    let cache_dtype = cli
        .cache_dtype
        .map_or_else(|| cache_dtype_of(dtype), CacheDtype::from);
    let source = match (&cli.model_dir, &cli.gguf) {
        (Some(dir), _) => ModelSource::LocalDir(dir.clone()),
        (None, Some(gguf)) => ModelSource::Gguf(gguf.clone()),
        (None, None) => ModelSource::Hub {
            repo: cli.model.clone(),
            revision: cli.revision.clone(),
        },
    };
    status(&format!(
        "loading the model on {} in {}",
        opened.name,
        dtype_name(dtype)
    ));
    let loaded = load_model(&source, &opened.device, dtype, !cli.quiet)?;
    if !cli.bench_forward.is_empty() {
        return run_forward_benchmark(cli, &loaded, &opened.name);
    }
    let text_source = match &cli.text_file {
        Some(path) => TextSource::File(path.clone()),
        None => TextSource::default(),
    };
    status("loading the text");
    let text = load_text(&text_source, !cli.quiet)?;
    let tokens = loaded
        .tokenizer
        .encode(text.text.as_str(), true)
        .map_err(|error| anyhow::anyhow!("cannot tokenize {}: {error}", text.description))?
        .get_ids()
        .to_vec();

    let max_positions = loaded.model.config().max_position_embeddings;
    let protocol = match (cli.context, cli.targets) {
        (Some(context), Some(targets)) => Protocol::ContextTargets { context, targets },
        _ => Protocol::sliding_for_model(max_positions),
    };
    if protocol.window_len() > max_positions {
        bail!(
            "a window of {} tokens exceeds the model's context of {max_positions} tokens",
            protocol.window_len()
        );
    }
    let windows = plan_windows(tokens.len(), protocol, cli.max_windows)?;
    let protocol_text = match protocol {
        Protocol::Sliding { max_len, stride } => {
            format!("sliding window of {max_len} tokens, stride {stride}")
        }
        Protocol::ContextTargets { context, targets } => {
            format!("back-to-back windows of {context} context + {targets} scored tokens")
        }
    } + &format!("; {} windows over {} tokens", windows.len(), tokens.len());
    status(&format!("{}; {protocol_text}", loaded.description));

    let options = EvalOptions {
        cache_dtype,
        model_name: loaded.description.clone(),
        show_progress: !cli.quiet,
        scratch_parent: cli
            .scratch_dir
            .clone()
            .unwrap_or_else(default_scratch_parent),
    };
    let variant_settings = match &sweep {
        Some(variants) => variants
            .iter()
            .map(|variant| variant.settings.clone())
            .collect(),
        None => vec![settings],
    };
    let evaluation = evaluate(
        &loaded.model,
        &tokens,
        &windows,
        &compressor,
        &variant_settings,
        &options,
    )?;
    let run = RunDescription {
        model: loaded.description.clone(),
        data: text.description,
        protocol: protocol_text,
        compressor: compressor.program().display().to_string(),
        device: opened.name.clone(),
        cache_dtype: cache_dtype.torch_name().to_string(),
        threshold: cli.threshold,
    };
    if let Some(variants) = &sweep {
        return finish_sweep(
            cli,
            &SweepReport::new(&run, &evaluation, variants, cache_dtype),
        );
    }
    let report = ValidationReport::new(&run, &evaluation, &evaluation.variants[0]);
    print!("{}", report.render_text());
    write_json(cli, &report)?;
    Ok(report.passed)
}

/// The sweep's variants (`--variant`s, else the built-in matrix with
/// `--sweep`), or `None` for a single-variant validation.
fn sweep_variants(cli: &Cli) -> anyhow::Result<Option<Vec<Variant>>> {
    if !cli.sweep && cli.variants.is_empty() {
        if cli.sweep_csv.is_some() || cli.sweep_plot.is_some() {
            bail!("--sweep-csv and --sweep-plot need --sweep or --variant");
        }
        return Ok(None);
    }
    if cli.quick_test || !cli.bench_forward.is_empty() {
        bail!("a sweep needs a model and text: it cannot run with --quick-test or --bench-forward");
    }
    let variants = if cli.variants.is_empty() {
        Variant::default_matrix()
    } else {
        cli.variants
            .iter()
            .map(|spec| Variant::parse(spec))
            .collect::<Result<Vec<_>, _>>()?
    };
    ensure_unique_labels(&variants)?;
    Ok(Some(variants))
}

/// Prints the sweep table, writes its CSV, plot and JSON; `Ok(some variant passed)`.
fn finish_sweep(cli: &Cli, report: &SweepReport) -> anyhow::Result<bool> {
    print!("{}", report.render_text());
    if let Some(path) = &cli.sweep_csv {
        output::write_atomically(path, report.table.to_csv())?;
    }
    if let Some(path) = &cli.sweep_plot {
        output::write_atomically(path, kv_validate::plot::render_svg(&report.table))?;
    }
    write_json(cli, report)?;
    Ok(report.table.recommendation.is_some())
}

fn write_json(cli: &Cli, report: &impl serde::Serialize) -> anyhow::Result<()> {
    if let Some(path) = &cli.json {
        output::write_json(path, report).context("cannot write the JSON report")?;
    }
    Ok(())
}

/// Runs the dedicated forward-pass benchmark: a table on stdout, JSON with `--json`.
fn run_forward_benchmark(cli: &Cli, loaded: &LoadedModel, device: &str) -> anyhow::Result<bool> {
    /// Median of this many timed prefills per length.
    const RUNS: usize = 3;
    let max_positions = loaded.model.config().max_position_embeddings;
    if let Some(&too_long) = cli
        .bench_forward
        .iter()
        .find(|&&n| n == 0 || n > max_positions)
    {
        bail!(
            "--bench-forward {too_long}: lengths must be 1..={max_positions} (the model's context)"
        );
    }
    let speeds = bench::bench_forward(&loaded.model, &cli.bench_forward, RUNS)?;
    let model = format!("{} on {device}", loaded.description);
    print!("{}", bench::render_table(&model, &speeds));
    write_json(
        cli,
        &serde_json::json!({ "model": loaded.description, "device": device, "forward": speeds }),
    )?;
    Ok(true)
}
