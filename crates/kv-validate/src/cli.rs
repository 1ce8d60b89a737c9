//! kv-validate's command line: the clap types, their help and examples.
//! What a command line means is resolved by [`crate::plan`]; nothing here
//! runs anything.

use std::path::PathBuf;
use std::time::Duration;

use clap::builder::TypedValueParser;
use clap::{Args, Parser, Subcommand, ValueEnum};
use kvformat::preset::DEFAULT_GROUP_SIZE;
use kvformat::CacheDtype;

use crate::allocation::{DEFAULT_PROBE_FLAGS, PROBE_BITS};
use crate::capacity::{GpuMemory, WeightsDtype};
use crate::evaluate::{DEFAULT_PIPELINE_DEPTH, MAX_PIPELINE_DEPTH};
use crate::model::device::{DeviceRequest, ModelDtype};
use crate::model::load::{ModelSource, DEFAULT_HUB_REPO};
use crate::records::WindowRange;
use crate::shard::Shard;

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

  # Long context: KLD of each method as the context grows, and passkey retrieval
  kv-validate --gguf model.gguf --text-file long.txt --context-lengths 512,2048,8192 \\
      --targets 64 --max-windows 2 --sweep --context-plot lengths.svg --json lengths.json
  kv-validate --gguf model.gguf --passkey --passkey-lengths 1024,4096 \\
      --passkey-depths 0,50,100 --variant \"kivi3=-method kivi -bits 3\" --passkey-plot passkey.svg

  # Spread one validation over two GPUs: a slice of the windows each, then merge
  CUDA_VISIBLE_DEVICES=0 kv-validate --gguf model.gguf --windows 0..40 --records a.json &
  CUDA_VISIBLE_DEVICES=1 kv-validate --gguf model.gguf --windows 40..80 --records b.json &
  wait; kv-validate merge a.json b.json --json report.json

  # The same on one host in one command: a worker per GPU, one report
  kv-validate --gguf model.gguf --devices all --json report.json

  # A cluster: shard I of N per job (Slurm array, Kubernetes Indexed Job;
  # docs/scaling.md), then merge the records
  kv-validate --gguf model.gguf --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT \\
      --records /shared/run/shard-$SLURM_ARRAY_TASK_ID.json
  kv-validate merge /shared/run/shard-*.json --json report.json

Exit status: 0 passed (delta < threshold, mean KLD < --max-kld when given),
1 failed, 2 error. A sweep exits 0 when some variant passes (the
recommendation exists), 1 when none does. A --windows or --shard slice exits 0
once its records are written; `merge` exits like the run it completes.
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
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Score this text file (read byte for byte) instead of WikiText-2 raw test.
    #[arg(long, value_name = "FILE")]
    pub text_file: Option<PathBuf>,
    /// Evaluate only the first N windows (quick runs).
    #[arg(long, value_name = "N")]
    pub max_windows: Option<usize>,
    /// Fixed windows: context tokens per window whose cache is compressed
    /// (back-to-back windows; needs --targets). Default: the original's
    /// sliding window (model context capped at 2048, stride 512).
    #[arg(
        long,
        value_name = "C",
        requires = "targets",
        conflicts_with = "context_lengths"
    )]
    pub context: Option<usize>,
    /// Tokens scored per window after --context (or after each of --context-lengths).
    #[arg(long, value_name = "T")]
    pub targets: Option<usize>,
    /// kv-compress -group-size.
    #[arg(long, default_value_t = DEFAULT_GROUP_SIZE as u32)]
    pub group_size: u32,
    /// kv-compress -sparsity.
    #[arg(long, default_value_t = 0.0)]
    pub sparsity: f64,
    /// Kill a kv-compress run (compress or decompress) that takes longer than
    /// this. Default: 600 s plus 1800 s per GiB of the cache file.
    #[arg(long, value_name = "SECONDS", value_parser = parse_timeout)]
    pub compress_timeout: Option<Duration>,
    /// An extra kv-compress flag, passed through verbatim (repeatable; use
    /// --compress-arg=-flag for values that start with a dash).
    #[arg(long = "compress-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub compress_args: Vec<String>,
    /// Element type of the cache files handed to kv-compress (default: the
    /// model's dtype, float32 with --quick-test). The baseline scores the cache
    /// rounded to it too, so the delta is compression alone.
    #[arg(long, value_enum)]
    pub cache_dtype: Option<CacheDtypeArg>,
    /// No model: push a synthetic cache with TinyLlama's dimensions (22 layers,
    /// 4 KV heads, head_dim 64) through write, compress, decompress and read,
    /// and check the compressor's metrics against our own. Passes when the
    /// contract holds; the threshold does not apply.
    #[arg(long)]
    pub quick_test: bool,
    /// Run on the CPU even when a GPU is available (the same as --device cpu).
    #[arg(long, conflicts_with = "device")]
    pub cpu: bool,
    /// Where the model runs: auto (GPU 0 when built with CUDA and one opens,
    /// else the CPU), cpu, cuda, or cuda:N. A GPU asked for but unavailable
    /// is an error.
    #[arg(long, value_name = "DEVICE", default_value = "auto")]
    pub device: DeviceRequest,
    /// Weights' and activations' element type: f32, f16 or bf16 (default:
    /// bf16 on a GPU, f32 on the CPU). GGUF weights are dequantized to it.
    #[arg(long, value_enum)]
    pub dtype: Option<ModelDtype>,
    /// Directory for each window's cache files (default: /dev/shm where it
    /// exists, else the temporary directory). A fresh subdirectory is made
    /// there and removed at the end.
    #[arg(long, value_name = "DIR")]
    pub scratch_dir: Option<PathBuf>,
    /// Windows in flight at once: while kv-compress works on one window's
    /// cache, the model prefills the next and scores the one before. 1 runs
    /// one window after another; the report is the same either way (only
    /// the time split differs). Each window in flight holds its cache on the
    /// model's device, up to three copies of its cache size in host memory
    /// (the cache, a reconstruction being read and one waiting) and one
    /// variant's files in --scratch-dir.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_PIPELINE_DEPTH,
          value_parser = clap::value_parser!(u16).range(1..=MAX_PIPELINE_DEPTH as i64).map(usize::from))]
    pub pipeline_depth: usize,
    /// Largest acceptable perplexity increase (compressed - baseline); a
    /// variant passes when its delta is below it. Default 0.5, unless
    /// --max-kld is given alone.
    #[arg(long, allow_negative_numbers = true)]
    pub threshold: Option<f64>,
    /// Pass criterion on fidelity instead of (or, with --threshold, besides)
    /// the delta: the mean KL(baseline ‖ compressed), in nats, over the tokens
    /// scored on a compressed cache must be below NATS.
    #[arg(long, value_name = "NATS", allow_negative_numbers = true)]
    pub max_kld: Option<f64>,
    /// Evaluate only windows START..END of the plan (0-based, END exclusive)
    /// and write their records to --records: a slice of the run, for
    /// `kv-validate merge` (one per GPU or machine).
    #[arg(long, value_name = "START..END", requires = "records")]
    pub windows: Option<WindowRange>,
    /// Evaluate only shard I of N balanced shards of the plan's windows
    /// (0-based; sizes differ by at most one window) and write their records
    /// to --records: one command line for a Slurm job array
    /// (`--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT`) or a
    /// Kubernetes Indexed Job; `kv-validate merge` combines them
    /// (docs/scaling.md).
    #[arg(
        long,
        value_name = "I/N",
        requires = "records",
        conflicts_with = "windows"
    )]
    pub shard: Option<Shard>,
    /// Run on several devices of this host at once: the windows (or those of
    /// --windows/--shard) split into balanced parts, one worker process per
    /// device (comma-separated: cuda:0,cuda:1; cpu,cpu; or all, every CUDA
    /// GPU), their records merged into the report a single device gives.
    #[arg(long, value_name = "D,D,...|all", conflicts_with_all = ["device", "cpu", "quick_test", "bench_forward", "worker_shard"])]
    pub devices: Option<String>,
    /// A worker's part (J/D) of its parent's windows; set by --devices.
    #[arg(long, value_name = "J/D", hide = true, requires = "records")]
    pub worker_shard: Option<Shard>,
    /// Write the run's per-window records (per-token NLLs, KLD, top-1,
    /// compressor metrics) as JSON to FILE (atomically); `kv-validate merge`
    /// turns one or more of them into the report.
    #[arg(long, value_name = "FILE")]
    pub records: Option<PathBuf>,
    /// No progress bars or status lines on stderr (the report still prints).
    #[arg(long)]
    pub quiet: bool,
    /// Instead of validating, time a forward pass of each of these context
    /// lengths (comma-separated, e.g. 512,2048), with the last position's
    /// logits and with all of them, and report tokens/s (cargo xtask bench).
    #[arg(long, value_name = "N,N,...", value_delimiter = ',', num_args = 1..)]
    pub bench_forward: Vec<usize>,
    #[command(flatten)]
    pub outputs: Outputs,
    #[command(flatten)]
    pub long_context: LongContextArgs,
    /// Sweep the built-in matrix of methods and bit widths over the same
    /// windows, print a table and recommend the fewest bits that pass.
    #[arg(long)]
    pub sweep: bool,
    /// The matrix --sweep runs: default (kv-compress's methods and bit
    /// widths) or engines (every KV-cache format vLLM, SGLang, llama.cpp,
    /// TensorRT-LLM and transformers' QuantizedCache ship, bit-exact, beside
    /// the best research methods at similar bits; the report grouped by
    /// engine, with the engine flags to deploy).
    #[arg(long, value_enum, default_value_t = Matrix::Default, requires = "sweep")]
    pub matrix: Matrix,
    /// A sweep variant, LABEL=FLAGS (kv-compress flags, space-separated;
    /// repeatable). When given, the sweep is exactly these variants.
    #[arg(
        long = "variant",
        value_name = "LABEL=FLAGS",
        allow_hyphen_values = true
    )]
    pub variants: Vec<String>,
    /// Sweep the per-layer sensitivity probes instead of a matrix: each
    /// layer's keys, then its values, at each of --sensitivity-bits with
    /// every other tensor at 8 bits, and the all-8-bit "reference".
    /// `kv-validate allocate` turns the sweep's --json into the bits of
    /// every layer and kind for a bits/value budget.
    #[arg(long, conflicts_with_all = ["sweep", "variants"])]
    pub sensitivity: bool,
    /// The widths each probe quantizes its tensor at (comma-separated; fewer
    /// widths, fewer probes: 2 per layer and width, plus one).
    #[arg(
        long,
        value_name = "BITS,BITS,...",
        value_delimiter = ',',
        default_values_t = PROBE_BITS,
        value_parser = parse_probe_bits
    )]
    pub sensitivity_bits: Vec<u8>,
    /// The kv-compress flags every probe (and so the allocation) shares; no
    /// -bits, -key-bits, -value-bits, -layer-bits or -rate.
    #[arg(
        long,
        value_name = "FLAGS",
        default_value = DEFAULT_PROBE_FLAGS,
        allow_hyphen_values = true
    )]
    pub sensitivity_flags: String,
}

/// Issue 20's long-context measurements: the context-length sweep and the passkey test.
#[derive(Debug, Args)]
pub struct LongContextArgs {
    /// Context-length sweep: at each of these lengths L (comma-separated),
    /// windows of L + --targets tokens; the first L tokens' cache goes
    /// through kv-compress and the last T are scored on the original and
    /// the reconstruction (with the default method, or every --variant /
    /// --sweep variant). Lengths beyond the model's context are an error.
    #[arg(long, value_name = "L,L,...", value_delimiter = ',', num_args = 1..,
          requires = "targets", conflicts_with_all = ["windows", "records", "sensitivity"])]
    pub context_lengths: Vec<usize>,
    /// Write the context-length sweep as an SVG plot (mean KLD against context length per method).
    #[arg(long, value_name = "FILE.svg", requires = "context_lengths")]
    pub context_plot: Option<PathBuf>,
    /// Passkey retrieval: a random 5-digit key hidden at each depth of a
    /// haystack of each length; the haystack's cache goes through
    /// kv-compress and the model greedily decodes the answer on the
    /// reconstruction. Accuracy per (length, depth), baseline beside each method.
    #[arg(long, conflicts_with_all = ["context_lengths", "windows", "records", "sensitivity", "context"])]
    pub passkey: bool,
    /// Passkey haystack lengths in tokens (comma-separated; the prompt, question included).
    #[arg(long, value_name = "L,L,...", value_delimiter = ',', num_args = 1..,
          default_values_t = [1024usize], requires = "passkey")]
    pub passkey_lengths: Vec<usize>,
    /// Where the key sits, in percent of the haystack (comma-separated, 0..=100).
    #[arg(long, value_name = "PCT,PCT,...", value_delimiter = ',', num_args = 1..,
          default_values_t = [0u8, 25, 50, 75, 100], requires = "passkey",
          value_parser = clap::value_parser!(u8).range(0..=100))]
    pub passkey_depths: Vec<u8>,
    /// Keys tried per (length, depth), each a fresh random key.
    #[arg(long, value_name = "N", default_value_t = 2, requires = "passkey",
          value_parser = clap::value_parser!(u32).range(1..=1000).map(|n| n as usize))]
    pub passkey_trials: usize,
    /// Seed of the keys (the same seed, the same keys: recorded in the JSON).
    #[arg(long, value_name = "S", default_value_t = 0, requires = "passkey")]
    pub passkey_seed: u64,
    /// The haystack's filler text, repeated as needed (default: the project's prose fixture).
    #[arg(long, value_name = "FILE", requires = "passkey")]
    pub haystack: Option<PathBuf>,
    /// Write the passkey accuracies as an SVG heat map (length x depth, one panel per method).
    #[arg(long, value_name = "FILE.svg", requires = "passkey")]
    pub passkey_plot: Option<PathBuf>,
}

/// Which model; shared by a run and `capacity`.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Hugging Face model repository to download (or find in the HF cache).
    #[arg(long, value_name = "REPO", default_value = DEFAULT_HUB_REPO)]
    pub model: String,
    /// Revision (branch, tag or commit) of --model.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// A local Hugging Face model directory (config.json, safetensors, tokenizer.json).
    #[arg(long, value_name = "DIR", conflicts_with = "gguf")]
    pub model_dir: Option<PathBuf>,
    /// A GGUF model file with its embedded tokenizer.
    #[arg(long, value_name = "FILE")]
    pub gguf: Option<PathBuf>,
}

impl ModelArgs {
    pub fn source(&self) -> ModelSource {
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
#[derive(Clone, Debug, Args)]
pub struct Outputs {
    /// Also write the report as JSON to FILE (atomically).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write the sweep table as CSV to FILE (atomically).
    #[arg(long, value_name = "FILE")]
    pub sweep_csv: Option<PathBuf>,
    /// Write the sweep as an SVG plot (delta against bits/value) to FILE (atomically).
    #[arg(long, value_name = "FILE.svg")]
    pub sweep_plot: Option<PathBuf>,
    /// Write the sweep as an SVG plot of mean KLD against bits/value to FILE (atomically).
    #[arg(long, value_name = "FILE.svg")]
    pub sweep_kld_plot: Option<PathBuf>,
}

impl Outputs {
    pub fn sweep_outputs(&self) -> bool {
        self.sweep_csv.is_some() || self.sweep_plot.is_some() || self.sweep_kld_plot.is_some()
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
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
pub enum CacheDtypeArg {
    Float32,
    Float16,
    Bfloat16,
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
pub fn parse_timeout(text: &str) -> Result<Duration, String> {
    text.parse::<f64>()
        .ok()
        .filter(|seconds| *seconds > 0.0)
        .and_then(|seconds| Duration::try_from_secs_f64(seconds).ok())
        .ok_or_else(|| format!("expected a positive number of seconds, got {text:?}"))
}

/// A `--sensitivity-bits` width: one kv-compress takes, below the reference's 8.
pub fn parse_probe_bits(text: &str) -> Result<u8, String> {
    text.trim()
        .parse::<u8>()
        .ok()
        .filter(|bits| *bits < 8 && kvformat::codec::SUPPORTED_BITS.contains(bits))
        .ok_or_else(|| format!("{text:?} is not one of 2, 3, 4, 5, 6"))
}

/// `--matrix`: which built-in matrix `--sweep` runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Matrix {
    #[default]
    Default,
    Engines,
}
