//! One step from a command line to what to do: every flag resolved and
//! every flag combination checked before a model, a text or a cache is
//! touched, so a bad combination is an error at once, not after a model
//! load. What depends on the model (the dtype's default, the windows, the
//! probes of a sensitivity sweep) is resolved by [`crate::run`] from what
//! this plan says.

use std::path::PathBuf;

use candle_core::DType;
use kvformat::CacheDtype;

use crate::allocation::SENSITIVITY_BITS_FLAGS;
use crate::bridge::{BridgeError, CompressTimeout, KvCompress};
use crate::capacity::{GpuMemory, WeightsDtype};
use crate::cli::{Cli, Command, Matrix, ModelArgs, Outputs};
use crate::data::TextSource;
use crate::evaluate::default_scratch_parent;
use crate::identity::model_inputs;
use crate::model::device::DeviceRequest;
use crate::model::load::ModelSource;
use crate::output::{FilePlan, OutputError};
use crate::run_types::{CompressSettings, PassCriteria, Variant};
use crate::shard::{Slice, SliceBase};
use crate::sweep::{ensure_unique_labels, SweepError};

/// The delta threshold when no criterion is given.
pub const DEFAULT_THRESHOLD: f64 = 0.5;

/// A flag combination that cannot run.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{flag} must be a non-negative number, got {value}")]
    BadCriterion { flag: &'static str, value: f64 },
    #[error(
        "{0} writes a slice's records only (--records); the report, JSON, CSV and \
         plots come from `kv-validate merge`"
    )]
    ReportOfSlice(&'static str),
    #[error("--context-lengths and --passkey run in one process: not with {0}")]
    LongContextOfSlice(&'static str),
    #[error("--devices {value:?}: {problem}")]
    Devices { value: String, problem: String },
    #[error("--sensitivity-flags: {0}")]
    SensitivityFlags(kv_compress::FlagError),
    #[error("--sensitivity-flags must not set bits ({word}): the probes choose them")]
    SensitivitySetsBits { word: String },
    #[error(
        "--sensitivity needs a model and text: it cannot run with --quick-test or --bench-forward"
    )]
    SensitivityWithoutModel,
    #[error("--sweep-csv, --sweep-plot and --sweep-kld-plot need --sweep or --variant")]
    SweepOutputsWithoutSweep,
    #[error("a sweep needs a model and text: it cannot run with --quick-test or --bench-forward")]
    SweepWithoutModel,
    #[error("--targets needs --context or --context-lengths")]
    TargetsWithoutContext,
    #[error("--context-lengths must be positive, got {0}")]
    ZeroContextLength(usize),
    #[error("--passkey-lengths must be positive, got {0}")]
    ZeroPasskeyLength(usize),
    #[error(
        "--sweep-csv, --sweep-plot and --sweep-kld-plot belong to a sweep at one context: \
         use --context-plot with --context-lengths, --passkey-plot with --passkey"
    )]
    SweepOutputsOfLongContext,
    #[error("--context-lengths and --passkey need a model and text: not with --quick-test or --bench-forward")]
    LongContextWithoutModel,
    #[error(transparent)]
    Sweep(#[from] SweepError),
    #[error(transparent)]
    Compressor(#[from] BridgeError),
    /// An output that is an input or another output.
    #[error(transparent)]
    Files(#[from] OutputError),
}

/// What a command line asks for.
#[derive(Debug)]
pub enum Plan {
    /// `kv-validate merge`.
    Merge {
        files: Vec<PathBuf>,
        outputs: Outputs,
    },
    /// `kv-validate allocate`.
    Allocate {
        source: AllocationSource,
        budget: f64,
        json: Option<PathBuf>,
        /// `--flags-file`: the flags one argument per line.
        flags_file: Option<PathBuf>,
    },
    /// `kv-validate capacity`.
    Capacity(CapacityPlan),
    /// `--quick-test`: the file contract without a model.
    QuickTest {
        compressor: KvCompress,
        settings: CompressSettings,
        cache_dtype: CacheDtype,
        json: Option<PathBuf>,
    },
    /// Everything that runs the model.
    Model(ModelPlan),
    /// `--devices`: one worker process per device, their records merged.
    Workers(WorkersPlan),
}

/// `--devices`: what the parent of the workers needs; each worker is this
/// binary with the parent's command line, its device and its part
/// ([`crate::workers`]).
#[derive(Debug)]
pub struct WorkersPlan {
    /// The devices as the workers' `--device` takes them, in order.
    pub devices: Vec<String>,
    /// Fetched once before the workers start (hub files), so they do not
    /// race each other into the hub cache.
    pub model: ModelSource,
    pub text: TextSource,
    /// The parent's own windows (--windows/--shard), which the workers split.
    pub slice: Slice,
    pub records: Option<PathBuf>,
    pub outputs: Outputs,
    /// Where the workers' records wait for the merge.
    pub scratch_parent: PathBuf,
    pub show_progress: bool,
}

/// Where `allocate` reads the probes' figures.
#[derive(Debug)]
pub enum AllocationSource {
    SweepJson(PathBuf),
    Records(Vec<PathBuf>),
}

/// `kv-validate capacity`'s inputs.
#[derive(Debug)]
pub struct CapacityPlan {
    pub model: ModelSource,
    /// Never empty: the default GPUs when none was named.
    pub gpus: Vec<GpuMemory>,
    pub weights_dtype: WeightsDtype,
    pub sweep_json: Option<PathBuf>,
    pub json: Option<PathBuf>,
    pub plot: Option<PathBuf>,
}

/// A run of the model: which, where, in which element types, doing what.
#[derive(Debug)]
pub struct ModelPlan {
    pub model: ModelSource,
    pub device: DeviceRequest,
    /// `None`: the device's default ([`crate::model::device::OpenedDevice::default_dtype`]).
    pub dtype: Option<DType>,
    /// `None`: the dtype that stores the model's exactly.
    pub cache_dtype: Option<CacheDtype>,
    /// Progress bars and status lines on stderr.
    pub show_progress: bool,
    pub work: ModelWork,
}

/// What a model run does.
#[derive(Debug)]
pub enum ModelWork {
    /// `--bench-forward`: forward tokens/s at these context lengths.
    Bench {
        lengths: Vec<usize>,
        json: Option<PathBuf>,
    },
    /// A validation or a sweep over the text's windows (boxed: the largest variant).
    Evaluate(Box<EvaluationPlan>),
    /// `--context-lengths`: the evaluation repeated at each context length
    /// (`evaluation.context_targets` is set per length).
    LongContext {
        lengths: Vec<usize>,
        targets: usize,
        evaluation: Box<EvaluationPlan>,
        /// `--context-plot`.
        plot: Option<PathBuf>,
    },
    /// `--passkey`.
    Passkey(Box<PasskeyPlan>),
}

/// `--passkey`: retrieval of a key hidden in a haystack, on the original
/// and each variant's reconstructed cache.
#[derive(Debug)]
pub struct PasskeyPlan {
    pub lengths: Vec<usize>,
    /// Percent of the haystack before the key.
    pub depths: Vec<u8>,
    pub trials: usize,
    pub seed: u64,
    /// `--haystack`; `None`: the project's prose fixture.
    pub haystack: Option<PathBuf>,
    pub compressor: KvCompress,
    pub variants: Vec<Variant>,
    pub scratch_parent: PathBuf,
    pub json: Option<PathBuf>,
    /// `--passkey-plot`.
    pub plot: Option<PathBuf>,
}

/// A validation or a sweep, all but what the model decides.
#[derive(Debug)]
pub struct EvaluationPlan {
    pub text: TextSource,
    /// `--context C --targets T`: fixed windows; `None`: the original's sliding window.
    pub context_targets: Option<(usize, usize)>,
    pub max_windows: Option<usize>,
    /// `--windows`, `--shard`, `--worker-shard`: when partial, the slice's
    /// records are its only output.
    pub slice: Slice,
    pub compressor: KvCompress,
    pub variants: VariantsPlan,
    pub criteria: PassCriteria,
    pub scratch_parent: PathBuf,
    /// `--pipeline-depth`: windows in flight at once.
    pub pipeline_depth: usize,
    pub records: Option<PathBuf>,
    pub outputs: Outputs,
}

/// The compressor variants a run scores.
#[derive(Debug)]
pub enum VariantsPlan {
    /// A validation of one setting.
    Single(CompressSettings),
    /// A sweep of these variants.
    Sweep(Vec<Variant>),
    /// A sensitivity sweep: its probes need the model's layer count.
    Sensitivity { widths: Vec<u8>, flags: String },
}

impl Plan {
    /// Resolves `cli`, checking every flag combination; locates kv-compress
    /// for the commands that run it.
    pub fn from_cli(cli: &Cli) -> Result<Plan, CliError> {
        file_plan(cli).check()?;
        match &cli.command {
            Some(Command::Merge { files, outputs }) => {
                return Ok(Plan::Merge {
                    files: files.clone(),
                    outputs: outputs.clone(),
                })
            }
            Some(Command::Allocate {
                sweep_json,
                records,
                bits,
                json,
                flags_file,
            }) => {
                let source = match sweep_json {
                    Some(path) => AllocationSource::SweepJson(path.clone()),
                    None => AllocationSource::Records(records.clone()),
                };
                return Ok(Plan::Allocate {
                    source,
                    budget: *bits,
                    json: json.clone(),
                    flags_file: flags_file.clone(),
                });
            }
            Some(Command::Capacity {
                model,
                gpu_memory,
                weights_dtype,
                sweep_json,
                json,
                plot,
            }) => {
                return Ok(Plan::Capacity(CapacityPlan {
                    model: model.source(),
                    gpus: if gpu_memory.is_empty() {
                        GpuMemory::defaults()
                    } else {
                        gpu_memory.clone()
                    },
                    weights_dtype: *weights_dtype,
                    sweep_json: sweep_json.clone(),
                    json: json.clone(),
                    plot: plot.clone(),
                }))
            }
            None => {}
        }
        let criteria = pass_criteria(cli)?;
        let long = &cli.long_context;
        let long_context = long_context_asked(cli);
        if cli.targets.is_some() && cli.context.is_none() && long.context_lengths.is_empty() {
            return Err(CliError::TargetsWithoutContext);
        }
        if long_context && cli.outputs.sweep_outputs() {
            return Err(CliError::SweepOutputsOfLongContext);
        }
        if long_context && !cli.bench_forward.is_empty() {
            return Err(CliError::LongContextWithoutModel);
        }
        if let Some(&zero) = long.context_lengths.iter().find(|&&l| l == 0) {
            return Err(CliError::ZeroContextLength(zero));
        }
        if let Some(&zero) = long.passkey_lengths.iter().find(|&&l| l == 0) {
            return Err(CliError::ZeroPasskeyLength(zero));
        }
        if cli.quick_test && long_context {
            return Err(CliError::LongContextWithoutModel);
        }
        if long_context {
            if let Some(flag) = [
                (cli.windows.is_some(), "--windows"),
                (cli.shard.is_some(), "--shard"),
                (cli.devices.is_some(), "--devices"),
            ]
            .into_iter()
            .find_map(|(given, flag)| given.then_some(flag))
            {
                return Err(CliError::LongContextOfSlice(flag));
            }
        }
        let slice = slice_of(cli);
        if cli.outputs.json.is_some() || cli.outputs.sweep_outputs() {
            if let Some(flag) = [
                (cli.windows.is_some(), "--windows"),
                (cli.shard.is_some(), "--shard"),
                (cli.worker_shard.is_some(), "--worker-shard"),
            ]
            .into_iter()
            .find_map(|(given, flag)| given.then_some(flag))
            {
                return Err(CliError::ReportOfSlice(flag));
            }
        }
        let settings = CompressSettings {
            group_size: cli.group_size,
            sparsity: cli.sparsity,
            extra_args: cli.compress_args.clone(),
        };
        let variants = variants_plan(cli, &settings)?;
        let devices = cli.devices.as_deref().map(resolve_devices).transpose()?;
        let compressor = KvCompress::locate()?.with_timeout(
            cli.compress_timeout
                .map_or(CompressTimeout::ScaledWithCache, CompressTimeout::Fixed),
        );
        let text = match &cli.text_file {
            Some(path) => TextSource::File(path.clone()),
            None => TextSource::default(),
        };
        let scratch_parent = cli
            .scratch_dir
            .clone()
            .unwrap_or_else(default_scratch_parent);
        if let Some(devices) = devices {
            return Ok(Plan::Workers(WorkersPlan {
                devices,
                model: cli.model.source(),
                text,
                slice,
                records: cli.records.clone(),
                outputs: cli.outputs.clone(),
                scratch_parent,
                show_progress: !cli.quiet,
            }));
        }
        if cli.quick_test {
            return Ok(Plan::QuickTest {
                compressor,
                settings,
                cache_dtype: cli.cache_dtype.map_or(CacheDtype::F32, CacheDtype::from),
                json: cli.outputs.json.clone(),
            });
        }
        let work = if long.passkey {
            ModelWork::Passkey(Box::new(PasskeyPlan {
                lengths: long.passkey_lengths.clone(),
                depths: long.passkey_depths.clone(),
                trials: long.passkey_trials,
                seed: long.passkey_seed,
                haystack: long.haystack.clone(),
                compressor,
                variants: match variants {
                    VariantsPlan::Single(settings) => vec![Variant {
                        label: settings.label(),
                        settings,
                    }],
                    VariantsPlan::Sweep(variants) => variants,
                    VariantsPlan::Sensitivity { .. } => unreachable!("clap refuses --sensitivity"),
                },
                scratch_parent,
                json: cli.outputs.json.clone(),
                plot: long.passkey_plot.clone(),
            }))
        } else if cli.bench_forward.is_empty() {
            let evaluation = Box::new(EvaluationPlan {
                text,
                context_targets: cli.context.zip(cli.targets),
                max_windows: cli.max_windows,
                slice,
                compressor,
                variants,
                criteria,
                scratch_parent,
                pipeline_depth: cli.pipeline_depth,
                records: cli.records.clone(),
                outputs: cli.outputs.clone(),
            });
            match cli.targets.filter(|_| !long.context_lengths.is_empty()) {
                Some(targets) => ModelWork::LongContext {
                    lengths: long.context_lengths.clone(),
                    targets,
                    evaluation,
                    plot: long.context_plot.clone(),
                },
                None => ModelWork::Evaluate(evaluation),
            }
        } else {
            ModelWork::Bench {
                lengths: cli.bench_forward.clone(),
                json: cli.outputs.json.clone(),
            }
        };
        Ok(Plan::Model(ModelPlan {
            model: cli.model.source(),
            device: if cli.cpu {
                DeviceRequest::Cpu
            } else {
                cli.device
            },
            dtype: cli.dtype.map(DType::from),
            cache_dtype: cli.cache_dtype.map(CacheDtype::from),
            show_progress: !cli.quiet,
            work,
        }))
    }
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
                .read("--haystack", cli.long_context.haystack.as_deref())
                .read("kv-compress", compressor.as_ref().map(KvCompress::program))
                .write("--records", cli.records.as_deref())
                .write("--context-plot", cli.long_context.context_plot.as_deref())
                .write("--passkey-plot", cli.long_context.passkey_plot.as_deref());
            report_outputs(&mut plan, &cli.outputs);
        }
    }
    plan
}

/// Whether the command line asks for `--context-lengths` or `--passkey`.
fn long_context_asked(cli: &Cli) -> bool {
    !cli.long_context.context_lengths.is_empty() || cli.long_context.passkey
}

/// The windows this process evaluates, as the flags name them.
fn slice_of(cli: &Cli) -> Slice {
    Slice {
        base: match (cli.windows, cli.shard) {
            (Some(range), _) => Some(SliceBase::Windows(range)),
            (None, Some(shard)) => Some(SliceBase::Shard(shard)),
            (None, None) => None,
        },
        worker: cli.worker_shard,
    }
}

/// Largest GPU ordinal `--devices all` probes.
const MAX_GPUS: usize = 64;

/// `--devices`: the comma-separated devices, each one `--device` takes, or
/// `all`, every CUDA GPU that opens.
fn resolve_devices(value: &str) -> Result<Vec<String>, CliError> {
    let error = |problem: String| CliError::Devices {
        value: value.to_string(),
        problem,
    };
    if value.trim() == "all" {
        if !candle_core::utils::cuda_is_available() {
            return Err(error(
                "`all` means every CUDA GPU, and this kv-validate is built without CUDA \
                 (`cargo xtask build-cuda`); name the devices instead, e.g. cpu,cpu"
                    .into(),
            ));
        }
        let count = (0..MAX_GPUS)
            .take_while(|&ordinal| candle_core::Device::new_cuda(ordinal).is_ok())
            .count();
        if count == 0 {
            return Err(error("no CUDA GPU opens".into()));
        }
        return Ok((0..count)
            .map(|ordinal| format!("cuda:{ordinal}"))
            .collect());
    }
    value
        .split(',')
        .map(|device| {
            let device = device.trim();
            device
                .parse::<DeviceRequest>()
                .map(|_| device.to_string())
                .map_err(error)
        })
        .collect()
}

/// `--threshold` and `--max-kld`, checked; the default threshold unless `--max-kld` is alone.
fn pass_criteria(cli: &Cli) -> Result<PassCriteria, CliError> {
    for (flag, value) in [("--threshold", cli.threshold), ("--max-kld", cli.max_kld)] {
        if let Some(value) = value.filter(|v| !(v.is_finite() && *v >= 0.0)) {
            return Err(CliError::BadCriterion { flag, value });
        }
    }
    Ok(PassCriteria {
        threshold: cli
            .threshold
            .or(cli.max_kld.is_none().then_some(DEFAULT_THRESHOLD)),
        max_kld: cli.max_kld,
    })
}

/// The variants: `--sensitivity`'s probes (made once the model is loaded),
/// the `--variant`s, the built-in matrix with `--sweep`, or `settings` alone.
fn variants_plan(cli: &Cli, settings: &CompressSettings) -> Result<VariantsPlan, CliError> {
    let needs_model = cli.quick_test || !cli.bench_forward.is_empty();
    if cli.sensitivity {
        let words: Vec<&str> = cli.sensitivity_flags.split_whitespace().collect();
        let (flags, _) =
            kv_compress::flags::split_words(&words).map_err(CliError::SensitivityFlags)?;
        if let Some(flag) = flags
            .iter()
            .find(|flag| SENSITIVITY_BITS_FLAGS.contains(&flag.name))
        {
            return Err(CliError::SensitivitySetsBits {
                word: flag.words[0].clone(),
            });
        }
        if needs_model {
            return Err(CliError::SensitivityWithoutModel);
        }
        return Ok(VariantsPlan::Sensitivity {
            widths: cli.sensitivity_bits.clone(),
            flags: cli.sensitivity_flags.clone(),
        });
    }
    if !cli.sweep && cli.variants.is_empty() {
        if cli.outputs.sweep_outputs() {
            return Err(CliError::SweepOutputsWithoutSweep);
        }
        return Ok(VariantsPlan::Single(settings.clone()));
    }
    if needs_model {
        return Err(CliError::SweepWithoutModel);
    }
    let variants = if cli.variants.is_empty() {
        match cli.matrix {
            Matrix::Default => Variant::default_matrix(),
            Matrix::Engines => crate::engines::engines_matrix(),
        }
    } else {
        cli.variants
            .iter()
            .map(|spec| Variant::parse(spec))
            .collect::<Result<Vec<_>, _>>()?
    };
    ensure_unique_labels(&variants)?;
    Ok(VariantsPlan::Sweep(variants))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// The plan of `args` (after the program name), or its error's text.
    fn plan(args: &[&str]) -> Result<Plan, String> {
        let cli = Cli::try_parse_from(std::iter::once("kv-validate").chain(args.iter().copied()))
            .map_err(|error| error.to_string())?;
        Plan::from_cli(&cli).map_err(|error| error.to_string())
    }

    #[test]
    fn flag_combinations_are_refused_before_anything_loads() {
        for (args, expected) in [
            (
                &["--threshold", "-1"][..],
                "--threshold must be a non-negative number, got -1",
            ),
            (
                &["--max-kld", "NaN"],
                "--max-kld must be a non-negative number",
            ),
            (
                &[
                    "--windows",
                    "0..2",
                    "--records",
                    "r.json",
                    "--json",
                    "x.json",
                ],
                "--windows writes a slice's records only",
            ),
            (
                &[
                    "--shard",
                    "1/3",
                    "--records",
                    "r.json",
                    "--sweep-csv",
                    "x.csv",
                ],
                "--shard writes a slice's records only",
            ),
            (
                &["--shard", "3/3", "--records", "r.json"],
                "I must be below N",
            ),
            (&["--shard", "0/2"], "--records"),
            (
                &["--devices", "cpu,gpu"],
                "--devices \"cpu,gpu\": \"gpu\": expected auto",
            ),
            (
                &["--devices", "cpu,cpu", "--device", "cpu"],
                "cannot be used with",
            ),
            (&["--sweep-plot", "x.svg"], "need --sweep or --variant"),
            (
                &[
                    "--context-lengths",
                    "512",
                    "--targets",
                    "8",
                    "--devices",
                    "cpu,cpu",
                ],
                "--context-lengths and --passkey run in one process: not with --devices",
            ),
            (&["--passkey", "--windows", "0..2"], "cannot be used with"),
            (
                &["--context-lengths", "0", "--targets", "8"],
                "--context-lengths must be positive, got 0",
            ),
            (
                &[
                    "--context-lengths",
                    "512",
                    "--targets",
                    "8",
                    "--sweep-plot",
                    "x.svg",
                    "--sweep",
                ],
                "use --context-plot with --context-lengths",
            ),
            (
                &["--sweep", "--quick-test"],
                "a sweep needs a model and text",
            ),
            (
                &["--variant", "a=-method kivi", "--variant", "a=-bits 8"],
                "two sweep variants are labelled \"a\"",
            ),
            (
                &["--variant", "bad=-grid kmeans -bits 8"],
                "the kmeans grid takes 2, 3 or 4 bits, not 8",
            ),
            (
                &[
                    "--sensitivity",
                    "--sensitivity-flags",
                    "-method kivi -key-bits 3",
                ],
                "must not set bits (-key-bits)",
            ),
            (
                &["--sensitivity", "--sensitivity-flags", "-methd kivi"],
                "--sensitivity-flags: flag provided but not defined: -methd",
            ),
            (
                &["--sensitivity", "--bench-forward", "8"],
                "--sensitivity needs a model",
            ),
            (
                &["--targets", "8"],
                "--targets needs --context or --context-lengths",
            ),
            (
                &["--context-lengths", "0,512", "--targets", "8"],
                "--context-lengths must be positive, got 0",
            ),
            (
                &[
                    "--context-lengths",
                    "512",
                    "--targets",
                    "8",
                    "--sweep",
                    "--sweep-plot",
                    "x.svg",
                ],
                "use --context-plot with --context-lengths",
            ),
            (
                &["--passkey", "--quick-test"],
                "--context-lengths and --passkey need a model",
            ),
            (
                &["--passkey", "--passkey-lengths", "0"],
                "--passkey-lengths must be positive",
            ),
        ] {
            let error = plan(args).expect_err(&format!("{args:?} planned"));
            assert!(error.contains(expected), "{args:?}: {error}");
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn devices_all_names_the_missing_cuda() {
        let error = plan(&["--devices", "all"]).unwrap_err();
        assert!(
            error.contains("--devices \"all\"") && error.contains("built without CUDA"),
            "{error}"
        );
    }

    #[test]
    fn subcommands_plan_without_a_compressor() {
        match plan(&["merge", "a.json", "b.json", "--json", "m.json"]).unwrap() {
            Plan::Merge { files, outputs } => {
                assert_eq!(files, [PathBuf::from("a.json"), PathBuf::from("b.json")]);
                assert_eq!(outputs.json, Some(PathBuf::from("m.json")));
            }
            other => panic!("{other:?}"),
        }
        match plan(&["capacity", "--model-dir", "m"]).unwrap() {
            Plan::Capacity(capacity) => {
                assert_eq!(capacity.model, ModelSource::LocalDir("m".into()));
                assert_eq!(capacity.gpus, GpuMemory::defaults(), "the default GPUs");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn criteria_default_to_the_threshold_unless_max_kld_is_alone() {
        let cli = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("kv-validate").chain(args.iter().copied())).unwrap()
        };
        let criteria = |args: &[&str]| pass_criteria(&cli(args)).unwrap();
        assert_eq!(
            criteria(&[]),
            PassCriteria {
                threshold: Some(DEFAULT_THRESHOLD),
                max_kld: None
            }
        );
        assert_eq!(criteria(&["--max-kld", "0.01"]).threshold, None);
        assert_eq!(
            criteria(&["--max-kld", "0.01", "--threshold", "0.2"]),
            PassCriteria {
                threshold: Some(0.2),
                max_kld: Some(0.01)
            }
        );
    }
}
