//! `kv-validate`: the command line over the library. It parses flags, wires
//! model, text, windows and compressor together, prints the report and maps
//! the outcome to the exit code (0 passed, 1 failed, 2 error).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use candle_core::DType;
use clap::{Args, Parser, Subcommand, ValueEnum};
use kvformat::CacheDtype;

use kv_validate::allocation::{allocate, probe_variants, DEFAULT_PROBE_FLAGS, PROBE_BITS};
use kv_validate::bench;
use kv_validate::bridge::{CompressSettings, CompressTimeout, KvCompress};
use kv_validate::capacity::{
    ensure_sweep_of_model, read_sweep, read_sweep_table, CapacityReport, GpuMemory, Method,
    WeightsDtype,
};
use kv_validate::data::{load_text, TextSource};
use kv_validate::evaluate::{
    default_scratch_parent, ensure_measurable, evaluate, EvalOptions, Evaluation,
};
use kv_validate::identity::{model_inputs, ContentIds};
use kv_validate::model::device::{dtype_name, open_device, DeviceRequest};
use kv_validate::model::load::{
    load_model, read_model_config, LoadedModel, ModelSource, DEFAULT_HUB_REPO,
};
use kv_validate::output::{self, FilePlan};
use kv_validate::perplexity::{plan_windows, Protocol};
use kv_validate::quick_test::run_quick_test;
use kv_validate::records::{combine, merge, RunRecords, WindowRange};
use kv_validate::report::{PassCriteria, RunDescription, ValidationReport};
use kv_validate::sweep::{ensure_unique_labels, SweepReport, SweepTable, Variant};

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

  # A sweep of exactly these variants (LABEL=kv-compress flags), judged by mean KLD
  kv-validate --gguf model.gguf --variant \"kivi3=-method kivi -bits 3\" --variant int8=-bits=8 \\
      --max-kld 0.01

  # Spread one validation over two GPUs: a slice of the windows each, then merge
  CUDA_VISIBLE_DEVICES=0 kv-validate --gguf model.gguf --windows 0..40 --records a.json &
  CUDA_VISIBLE_DEVICES=1 kv-validate --gguf model.gguf --windows 40..80 --records b.json &
  wait; kv-validate merge a.json b.json --json report.json

Exit status: 0 passed (delta < threshold, mean KLD < --max-kld when given),
1 failed, 2 error. A sweep exits 0 when some variant passes (the
recommendation exists), 1 when none does. A --windows slice exits 0 once its
records are written; `merge` exits like the run it completes.
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
#[command(
    name = "kv-validate",
    version,
    after_help = EXAMPLES,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    model: ModelArgs,
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
    /// Largest acceptable perplexity increase (compressed - baseline); a
    /// variant passes when its delta is below it. Default 0.5, unless
    /// --max-kld is given alone.
    #[arg(long, allow_negative_numbers = true)]
    threshold: Option<f64>,
    /// Pass criterion on fidelity instead of (or, with --threshold, besides)
    /// the delta: the mean KL(baseline ‖ compressed), in nats, over the tokens
    /// scored on a compressed cache must be below NATS.
    #[arg(long, value_name = "NATS", allow_negative_numbers = true)]
    max_kld: Option<f64>,
    /// Evaluate only windows START..END of the plan (0-based, END exclusive)
    /// and write their records to --records: a slice of the run, for
    /// `kv-validate merge` (one per GPU or machine).
    #[arg(long, value_name = "START..END", requires = "records")]
    windows: Option<WindowRange>,
    /// Write the run's per-window records (per-token NLLs, KLD, top-1,
    /// compressor metrics) as JSON to FILE (atomically); `kv-validate merge`
    /// turns one or more of them into the report.
    #[arg(long, value_name = "FILE")]
    records: Option<PathBuf>,
    /// No progress bars or status lines on stderr (the report still prints).
    #[arg(long)]
    quiet: bool,
    /// Instead of validating, time a forward pass of each of these context
    /// lengths (comma-separated, e.g. 512,2048), with the last position's
    /// logits and with all of them, and report tokens/s (cargo xtask bench).
    #[arg(long, value_name = "N,N,...", value_delimiter = ',', num_args = 1..)]
    bench_forward: Vec<usize>,
    #[command(flatten)]
    outputs: Outputs,
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
    /// Sweep the per-layer sensitivity probes instead of a matrix: each
    /// layer's keys, then its values, at each of --sensitivity-bits with
    /// every other tensor at 8 bits, and the all-8-bit "reference".
    /// `kv-validate allocate` turns the sweep's --json into the bits of
    /// every layer and kind for a bits/value budget.
    #[arg(long, conflicts_with_all = ["sweep", "variants"])]
    sensitivity: bool,
    /// The widths each probe quantizes its tensor at (comma-separated; fewer
    /// widths, fewer probes: 2 per layer and width, plus one).
    #[arg(
        long,
        value_name = "BITS,BITS,...",
        value_delimiter = ',',
        default_values_t = PROBE_BITS,
        value_parser = parse_probe_bits
    )]
    sensitivity_bits: Vec<u8>,
    /// The kv-compress flags every probe (and so the allocation) shares; no
    /// -bits, -key-bits, -value-bits, -layer-bits or -rate.
    #[arg(
        long,
        value_name = "FLAGS",
        default_value = DEFAULT_PROBE_FLAGS,
        allow_hyphen_values = true
    )]
    sensitivity_flags: String,
}

/// Which model; shared by a run and `capacity`.
#[derive(Debug, Args)]
struct ModelArgs {
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
}

impl ModelArgs {
    fn source(&self) -> ModelSource {
        match (&self.model_dir, &self.gguf) {
            (Some(dir), _) => ModelSource::LocalDir(dir.clone()),
            (None, Some(gguf)) => ModelSource::Gguf(gguf.clone()),
            (None, None) => ModelSource::Hub {
                repo: self.model.clone(),
                revision: self.revision.clone(),
            },
        }
    }
}

/// Where a report goes besides stdout; shared by a run and `merge`.
#[derive(Debug, Args)]
struct Outputs {
    /// Also write the report as JSON to FILE (atomically).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write the sweep table as CSV to FILE (atomically).
    #[arg(long, value_name = "FILE")]
    sweep_csv: Option<PathBuf>,
    /// Write the sweep as an SVG plot (delta against bits/value) to FILE (atomically).
    #[arg(long, value_name = "FILE.svg")]
    sweep_plot: Option<PathBuf>,
    /// Write the sweep as an SVG plot of mean KLD against bits/value to FILE (atomically).
    #[arg(long, value_name = "FILE.svg")]
    sweep_kld_plot: Option<PathBuf>,
}

impl Outputs {
    fn sweep_outputs(&self) -> bool {
        self.sweep_csv.is_some() || self.sweep_plot.is_some() || self.sweep_kld_plot.is_some()
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Combine the records of slices of one run (--windows START..END
    /// --records FILE) into the report a single run over all windows gives,
    /// figure for figure. The slices must share model, text, protocol,
    /// compressor, criteria and variants, and cover the plan's windows once.
    Merge {
        /// Records files, in any order.
        #[arg(required = true, value_name = "RECORDS.json")]
        files: Vec<PathBuf>,
        #[command(flatten)]
        outputs: Outputs,
    },
    /// Per-layer bits for a bits/value budget from a sensitivity sweep
    /// (kv-validate --sensitivity --json FILE): the bits of every layer's
    /// keys and values that minimize the sum of the probes' measured KLD
    /// increases within the budget (exactly, by dynamic programming), with
    /// the predicted bits/value and mean KLD, and the kv-compress flags.
    /// For probes with -grid ecsq, a fractional rate per tensor instead
    /// (reverse water filling from one probed width; -rate/-layer-bits).
    /// Measure the flags on other windows or text before trusting them.
    #[command(after_help = ALLOCATE_EXAMPLES)]
    Allocate {
        /// The sensitivity sweep's JSON report.
        #[arg(
            long,
            value_name = "FILE",
            required_unless_present = "records",
            conflicts_with = "records"
        )]
        sweep_json: Option<PathBuf>,
        /// Or the records of the sweep's slices (`--sensitivity --windows
        /// A..B --records FILE`), which need not cover the text: probes run
        /// on a few windows the evaluation does not use.
        #[arg(long, value_name = "FILE", num_args = 1..)]
        records: Vec<PathBuf>,
        /// The budget: largest bits/value the allocation may take.
        #[arg(long, value_name = "BITS")]
        bits: f64,
        /// Also write the allocation as JSON to FILE (atomically).
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Also write the kv-compress flags to FILE, one argument per line,
        /// nothing quoted: `xargs kv-compress -input IN -output OUT < FILE`
        /// or `kv-compress -input IN -output OUT $(cat FILE)` (atomically).
        #[arg(long, value_name = "FILE")]
        flags_file: Option<PathBuf>,
    },
    /// Serving capacity per KV-cache method, from the model's config alone
    /// (no weights are loaded): KV bytes per token and per request at FP16
    /// and at each method's bits/value, and the largest batch of concurrent
    /// requests that fits in GPU memory after the weights, for the traffic
    /// profiles 512→256, 1024→1024, 4096→512 and 10240→1536 prompt→output
    /// tokens (a request's cache holds both; a sliding-window layer at most
    /// its window). The weights' size is the parameter count of the
    /// config's model (embeddings, attention with its biases, the gated
    /// MLP, norms, the output head unless tied) times --weights-dtype;
    /// activations and framework overhead are not reserved, so real batches
    /// are somewhat smaller. Methods: fp16 and kv-compress's 8/4/3/2-bit
    /// grids at group 64, or fp16 and every row of --sweep-json with its
    /// measured delta and mean KLD.
    #[command(after_help = CAPACITY_EXAMPLES)]
    Capacity {
        #[command(flatten)]
        model: ModelArgs,
        /// GPU memory to plan for, e.g. 80GiB, 141GB or 81559MiB (decimal
        /// units are powers of 1000, binary ones of 1024; repeatable).
        /// Default: an H100 80GB (81559 MiB) and an H200 (143771 MiB), as
        /// nvidia-smi reports their memory.
        #[arg(long, value_name = "SIZE", value_parser = GpuMemory::parse)]
        gpu_memory: Vec<GpuMemory>,
        /// How the weights are held in GPU memory (int8/int4: one byte / half
        /// a byte per weight, scales not counted).
        #[arg(long, value_enum, default_value = "bf16")]
        weights_dtype: WeightsDtype,
        /// A sweep's JSON report (kv-validate --sweep --json FILE, or merge):
        /// its methods, their bits/value, delta and mean KLD. It must have
        /// run this model: its config_content (SHA-256 of config.json or of
        /// the GGUF) is checked.
        #[arg(long, value_name = "FILE")]
        sweep_json: Option<PathBuf>,
        /// Also write the report as JSON to FILE (atomically).
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Write an SVG plot of concurrent requests against bits/value on the
        /// first GPU, one line per profile, to FILE (atomically).
        #[arg(long, value_name = "FILE.svg")]
        plot: Option<PathBuf>,
    },
}

const ALLOCATE_EXAMPLES: &str = "\
Examples:
  # Probe every layer on 12 windows, then allocate for 3.35 bits/value
  kv-validate --gguf model.gguf --text-file calibration.txt --context 384 --targets 128 \\
      --max-windows 12 --sensitivity --json sensitivity.json
  kv-validate allocate --sweep-json sensitivity.json --bits 3.35
  # ecsq: one probe per tensor on a slice of held-out windows, rates by water filling
  kv-validate --gguf model.gguf --text-file calibration.txt --context 384 --targets 128 \\
      --windows 100..112 --records probes.json --sensitivity --sensitivity-bits 3 \\
      --sensitivity-flags \"-method kivi -grid ecsq -key-group-size 1024 -value-axis channel -value-group-size 1024 -sink-tokens 1\"
  kv-validate allocate --records probes.json --bits 3.35
  # Check the printed flags on windows the probes did not see
  kv-validate --gguf model.gguf --text-file held-out.txt --context 384 --targets 128 \\
      --variant \"allocated=FLAGS\"";

const CAPACITY_EXAMPLES: &str = "\
Examples:
  # TinyLlama from the hub (config.json only), on an H100 and an H200
  kv-validate capacity

  # A local model on a 24 GiB GPU, weights in int4, with a sweep's measured quality
  kv-validate capacity --model-dir ./SmolLM2 --gpu-memory 24GiB --weights-dtype int4 \\
      --sweep-json sweep.json --json capacity.json --plot capacity.svg";

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

/// A `--sensitivity-bits` width: one kv-compress takes, below the reference's 8.
fn parse_probe_bits(text: &str) -> Result<u8, String> {
    text.trim()
        .parse::<u8>()
        .ok()
        .filter(|bits| *bits < 8 && kvformat::codec::SUPPORTED_BITS.contains(bits))
        .ok_or_else(|| format!("{text:?} is not one of 2, 3, 4, 5, 6"))
}

/// The delta threshold when no criterion is given.
const DEFAULT_THRESHOLD: f64 = 0.5;

/// `--threshold` and `--max-kld`, checked; the default threshold unless `--max-kld` is alone.
fn pass_criteria(cli: &Cli) -> anyhow::Result<PassCriteria> {
    for (flag, value) in [("--threshold", cli.threshold), ("--max-kld", cli.max_kld)] {
        if let Some(value) = value.filter(|v| !(v.is_finite() && *v >= 0.0)) {
            bail!("{flag} must be a non-negative number, got {value}");
        }
    }
    Ok(PassCriteria {
        threshold: cli
            .threshold
            .or(cli.max_kld.is_none().then_some(DEFAULT_THRESHOLD)),
        max_kld: cli.max_kld,
    })
}

/// Runs the validation (or the merge); `Ok(passed)`.
fn run(cli: &Cli) -> anyhow::Result<bool> {
    file_plan(cli).check()?;
    match &cli.command {
        Some(Command::Merge { files, outputs }) => return run_merge(files, outputs),
        Some(Command::Allocate {
            sweep_json,
            records,
            bits,
            json,
            flags_file,
        }) => {
            let (table, source) = match sweep_json {
                Some(path) => (read_sweep_table(path)?, path.display().to_string()),
                None => (
                    sweep_table_of(records)?,
                    format!("{} records files", records.len()),
                ),
            };
            let allocation = allocate(&table, *bits)
                .with_context(|| format!("cannot allocate from {source}"))?;
            print!("{}", allocation.render_text());
            if let Some(path) = json {
                output::write_json(path, &allocation)?;
            }
            if let Some(path) = flags_file {
                output::write_atomically(path, allocation.flags_file()?)?;
            }
            return Ok(true);
        }
        Some(Command::Capacity {
            model,
            gpu_memory,
            weights_dtype,
            sweep_json,
            json,
            plot,
        }) => {
            run_capacity(
                model,
                gpu_memory,
                *weights_dtype,
                sweep_json.as_deref(),
                json.as_deref(),
                plot.as_deref(),
            )?;
            return Ok(true);
        }
        None => {}
    }
    let criteria = pass_criteria(cli)?;
    if cli.windows.is_some() && (cli.outputs.json.is_some() || cli.outputs.sweep_outputs()) {
        bail!(
            "--windows writes a slice's records only (--records); the report, JSON, CSV and \
             plots come from `kv-validate merge`"
        );
    }
    let settings = CompressSettings {
        group_size: cli.group_size,
        sparsity: cli.sparsity,
        extra_args: cli.compress_args.clone(),
    };
    let mut sweep = sweep_variants(cli)?;
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
        write_json(&cli.outputs, &report)?;
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
    let source = cli.model.source();
    status(&format!(
        "loading the model on {} in {}",
        opened.name,
        dtype_name(dtype)
    ));
    let loaded = load_model(&source, &opened.device, dtype, !cli.quiet)?;
    if !cli.bench_forward.is_empty() {
        return run_forward_benchmark(cli, &loaded, &opened.name);
    }
    if cli.sensitivity {
        let layers = loaded.model.config().num_hidden_layers;
        sweep = Some(probe_variants(
            layers,
            &cli.sensitivity_bits,
            &cli.sensitivity_flags,
        )?);
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

    let content = ContentIds::of_run(&source, &text.text, &tokens)?;

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
    let slice = match cli.windows {
        Some(range) => {
            // The whole run must measure something; this slice need not.
            ensure_measurable(&windows)?;
            range.within(windows.len()).map_err(anyhow::Error::msg)?
        }
        None => 0..windows.len(),
    };
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
        slice_start: cli.windows.map(|_| slice.start),
    };
    let variant_settings = match &sweep {
        Some(variants) => variants
            .iter()
            .map(|variant| variant.settings.clone())
            .collect(),
        None => vec![settings.clone()],
    };
    let evaluation = evaluate(
        &loaded.model,
        &tokens,
        &windows[slice.clone()],
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
        criteria,
        content,
    };
    let records = RunRecords::new(
        run,
        sweep.is_some(),
        sweep.unwrap_or_else(|| {
            vec![Variant {
                label: settings.label(),
                settings,
            }]
        }),
        windows.len(),
        evaluation.records.clone(),
        evaluation.timings.clone(),
    );
    if let Some(path) = &cli.records {
        records.write(path).context("cannot write the records")?;
    }
    if cli.windows.is_some() {
        status(&format!(
            "windows {}..{} of {} evaluated, records in {}; `kv-validate merge` combines the slices",
            slice.start,
            slice.end,
            windows.len(),
            cli.records.as_deref().unwrap_or(std::path::Path::new("-")).display()
        ));
        return Ok(true);
    }
    report(&cli.outputs, &records, &evaluation)
}

/// Every file the command reads and writes, with its flag: no output may be
/// an input or another output.
fn file_plan(cli: &Cli) -> FilePlan {
    let mut plan = FilePlan::default();
    plan.read(
        "the running kv-validate",
        std::env::current_exe().ok().as_deref(),
    );
    let model_files = |plan: &mut FilePlan, model: &ModelArgs| {
        let flag = if model.gguf.is_some() && model.model_dir.is_none() {
            "--gguf"
        } else {
            "a file of --model-dir"
        };
        plan.read_all(flag, &model_inputs(&model.source()));
    };
    let report_outputs = |plan: &mut FilePlan, outputs: &Outputs| {
        plan.write("--json", outputs.json.as_deref())
            .write("--sweep-csv", outputs.sweep_csv.as_deref())
            .write("--sweep-plot", outputs.sweep_plot.as_deref())
            .write("--sweep-kld-plot", outputs.sweep_kld_plot.as_deref());
    };
    match &cli.command {
        Some(Command::Merge { files, outputs }) => {
            plan.read_all("a merged records file", files);
            report_outputs(&mut plan, outputs);
        }
        Some(Command::Allocate {
            sweep_json,
            records,
            json,
            flags_file,
            ..
        }) => {
            plan.read("--sweep-json", sweep_json.as_deref())
                .read_all("--records", records)
                .write("--json", json.as_deref())
                .write("--flags-file", flags_file.as_deref());
        }
        Some(Command::Capacity {
            model,
            sweep_json,
            json,
            plot,
            ..
        }) => {
            model_files(&mut plan, model);
            plan.read("--sweep-json", sweep_json.as_deref())
                .write("--json", json.as_deref())
                .write("--plot", plot.as_deref());
        }
        None => {
            model_files(&mut plan, &cli.model);
            let compressor = KvCompress::locate().ok();
            plan.read("--text-file", cli.text_file.as_deref())
                .read("kv-compress", compressor.as_ref().map(KvCompress::program))
                .write("--records", cli.records.as_deref());
            report_outputs(&mut plan, &cli.outputs);
        }
    }
    plan
}

/// `kv-validate merge`: the report of the slices' combined records.
fn run_merge(files: &[PathBuf], outputs: &Outputs) -> anyhow::Result<bool> {
    let records = merge(files)?;
    if !records.sweep && outputs.sweep_outputs() {
        bail!("--sweep-csv, --sweep-plot and --sweep-kld-plot need the records of a sweep");
    }
    report(outputs, &records, &evaluation_of(&records))
}

/// The figures of every variant over the windows `records` hold.
fn evaluation_of(records: &RunRecords) -> Evaluation {
    let settings: Vec<CompressSettings> = records
        .variants
        .iter()
        .map(|v| v.settings.clone())
        .collect();
    Evaluation::from_records(&settings, records.windows.clone(), records.timings.clone())
}

/// The sweep table of the windows that slices' records hold (`allocate --records`).
fn sweep_table_of(files: &[PathBuf]) -> anyhow::Result<SweepTable> {
    let records = combine(files)?;
    if !records.sweep {
        bail!("allocate --records needs the records of a --sensitivity sweep");
    }
    let cache_dtype = CacheDtype::from_torch_name(&records.run.cache_dtype)
        .with_context(|| format!("unknown cache dtype {:?}", records.run.cache_dtype))?;
    let evaluation = evaluation_of(&records);
    Ok(SweepReport::new(&records.run, &evaluation, &records.variants, cache_dtype).table)
}

/// Prints and writes the report of `evaluation` (computed from `records`),
/// a sweep's or a validation's; `Ok(passed)`. A run and `merge` both end here.
fn report(
    outputs: &Outputs,
    records: &RunRecords,
    evaluation: &Evaluation,
) -> anyhow::Result<bool> {
    if records.sweep {
        let cache_dtype = CacheDtype::from_torch_name(&records.run.cache_dtype)
            .with_context(|| format!("unknown cache dtype {:?}", records.run.cache_dtype))?;
        return finish_sweep(
            outputs,
            &SweepReport::new(&records.run, evaluation, &records.variants, cache_dtype),
        );
    }
    let report = ValidationReport::new(&records.run, evaluation, &evaluation.variants[0]);
    print!("{}", report.render_text());
    write_json(outputs, &report)?;
    Ok(report.passed)
}

/// The sweep's variants (`--variant`s, else the built-in matrix with
/// `--sweep`), or `None` for a single-variant validation.
fn sweep_variants(cli: &Cli) -> anyhow::Result<Option<Vec<Variant>>> {
    if cli.sensitivity {
        // The probes need the model's layer count; checked here, made after loading.
        if let Some(word) = cli.sensitivity_flags.split_whitespace().find(|word| {
            let name = word.trim_start_matches('-');
            let name = name.split_once('=').map_or(name, |(name, _)| name);
            matches!(
                name,
                "bits" | "key-bits" | "value-bits" | "layer-bits" | "rate"
            )
        }) {
            bail!("--sensitivity-flags must not set bits ({word}): the probes choose them");
        }
        if cli.quick_test || !cli.bench_forward.is_empty() {
            bail!("--sensitivity needs a model and text: it cannot run with --quick-test or --bench-forward");
        }
        return Ok(None);
    }
    if !cli.sweep && cli.variants.is_empty() {
        if cli.outputs.sweep_outputs() {
            bail!("--sweep-csv, --sweep-plot and --sweep-kld-plot need --sweep or --variant");
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

/// Prints the sweep table, writes its CSV, plots and JSON; `Ok(some variant passed)`.
fn finish_sweep(outputs: &Outputs, report: &SweepReport) -> anyhow::Result<bool> {
    print!("{}", report.render_text());
    if let Some(path) = &outputs.sweep_csv {
        output::write_atomically(path, report.table.to_csv())?;
    }
    if let Some(path) = &outputs.sweep_plot {
        output::write_atomically(path, kv_validate::plot::render_svg(&report.table))?;
    }
    if let Some(path) = &outputs.sweep_kld_plot {
        output::write_atomically(path, kv_validate::plot::render_kld_svg(&report.table))?;
    }
    write_json(outputs, report)?;
    Ok(report.table.recommendation.is_some())
}

fn write_json(outputs: &Outputs, report: &impl serde::Serialize) -> anyhow::Result<()> {
    if let Some(path) = &outputs.json {
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
        &cli.outputs,
        &serde_json::json!({ "model": loaded.description, "device": device, "forward": speeds }),
    )?;
    Ok(true)
}

/// `kv-validate capacity`: prints the report, writes its JSON and plot.
fn run_capacity(
    model: &ModelArgs,
    gpu_memory: &[GpuMemory],
    weights_dtype: WeightsDtype,
    sweep_json: Option<&std::path::Path>,
    json: Option<&std::path::Path>,
    plot: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let source = model.source();
    let (config, config_file) = read_model_config(&source)?;
    let methods = match sweep_json {
        Some(path) => {
            let sweep = read_sweep(path)?;
            ensure_sweep_of_model(path, sweep.config_content.as_ref(), &config_file)?;
            Method::from_sweep(&sweep.table)
        }
        None => Method::defaults(),
    };
    let gpus = if gpu_memory.is_empty() {
        GpuMemory::defaults()
    } else {
        gpu_memory.to_vec()
    };
    let name = match &source {
        ModelSource::Hub { repo, revision } => format!("{repo}@{revision}"),
        ModelSource::LocalDir(path) | ModelSource::Gguf(path) => path.display().to_string(),
    };
    let report = CapacityReport::new(
        name,
        &config_file,
        &config,
        weights_dtype,
        &gpus,
        methods,
        sweep_json,
    )?;
    print!("{}", report.render_text());
    if let Some(path) = json {
        output::write_json(path, &report)?;
    }
    if let Some(path) = plot {
        output::write_atomically(path, report.render_svg())?;
    }
    Ok(())
}
