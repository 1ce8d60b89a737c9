//! Go `flag`-package command-line syntax, by hand, so every invocation the
//! original's Python bridge makes parses exactly as Go parsed it:
//! `-name value`, `-name=value`, `--name[=value]`, booleans as `-b` or
//! `-b=false` (never `-b false`), `--` ends the flags, last setting wins.
//!
//! Every flag is one entry of [`FLAGS`] (name, help, how its value is parsed
//! and applied, its default as `Options::default` holds it); a per-kind
//! setting is one line that generates `-NAME`, `-key-NAME` and `-value-NAME`.
//! The parser and the `-h` text are derived from that list; conflicting
//! codec settings are found by the codec's rules (`crate::settings`).
//! Arguments are OS strings: a path need not be UTF-8, any other value must
//! be. Pure: no I/O, so it is unit-tested and fuzzable.

use std::ffi::{OsStr, OsString};
use std::ops::{Range, RangeInclusive};
use std::path::PathBuf;
use std::sync::{LazyLock, OnceLock};

use kvformat::codec::{spoken_list, CodecParams, LlamaRotation, GRIDS, RATE_RANGE, SUPPORTED_BITS};
/// Key-axis / value-axis choices of `-key-axis` and `-value-axis`.
pub use kvformat::codec::{Axis, Fit, Grid};
use kvformat::preset::DEFAULT_GROUP_SIZE;
pub use kvformat::preset::{Fp8Scale, Preset as Method, TensorKind};

pub use crate::settings::LayerRule;
use crate::settings::{CodecSettings, SettingsError};

/// Seed of `-rotate` when `-rotate-seed` is not given (documented in docs/format.md).
pub const DEFAULT_ROTATE_SEED: u64 = 0x6b76_636f_6d70; // "kvcomp"

/// Group sizes accepted by `-group-size`: powers of two in this range
/// (the contract documents 32, 64 and 128).
pub const GROUP_SIZE_RANGE: RangeInclusive<usize> = 8..=1024;

/// Everything the flags say; defaults are the original's.
#[derive(Clone, Debug, PartialEq)]
pub struct Options {
    pub input: Option<PathBuf>,
    pub output: Option<PathBuf>,
    pub group_size: usize,
    /// `None`: `group_size`.
    pub key_group_size: Option<usize>,
    pub value_group_size: Option<usize>,
    pub sparsity: f64,
    pub verbose: bool,
    pub metrics_only: bool,
    pub decompress: bool,
    pub reconstruct: bool,
    pub method: Method,
    pub bits: u8,
    /// `None`: `bits`.
    pub key_bits: Option<u8>,
    pub value_bits: Option<u8>,
    /// `-layer-bits`, in order: the first rule that matches a tensor wins
    /// over `-bits`, `-key-bits`, `-value-bits` and the group sizes.
    pub layer_bits: Vec<LayerRule>,
    pub fit: Fit,
    pub outliers: f64,
    /// `None`: `outliers`.
    pub key_outliers: Option<f64>,
    pub value_outliers: Option<f64>,
    /// `None`: the method's grid.
    pub grid: Option<Grid>,
    pub key_axis: Option<Axis>,
    pub value_axis: Option<Axis>,
    pub rotate: bool,
    pub rotate_seed: u64,
    pub sink_tokens: usize,
    pub recent_tokens: usize,
    /// `-rate`: the bits per value of every `ecsq` tensor's step.
    pub rate: Option<f64>,
    /// `-fp8-scale`: how an fp8 engine method's scales are chosen.
    pub fp8_scale: Fp8Scale,
    /// `-llama-rot`: a llama-* method's cache rotated as llama.cpp does by default.
    pub llama_rot: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            input: None,
            output: None,
            group_size: DEFAULT_GROUP_SIZE,
            key_group_size: None,
            value_group_size: None,
            sparsity: 0.0,
            verbose: false,
            metrics_only: false,
            decompress: false,
            reconstruct: false,
            method: Method::Adr002,
            bits: 4,
            key_bits: None,
            value_bits: None,
            layer_bits: Vec::new(),
            fit: Fit::MinMax,
            outliers: 0.0,
            key_outliers: None,
            value_outliers: None,
            grid: None,
            key_axis: None,
            value_axis: None,
            rotate: false,
            rotate_seed: DEFAULT_ROTATE_SEED,
            sink_tokens: 0,
            recent_tokens: 0,
            rate: None,
            fp8_scale: Fp8Scale::Unit,
            llama_rot: false,
        }
    }
}

impl Options {
    /// The codec settings these options give every tensor, resolved once
    /// and checked by the codec's rules.
    pub fn codec_settings(&self) -> Result<CodecSettings, SettingsError> {
        CodecSettings::new(
            base_params(self, TensorKind::Key),
            base_params(self, TensorKind::Value),
            self.layer_bits.clone(),
        )
    }
}

/// The parameters of a `kind` tensor outside every `-layer-bits` rule:
/// `*_key` tensors (kvformat's naming rule) take the key axis, bits, group
/// size and outliers, every other tensor the value ones; unset flags take
/// the method's choice (grid, axes) or the shared flag.
fn base_params(options: &Options, kind: TensorKind) -> CodecParams {
    let (axis, bits, group_size, outliers) = match kind {
        TensorKind::Key => (
            options.key_axis,
            options.key_bits,
            options.key_group_size,
            options.key_outliers,
        ),
        TensorKind::Value => (
            options.value_axis,
            options.value_bits,
            options.value_group_size,
            options.value_outliers,
        ),
    };
    let params = CodecParams {
        bits: bits.unwrap_or(options.bits),
        grid: options.grid.unwrap_or(options.method.grid()),
        axis: axis.unwrap_or(options.method.axis(kind)),
        group_size: group_size.unwrap_or(options.group_size),
        rotation_seed: options.rotate.then_some(options.rotate_seed),
        sink_tokens: options.sink_tokens,
        recent_tokens: options.recent_tokens,
        sparsity: options.sparsity,
        fit: options.fit,
        outliers: outliers.unwrap_or(options.outliers),
        rate: options.rate,
        unit_scale: false,
        llama_rotation: options.llama_rot.then_some(match kind {
            TensorKind::Key => LlamaRotation::Key,
            TensorKind::Value => LlamaRotation::Value,
        }),
        // Set per tensor from its dtype where the grid computes in it (quanto).
        model_dtype: None,
    };
    // An engine's format is the engine's: its bits, blocks and scales.
    match options.method.engine_layout(options.fp8_scale) {
        Some((bits, axis, group_size, unit_scale)) => CodecParams {
            bits,
            grid: options.method.grid(),
            axis,
            group_size,
            unit_scale,
            ..params
        },
        None => params,
    }
}

/// What the command line asks for.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// `-h`, `-help`, `--help`: print usage, exit 0.
    Help,
    /// Boxed: the options are large beside `Help`.
    Run(Box<Options>),
}

/// A command-line error; `main` prints it with the usage and exits 2, as Go does.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FlagError {
    #[error("flag provided but not defined: -{0}")]
    Undefined(String),
    #[error("flag needs an argument: -{0}")]
    MissingValue(String),
    #[error("invalid value {value:?} for flag -{flag}: {reason}")]
    InvalidValue {
        flag: String,
        value: String,
        reason: String,
    },
    #[error("invalid boolean value {value:?} for -{flag}: parse error")]
    InvalidBool { flag: String, value: String },
    /// The codec settings the flags give some tensors break one of the
    /// codec's rules (`kvformat::codec::CodecParams::check_settings`).
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error("bad flag syntax: {0}")]
    BadSyntax(String),
    #[error("unexpected argument {0:?} (every option is a -flag; booleans take -flag=false, not -flag false)")]
    Positional(String),
}

/// How a flag takes its value and what it does with it.
#[derive(Clone, Copy)]
pub enum Setter {
    /// `-name`, `-name=BOOL`.
    Bool(fn(&mut Options, bool)),
    /// A path, any OS string.
    Path(fn(&mut Options, PathBuf)),
    /// A UTF-8 value shown as `placeholder` in `-h`; `Err` is the reason it is invalid.
    Text {
        placeholder: &'static str,
        apply: fn(&mut Options, &str) -> Result<(), String>,
    },
}

/// One command-line flag: everything about it is here and nowhere else.
#[derive(Clone, Copy)]
pub struct Flag {
    pub name: &'static str,
    /// The `-h` text; a line break continues it on the next line.
    /// `{default}` stands for [`Flag::default`]'s text.
    pub help: &'static str,
    pub setter: Setter,
    /// The default as `-h` shows it, read from [`Options::default`], so
    /// the help cannot drift from the value.
    pub default: Option<fn(&Options) -> String>,
}

impl Flag {
    /// The help with its default filled in.
    fn help_text(&self) -> String {
        match self.default {
            Some(default) => self
                .help
                .replace("{default}", &default(&Options::default())),
            None => self.help.to_string(),
        }
    }
}

const PARSE_ERROR: &str = "parse error";

fn group_size(value: &str) -> Result<usize, String> {
    let size = parse_int(value).ok_or(PARSE_ERROR)?;
    usize::try_from(size)
        .ok()
        .filter(|s| s.is_power_of_two() && GROUP_SIZE_RANGE.contains(s))
        .ok_or_else(|| "must be a power of two from 8 to 1024 (32, 64 or 128 as documented)".into())
}

fn fraction(value: &str) -> Result<f64, String> {
    let fraction = parse_float(value).ok_or(PARSE_ERROR)?;
    if (0.0..1.0).contains(&fraction) {
        Ok(fraction)
    } else {
        Err("must be in [0, 1)".into())
    }
}

fn bits(value: &str) -> Result<u8, String> {
    let bits = parse_int(value).ok_or(PARSE_ERROR)?;
    u8::try_from(bits)
        .ok()
        .filter(|bits| SUPPORTED_BITS.contains(bits))
        .ok_or_else(|| format!("must be {}", spoken_list(&SUPPORTED_BITS)))
}

fn token_count(value: &str) -> Result<usize, String> {
    let count = parse_uint(value).ok_or(PARSE_ERROR)?;
    usize::try_from(count).map_err(|_| "too large".into())
}

fn axis(value: &str) -> Result<Axis, String> {
    match value {
        "flat" => Ok(Axis::Flat),
        "token" => Ok(Axis::Token),
        "channel" => Ok(Axis::Channel),
        _ => Err("must be flat, token or channel".into()),
    }
}

/// A rule's BITS: a supported width, or a fraction in [`RATE_RANGE`] (an
/// `ecsq` rate, with the width nearest it).
fn rule_bits(text: &str) -> Result<(u8, Option<f64>), String> {
    if let Ok(width) = bits(text) {
        return Ok((width, None));
    }
    match parse_float(text) {
        Some(rate) if RATE_RANGE.contains(&rate) && text.contains('.') => {
            let nearest = SUPPORTED_BITS
                .iter()
                .copied()
                .min_by(|a, b| {
                    (f64::from(*a) - rate)
                        .abs()
                        .total_cmp(&(f64::from(*b) - rate).abs())
                })
                .expect("widths are listed");
            Ok((nearest, Some(rate)))
        }
        _ => Err(
            "must be 2, 3, 4, 5, 6 or 8, or with -grid ecsq a rate from 0.5 to 16 such as 2.71"
                .into(),
        ),
    }
}

/// The letter of a tensor kind in `-layer-bits` rules (`k:0=4`, `v:*=2`).
pub fn kind_letter(kind: TensorKind) -> char {
    match kind {
        TensorKind::Key => 'k',
        TensorKind::Value => 'v',
    }
}

/// `-layer-bits`: `RULE[;RULE...]`, `RULE` = `[KINDS:]LAYERS=BITS[/GROUP]`,
/// `KINDS` one of `k`, `v`, `kv` (default `kv`), `LAYERS` `*` or a comma list
/// of `N` and `N-M`.
fn layer_rules(value: &str) -> Result<Vec<LayerRule>, String> {
    let rule = |text: &str| -> Result<LayerRule, String> {
        let (selector, setting) = text
            .split_once('=')
            .ok_or_else(|| format!("rule {text:?} has no '='"))?;
        let (kinds, layers) = match selector.split_once(':') {
            Some((kinds, layers)) => (kinds.trim(), layers.trim()),
            None => ("kv", selector.trim()),
        };
        let (keys, values) = match kinds {
            "k" => (true, false),
            "v" => (false, true),
            "kv" | "vk" => (true, true),
            _ => return Err(format!("kind {kinds:?} is not k, v or kv")),
        };
        let layers = if layers == "*" {
            None
        } else {
            let layer = |n: &str| {
                n.trim()
                    .parse::<usize>()
                    .map_err(|_| format!("layer {n:?} is not a number"))
            };
            let ranges = layers
                .split(',')
                .map(|item| match item.split_once('-') {
                    Some((first, last)) => {
                        let (first, last) = (layer(first)?, layer(last)?);
                        if first > last {
                            return Err(format!("layer range {item:?} is empty"));
                        }
                        Ok(first..=last)
                    }
                    None => layer(item).map(|n| n..=n),
                })
                .collect::<Result<Vec<_>, String>>()?;
            Some(ranges)
        };
        let (bits_text, group_text) = match setting.split_once('/') {
            Some((bits, group)) => (bits, Some(group)),
            None => (setting, None),
        };
        let (bits, rate) = rule_bits(bits_text.trim())
            .map_err(|reason| format!("bits {bits_text:?}: {reason}"))?;
        Ok(LayerRule {
            keys,
            values,
            layers,
            bits,
            rate,
            group_size: group_text
                .map(|g| {
                    group_size(g.trim()).map_err(|reason| format!("group size {g:?}: {reason}"))
                })
                .transpose()?,
        })
    };
    value
        .split(';')
        .filter(|text| !text.trim().is_empty())
        .map(rule)
        .collect()
}

/// The `-key-NAME` and `-value-NAME` flags of a per-kind setting (and with
/// a `shared` help, `-NAME` itself first): the names, the help and where each
/// stores its value derive from one line of [`FLAGS`]. A kind's flag
/// defaults to `-NAME` (or, without a shared flag, to `$default`).
macro_rules! per_kind_flags {
    (
        $name:literal, $placeholder:literal, $parse:expr,
        shared: $shared_field:ident, $shared_help:literal,
        kinds: $key_field:ident, $value_field:ident, $what:literal
        $(, key_note: $key_note:literal)?
    ) => {
        [
            Flag {
                name: $name,
                help: $shared_help,
                setter: Setter::Text {
                    placeholder: $placeholder,
                    apply: |o, v| {
                        o.$shared_field = $parse(v)?;
                        Ok(())
                    },
                },
                default: Some(|o| o.$shared_field.to_string()),
            },
            per_kind_flags!(@one concat!("key-", $name), $placeholder, $parse, $key_field,
                concat!($what, " *_key tensors", $($key_note,)? " (default: -", $name, ")")),
            per_kind_flags!(@one concat!("value-", $name), $placeholder, $parse, $value_field,
                concat!($what, " other tensors (default: -", $name, ")")),
        ]
    };
    (
        $name:literal, $placeholder:literal, $parse:expr,
        kinds: $key_field:ident, $value_field:ident, $what:literal, $detail:literal,
        default: $default:literal
    ) => {
        [
            per_kind_flags!(@one concat!("key-", $name), $placeholder, $parse, $key_field,
                concat!($what, " *_key tensors", $detail, " (default: ", $default, ")")),
            per_kind_flags!(@one concat!("value-", $name), $placeholder, $parse, $value_field,
                concat!($what, " other tensors", $detail, " (default: ", $default, ")")),
        ]
    };
    (@one $name:expr, $placeholder:literal, $parse:expr, $field:ident, $help:expr) => {
        Flag {
            name: $name,
            help: $help,
            setter: Setter::Text {
                placeholder: $placeholder,
                apply: |o, v| {
                    o.$field = Some($parse(v)?);
                    Ok(())
                },
            },
            default: None,
        }
    };
}

/// Every flag, in `-h` order.
pub static FLAGS: LazyLock<Vec<Flag>> = LazyLock::new(|| {
    [
        &[
            Flag {
                name: "input",
                help: "input file (a KV cache, or a packed file with -decompress)",
                setter: Setter::Path(|o, path| o.input = Some(path)),
                default: None,
            },
            Flag {
                name: "output",
                help: "output file (required unless -metrics-only)",
                setter: Setter::Path(|o, path| o.output = Some(path)),
                default: None,
            },
        ][..],
        &per_kind_flags!(
            "group-size", "int", group_size,
            shared: group_size,
            "values per quantization group: a power of two, 8..1024 (default {default})",
            kinds: key_group_size, value_group_size, "group size of"
        ),
        &[
            Flag {
                name: "sparsity",
                help:
                    "fraction in [0, 1) of smallest-magnitude values dropped to 0; shrinks the file above\n\
                     1/bits (0.25 at 4 bits), never grows it on the symmetric grid (default {default})",
                setter: Setter::Text {
                    placeholder: "float",
                    apply: |o, v| {
                        o.sparsity = fraction(v)?;
                        Ok(())
                    },
                },
                default: Some(|o| o.sparsity.to_string()),
            },
            Flag {
                name: "metrics-only",
                help: "compress in memory, print metrics, write nothing",
                setter: Setter::Bool(|o, b| o.metrics_only = b),
                default: None,
            },
            Flag {
                name: "decompress",
                help: "restore a packed file to a KV cache in its original dtypes",
                setter: Setter::Bool(|o, b| o.decompress = b),
                default: None,
            },
            Flag {
                name: "reconstruct",
                help: "write the dequantized cache (input dtype) instead of the packed file",
                setter: Setter::Bool(|o, b| o.reconstruct = b),
                default: None,
            },
            Flag {
                name: "verbose",
                help: "per-tensor progress on stderr and tensor_metrics in the JSON",
                setter: Setter::Bool(|o, b| o.verbose = b),
                default: None,
            },
            Flag {
                name: "method",
                help: "preset: adr002 (default: 4-bit symmetric flat groups), kivi\n\
                       (asymmetric, keys per channel along tokens, values per token), or an\n\
                       inference engine's cache type, bit-exact and without LZ4: vllm-fp8-e4m3,\n\
                       vllm-fp8-e5m2 (vLLM/SGLang --kv-cache-dtype), llama-q8_0, llama-q4_0,\n\
                       llama-q4_1, llama-q5_0, llama-q5_1, llama-iq4_nl (llama.cpp -ctk/-ctv),\n\
                       trtllm-nvfp4, trtllm-int8 (TensorRT-LLM), sglang-fp4 (SGLang\n\
                       fp4_mx_block16), hf-quanto-int4, hf-quanto-int2 (transformers'\n\
                       QuantizedCache, quanto backend)",
                setter: Setter::Text {
                    placeholder: "string",
                    apply: |o, v| {
                        o.method = Method::from_name(v).ok_or_else(|| {
                            let engines: Vec<&str> = GRIDS
                                .iter()
                                .filter_map(|spec| spec.engine.as_ref().map(|e| e.method))
                                .collect();
                            format!("must be adr002, kivi, {}", spoken_list(&engines))
                        })?;
                        Ok(())
                    },
                },
                default: None,
            },
            Flag {
                name: "llama-rot",
                help: "llama-* methods: store the cache rotated as llama.cpp does by default\n\
                       since PR #21038 (orthonormal Walsh-Hadamard along head_dim: keys in\n\
                       blocks of the largest power of two >= 64 dividing head_dim, values in\n\
                       blocks of 64; none if head_dim is not a multiple of 64). Without it,\n\
                       the format of LLAMA_ATTN_ROT_DISABLE=1 and older llama.cpp",
                setter: Setter::Bool(|o, b| o.llama_rot = b),
                default: None,
            },
            Flag {
                name: "fp8-scale",
                help: "scales of the vllm-fp8-* methods: unit (default, 1.0 as vLLM without\n\
                       scales), calibrated (per tensor, max|x|/448 for e4m3 or /57344 for e5m2,\n\
                       as llm-compressor's static scales) or dynamic (the same per token and head);\n\
                       of trtllm-nvfp4's k_scale: unit (1.0, a checkpoint without KV scales) or\n\
                       calibrated (max|x|/(6*448) per tensor, ModelOpt's; dynamic is the same)",
                setter: Setter::Text {
                    placeholder: "string",
                    apply: |o, v| {
                        o.fp8_scale = match v {
                            "unit" => Fp8Scale::Unit,
                            "calibrated" => Fp8Scale::Calibrated,
                            "dynamic" => Fp8Scale::Dynamic,
                            _ => return Err("must be unit, calibrated or dynamic".into()),
                        };
                        Ok(())
                    },
                },
                default: None,
            },
        ],
        &per_kind_flags!(
            "bits", "int", bits,
            shared: bits,
            "bits per code: 2, 3, 4, 5, 6 or 8 (default {default})",
            kinds: key_bits, value_bits, "bits per code of"
        ),
        &[Flag {
            name: "layer-bits",
            help: "bits (and group size) per layer and kind, overriding the flags above:\n\
                   RULE;RULE..., RULE = [k|v|kv:]LAYERS=BITS[/GROUP], LAYERS = * or a list\n\
                   of N and N-M; the first rule that matches a tensor wins. Example:\n\
                   \"k:0,29=4;k:*=2\" (keys of layers 0 and 29 at 4 bits, other keys at 2).\n\
                   With -grid ecsq, BITS may be a fraction: that tensor's -rate\n\
                   (\"k:3=2.71\"); with -rate given, every BITS is a rate",
            setter: Setter::Text {
                placeholder: "string",
                apply: |o, v| {
                    o.layer_bits = layer_rules(v)?;
                    Ok(())
                },
            },
            default: None,
        }],
        &per_kind_flags!(
            "outliers", "float", fraction,
            shared: outliers,
            "fraction in [0, 1) of values kept in FP16 beside the codes, those\n\
             whose codes err most (4 bytes each); not with -sparsity (default {default})",
            kinds: key_outliers, value_outliers, "the same for", key_note: " only"
        ),
        &[
            Flag {
                name: "grid",
                help: "sym or asym (uniform grids), or a codebook of 2, 3 or 4 bits: lloyd\n\
                       (Lloyd-Max levels of the Gaussian, for -rotate) or kmeans (levels\n\
                       fitted to each tensor, 2^bits FP16 values stored); a codebook\n\
                       scales each group by its RMS; or ecsq: one uniform step per\n\
                       tensor around each group's mean, the codes entropy coded, so\n\
                       -bits sets the step and the size follows the data (about -bits\n\
                       bits/value; use channel groups of 1024, no -rotate) (default:\n\
                       the method's)",
                setter: Setter::Text {
                    placeholder: "string",
                    apply: |o, v| {
                        let grid = Grid::from_flag(v).ok_or_else(|| {
                            let names: Vec<&str> = GRIDS.iter().map(|spec| spec.flag).collect();
                            format!("must be {}", spoken_list(&names))
                        })?;
                        o.grid = Some(grid);
                        Ok(())
                    },
                },
                default: None,
            },
            Flag {
                name: "rate",
                help: "with -grid ecsq: each tensor's stored size in bits/value, a\n\
                       fraction from 0.5 to 16 such as 2.35; the encoder searches the\n\
                       largest step that fits it (default: the Gaussian step of -bits)",
                setter: Setter::Text {
                    placeholder: "float",
                    apply: |o, v| {
                        let rate = parse_float(v).ok_or(PARSE_ERROR)?;
                        if !RATE_RANGE.contains(&rate) {
                            return Err("must be from 0.5 to 16".into());
                        }
                        o.rate = Some(rate);
                        Ok(())
                    },
                },
                default: None,
            },
            Flag {
                name: "fit",
                help: "how each group's scale is chosen: minmax (the grid spans the\n\
                       group, as ADR-002 and KIVI do) or mse (least squares, clips\n\
                       outliers where that lowers the error; pays at 2 bits)\n\
                       (default {default})",
                setter: Setter::Text {
                    placeholder: "string",
                    apply: |o, v| {
                        o.fit = FITS
                            .iter()
                            .find(|(name, _)| *name == v)
                            .map(|&(_, fit)| fit)
                            .ok_or("must be minmax or mse")?;
                        Ok(())
                    },
                },
                default: Some(|o| {
                    FITS.iter()
                        .find(|(_, fit)| *fit == o.fit)
                        .map_or("", |(name, _)| name)
                        .to_string()
                }),
            },
        ],
        &per_kind_flags!(
            "axis", "string", axis,
            kinds: key_axis, value_axis, "groups of", ": flat, token or channel",
            default: "the method's"
        ),
        &[
            Flag {
                name: "rotate",
                help: "randomized Hadamard rotation of each head vector before quantizing",
                setter: Setter::Bool(|o, b| o.rotate = b),
                default: None,
            },
            Flag {
                name: "rotate-seed",
                help: "seed of -rotate (default {default})",
                setter: Setter::Text {
                    placeholder: "int",
                    apply: |o, v| {
                        o.rotate_seed = parse_uint(v).ok_or(PARSE_ERROR)?;
                        Ok(())
                    },
                },
                default: Some(|o| o.rotate_seed.to_string()),
            },
            Flag {
                name: "sink-tokens",
                help: "first tokens of each sequence kept in FP16 (default {default})",
                setter: Setter::Text {
                    placeholder: "int",
                    apply: |o, v| {
                        o.sink_tokens = token_count(v)?;
                        Ok(())
                    },
                },
                default: Some(|o| o.sink_tokens.to_string()),
            },
            Flag {
                name: "recent-tokens",
                help: "last tokens of each sequence kept in FP16 (default {default})",
                setter: Setter::Text {
                    placeholder: "int",
                    apply: |o, v| {
                        o.recent_tokens = token_count(v)?;
                        Ok(())
                    },
                },
                default: Some(|o| o.recent_tokens.to_string()),
            },
        ],
    ]
    .concat()
});

/// `-fit`'s spellings.
const FITS: [(&str, Fit); 2] = [("minmax", Fit::MinMax), ("mse", Fit::Mse)];

/// The part of the usage text above the flag list.
const USAGE_HEAD: &str = "\
Usage of kv-compress:
  kv-compress -input IN -output OUT [-group-size 64] [-sparsity 0.0] [-verbose]
  kv-compress -input IN -metrics-only [-group-size 64] [-verbose]
  kv-compress -decompress -input IN -output OUT [-verbose]
  kv-compress -input IN -output OUT -reconstruct

Compresses a KV cache (safetensors, F32/F16/BF16) into a packed safetensors
file, prints quality metrics as JSON on stdout, and restores it with -decompress.

Examples (as the original's scripts call it):
  kv-compress -input kv_cache.safetensors -output kv_cache.int4.safetensors -group-size 64 -sparsity 0.0
  kv-compress -input kv_cache.safetensors -metrics-only -group-size 64 -verbose
  kv-compress -decompress -input kv_cache.int4.safetensors -output kv_cache.restored.safetensors

Methods measured on SmolLM2-135M (docs/fidelity.md): entropy-coded codes at
any budget in bits per value (here 3.35), then fixed-width codes at about
4.3, 3.2 and 2.5:
  -method kivi -grid ecsq -rate 3.35 -key-group-size 1024 -value-axis channel -value-group-size 1024 -sink-tokens 1
  -method kivi -bits 4 -rotate -grid sym -sink-tokens 4
  -method kivi -bits 3 -rotate -fit mse -key-group-size 128 -value-axis flat -value-group-size 256 -sink-tokens 1
  -method kivi -bits 2 -rotate -fit mse -key-group-size 64 -value-axis flat -value-group-size 256 -sink-tokens 2 -key-outliers 0.005

Flags:
";

/// Column where flag help starts in the usage text.
const HELP_COLUMN: usize = 23;

/// Usage text for `-h` and flag errors, derived from [`FLAGS`]; mentions
/// `-input` (the bridge probes for it).
pub fn usage() -> &'static str {
    static USAGE: OnceLock<String> = OnceLock::new();
    USAGE.get_or_init(|| {
        let mut text = USAGE_HEAD.to_string();
        let mut entry = |left: String, help: &str| {
            let mut lines = help.lines();
            let first = lines.next().unwrap_or("");
            if left.len() < HELP_COLUMN {
                text.push_str(&format!("{left:<HELP_COLUMN$}{first}\n"));
            } else {
                text.push_str(&format!("{left}  {first}\n"));
            }
            for line in lines {
                text.push_str(&format!("{:HELP_COLUMN$}{}\n", "", line.trim_start()));
            }
        };
        for flag in FLAGS.iter() {
            let placeholder = match flag.setter {
                Setter::Bool(_) => "",
                Setter::Path(_) => " string",
                Setter::Text { placeholder, .. } => placeholder,
            };
            let space = if placeholder.is_empty() || placeholder.starts_with(' ') {
                ""
            } else {
                " "
            };
            entry(
                format!("  -{}{space}{placeholder}", flag.name),
                &flag.help_text(),
            );
        }
        entry("  -h, -help".to_string(), "this text");
        text
    })
}

fn lossy(value: &OsStr) -> String {
    value.to_string_lossy().into_owned()
}

/// Parses the arguments after the program name (`std::env::args_os()`, or
/// any strings).
pub fn parse<S: AsRef<OsStr>>(args: &[S]) -> Result<Command, FlagError> {
    let mut options = Options::default();
    if let Scan::Help = scan(args, |flag, value, _| apply(flag, &mut options, value))? {
        return Ok(Command::Help);
    }
    // Conflicting codec settings are flag errors, found by the codec's own rules.
    options.codec_settings()?;
    Ok(Command::Run(Box::new(options)))
}

/// One flag of a `kv-compress` command line, as it was written.
#[derive(Clone, Debug, PartialEq)]
pub struct WrittenFlag {
    pub name: &'static str,
    /// Its value (`true` for a bare boolean).
    pub value: String,
    /// The words it took: `-name value`, `-name=value` or `-name`.
    pub words: Vec<String>,
}

/// Splits `words`, flags for `kv-compress` written elsewhere (kv-validate's
/// `--variant` and `--sensitivity-flags`), into the flags [`parse`] would
/// read, each value and the settings between them checked as `parse` checks
/// them; with the options they set. `-h` among them is an undefined flag.
pub fn split_words(words: &[&str]) -> Result<(Vec<WrittenFlag>, Options), FlagError> {
    let mut options = Options::default();
    let mut written = Vec::new();
    let scanned = scan(words, |flag, value, taken| {
        apply(flag, &mut options, value)?;
        written.push(WrittenFlag {
            name: flag.name,
            value: lossy(value),
            words: words[taken].iter().map(|word| word.to_string()).collect(),
        });
        Ok(())
    })?;
    if let Scan::Help = scanned {
        return Err(FlagError::Undefined("h".into()));
    }
    options.codec_settings()?;
    Ok((written, options))
}

/// Whether [`scan`] met `-h` (and stopped there) or read every flag.
enum Scan {
    Help,
    Flags,
}

/// Reads `args` flag by flag in Go's syntax, handing each flag, its value
/// and the range of `args` it took to `visit` in order; stops at the first
/// error (the visitor's included), as Go does.
fn scan<S: AsRef<OsStr>>(
    args: &[S],
    mut visit: impl FnMut(&'static Flag, &OsStr, Range<usize>) -> Result<(), FlagError>,
) -> Result<Scan, FlagError> {
    let mut i = 0;
    while i < args.len() {
        let start = i;
        let arg = args[i].as_ref();
        i += 1;
        // A flag's name is UTF-8; an argument that is not is a stray positional
        // unless it follows `-name=`, where the value may be a path.
        let Some((body, inline_value)) = split_flag(arg)? else {
            return match args.get(i) {
                Some(stray) => Err(FlagError::Positional(lossy(stray.as_ref()))),
                None => Ok(Scan::Flags),
            };
        };
        let Some(flag) = FLAGS.iter().find(|flag| flag.name == body) else {
            if body == "h" || body == "help" {
                return Ok(Scan::Help);
            }
            return Err(FlagError::Undefined(body));
        };
        let value: OsString = match (flag.setter, inline_value) {
            (Setter::Bool(_), None) => "true".into(),
            (_, Some(value)) => value,
            (_, None) => match args.get(i) {
                Some(next) => {
                    i += 1;
                    next.as_ref().to_os_string()
                }
                None => return Err(FlagError::MissingValue(body)),
            },
        };
        visit(flag, &value, start..i)?;
    }
    Ok(Scan::Flags)
}

/// A flag argument's name and inline value; `Ok(None)` for `--`, the end of
/// the flags.
fn split_flag(arg: &OsStr) -> Result<Option<(String, Option<OsString>)>, FlagError> {
    let bytes = arg.as_encoded_bytes();
    if bytes == b"--" {
        return Ok(None);
    }
    let body = bytes
        .strip_prefix(b"--")
        .or_else(|| bytes.strip_prefix(b"-"));
    let body = match body {
        Some(body) if bytes != b"-" => body,
        _ => return Err(FlagError::Positional(lossy(arg))),
    };
    if body.is_empty() || body[0] == b'-' || body[0] == b'=' {
        return Err(FlagError::BadSyntax(lossy(arg)));
    }
    let (name, value) = match body.iter().position(|&b| b == b'=') {
        Some(at) => (&body[..at], Some(&body[at + 1..])),
        None => (body, None),
    };
    let name = std::str::from_utf8(name)
        .map_err(|_| FlagError::Undefined(String::from_utf8_lossy(name).into_owned()))?;
    // SAFETY: `name` and `value` are split from `arg`'s encoded bytes at
    // ASCII characters (`-`, `=`), which is what `from_encoded_bytes_unchecked` requires.
    let value =
        value.map(|value| unsafe { OsStr::from_encoded_bytes_unchecked(value) }.to_os_string());
    Ok(Some((name.to_string(), value)))
}

fn apply(flag: &Flag, options: &mut Options, value: &OsStr) -> Result<(), FlagError> {
    let invalid = |reason: String| FlagError::InvalidValue {
        flag: flag.name.to_string(),
        value: lossy(value),
        reason,
    };
    match flag.setter {
        Setter::Path(set) => set(options, PathBuf::from(value)),
        Setter::Bool(set) => {
            let parsed =
                value
                    .to_str()
                    .and_then(parse_bool)
                    .ok_or_else(|| FlagError::InvalidBool {
                        flag: flag.name.to_string(),
                        value: lossy(value),
                    })?;
            set(options, parsed);
        }
        Setter::Text { apply, .. } => {
            let text = value
                .to_str()
                .ok_or_else(|| invalid("not valid UTF-8".into()))?;
            apply(options, text).map_err(invalid)?;
        }
    }
    Ok(())
}

/// Go's `strconv.ParseBool`.
fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Go's `strconv.ParseInt(s, 0, 64)`: optional sign, `0x`/`0o`/`0b`/leading-`0`
/// prefixes, `_` between digits only with a prefix.
fn parse_int(value: &str) -> Option<i64> {
    let (negative, unsigned) = match value.as_bytes().first()? {
        b'-' => (true, &value[1..]),
        b'+' => (false, &value[1..]),
        _ => (false, value),
    };
    let magnitude = i128::from(parse_uint(unsigned)?);
    i64::try_from(if negative { -magnitude } else { magnitude }).ok()
}

/// Go's `strconv.ParseUint(s, 0, 64)`.
fn parse_uint(value: &str) -> Option<u64> {
    let lower = value.to_ascii_lowercase();
    let (radix, digits) = if let Some(rest) = lower.strip_prefix("0x") {
        (16, rest)
    } else if let Some(rest) = lower.strip_prefix("0o") {
        (8, rest)
    } else if let Some(rest) = lower.strip_prefix("0b") {
        (2, rest)
    } else if lower.len() > 1 && lower.starts_with('0') {
        (8, &lower[1..])
    } else {
        (10, &lower[..])
    };
    let digits = if radix == 10 {
        digits.to_string()
    } else {
        // Go allows '_' after a base prefix and between digits, nowhere else.
        let digits = digits.strip_prefix('_').unwrap_or(digits);
        if digits.starts_with('_') || digits.ends_with('_') || digits.contains("__") {
            return None;
        }
        digits.replace('_', "")
    };
    if digits.is_empty() || digits.starts_with('+') || digits.starts_with('-') {
        return None;
    }
    u64::from_str_radix(&digits, radix).ok()
}

/// Go's `strconv.ParseFloat(s, 64)` for the forms a user types (no hex floats).
fn parse_float(value: &str) -> Option<f64> {
    let lower = value.to_ascii_lowercase();
    let unsigned = lower.trim_start_matches(['+', '-']);
    let named = matches!(unsigned, "inf" | "infinity" | "nan");
    if value.is_empty()
        || (!named && !unsigned.starts_with(|c: char| c.is_ascii_digit() || c == '.'))
    {
        return None;
    }
    value.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Command, FlagError> {
        parse(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    fn options(args: &[&str]) -> Options {
        match run(args) {
            Ok(Command::Run(options)) => *options,
            other => panic!("{args:?} gave {other:?}"),
        }
    }

    #[test]
    fn the_bridge_invocations_parse() {
        let o = options(&[
            "-input",
            "in.st",
            "-output",
            "out.st",
            "-group-size",
            "64",
            "-sparsity",
            "0.0",
            "-verbose",
        ]);
        assert_eq!(o.input, Some(PathBuf::from("in.st")));
        assert_eq!(o.output, Some(PathBuf::from("out.st")));
        assert_eq!((o.group_size, o.sparsity, o.verbose), (64, 0.0, true));
        let o = options(&["-input", "in.st", "-metrics-only", "-group-size", "64"]);
        assert!(o.metrics_only && o.output.is_none());
        let o = options(&["-decompress", "-input", "a", "-output", "b"]);
        assert!(o.decompress);
    }

    #[test]
    fn every_value_syntax_means_the_same() {
        for args in [
            &["-group-size", "32"][..],
            &["-group-size=32"],
            &["--group-size", "32"],
            &["--group-size=32"],
            &["-group-size", "0x20"],
            &["-group-size", "+32"],
            &["-group-size", "040"],
        ] {
            assert_eq!(options(args).group_size, 32, "{args:?}");
        }
    }

    #[test]
    fn booleans_follow_strconv_parse_bool() {
        for value in ["1", "t", "T", "TRUE", "true", "True"] {
            assert!(options(&[&format!("-verbose={value}")]).verbose, "{value}");
        }
        for value in ["0", "f", "F", "FALSE", "false", "False"] {
            assert!(
                !options(&["-verbose", &format!("--verbose={value}")]).verbose,
                "{value}"
            );
        }
        assert_eq!(
            run(&["-verbose=yes"]),
            Err(FlagError::InvalidBool {
                flag: "verbose".into(),
                value: "yes".into()
            })
        );
    }

    #[test]
    fn a_bool_never_takes_the_next_argument() {
        assert_eq!(
            run(&["-verbose", "false"]),
            Err(FlagError::Positional("false".into()))
        );
    }

    #[test]
    fn a_value_flag_takes_the_next_argument_even_if_it_looks_like_a_flag() {
        assert_eq!(
            options(&["-input", "-verbose"]).input,
            Some(PathBuf::from("-verbose"))
        );
        assert_eq!(options(&["-input="]).input, Some(PathBuf::from("")));
    }

    #[test]
    fn last_setting_wins() {
        assert_eq!(
            options(&["-group-size", "32", "-group-size=128"]).group_size,
            128
        );
    }

    #[test]
    fn double_dash_ends_the_flags() {
        assert!(options(&["-verbose", "--"]).verbose);
        assert_eq!(
            run(&["--", "-verbose"]),
            Err(FlagError::Positional("-verbose".into()))
        );
    }

    #[test]
    fn help_in_every_spelling() {
        for flag in ["-h", "-help", "--help", "--h", "-help=1"] {
            assert_eq!(run(&["-input", "x", flag]), Ok(Command::Help), "{flag}");
        }
    }

    #[test]
    fn errors_read_like_go() {
        assert_eq!(
            run(&["-x"]).unwrap_err().to_string(),
            "flag provided but not defined: -x"
        );
        assert_eq!(
            run(&["-input"]).unwrap_err().to_string(),
            "flag needs an argument: -input"
        );
        assert_eq!(
            run(&["-group-size", "abc"]).unwrap_err().to_string(),
            "invalid value \"abc\" for flag -group-size: parse error"
        );
        assert_eq!(
            run(&["---x"]).unwrap_err(),
            FlagError::BadSyntax("---x".into())
        );
        assert_eq!(
            run(&["-=x"]).unwrap_err(),
            FlagError::BadSyntax("-=x".into())
        );
        assert_eq!(
            run(&["stray"]).unwrap_err(),
            FlagError::Positional("stray".into())
        );
        assert_eq!(run(&["-"]).unwrap_err(), FlagError::Positional("-".into()));
    }

    #[test]
    fn out_of_range_values_are_errors_not_clamps() {
        for args in [
            &["-group-size", "48"][..],
            &["-group-size", "4"],
            &["-group-size", "2048"],
            &["-group-size", "-64"],
            &["-sparsity", "1"],
            &["-sparsity", "-0.1"],
            &["-sparsity", "nan"],
            &["-sparsity", "inf"],
            &["-bits", "7"],
            &["-key-bits", "1"],
            &["-value-bits", "16"],
            &["-key-group-size", "100"],
            &["-value-group-size", "0"],
            &["-fit", "best"],
            &["-outliers", "1"],
            &["-key-outliers", "-0.01"],
            &["-value-outliers", "nan"],
            &["-grid", "both"],
            &["-key-axis", "row"],
            &["-method", "zip"],
            &["-sink-tokens", "-1"],
            &["-grid", "ecsq", "-rate", "0.4"],
            &["-grid", "ecsq", "-rate", "inf"],
        ] {
            assert!(
                matches!(run(args), Err(FlagError::InvalidValue { .. })),
                "{args:?}"
            );
        }
        for args in [
            &["-sparsity", "0.1", "-outliers", "0.01"][..],
            &["-key-outliers=0.01", "-sparsity", "0.5"],
            &["-rate", "2.5"],
            &["-grid", "asym", "-rate", "2.5"],
            &["-layer-bits", "k:0=2.5"],
        ] {
            assert!(matches!(run(args), Err(FlagError::Settings(_))), "{args:?}");
        }
        assert!(run(&["-sparsity", "0.1", "-outliers", "0"]).is_ok());
        let ecsq = options(&[
            "-rate=2.35",
            "-grid",
            "ecsq",
            "-layer-bits",
            "k:1=2.71;v:*=4",
        ]);
        assert_eq!((ecsq.grid, ecsq.rate), (Some(Grid::Ecsq), Some(2.35)));
        let rules: Vec<_> = ecsq.layer_bits.iter().map(|r| (r.bits, r.rate)).collect();
        assert_eq!(rules, [(3, Some(2.71)), (4, None)]);
        for text in ["k:1=2.5x", "k:1=0.4", "k:1=7"] {
            assert!(
                matches!(
                    run(&["-grid", "ecsq", "-layer-bits", text]),
                    Err(FlagError::InvalidValue { .. })
                ),
                "{text}"
            );
        }
        assert_eq!(options(&["-sparsity", "0.999"]).sparsity, 0.999);
        assert_eq!(options(&["-sparsity", ".5"]).sparsity, 0.5);
        assert_eq!(options(&["-sparsity", "5e-1"]).sparsity, 0.5);
    }

    #[test]
    fn engine_methods_fix_the_engines_layout() {
        let q4 = options(&["-method", "llama-q4_0", "-bits", "2", "-group-size", "64"]);
        assert_eq!(q4.method, Method::Engine(Grid::Q4_0));
        let params = base_params(&q4, TensorKind::Key);
        assert_eq!(
            (params.grid, params.bits, params.axis, params.group_size),
            (Grid::Q4_0, 4, Axis::Token, 32)
        );
        for (scale, axis, unit) in [
            ("unit", Axis::Flat, true),
            ("calibrated", Axis::Flat, false),
            ("dynamic", Axis::Token, false),
        ] {
            let o = options(&["-method", "vllm-fp8-e5m2", "-fp8-scale", scale]);
            let params = base_params(&o, TensorKind::Value);
            assert_eq!(
                (params.grid, params.bits, params.axis, params.unit_scale),
                (Grid::Fp8E5m2, 8, axis, unit),
                "{scale}"
            );
        }
        let refused = run(&["-method", "llama-q3_0"]).unwrap_err().to_string();
        assert!(refused.contains("llama-q5_1"), "{refused}");
    }

    #[test]
    fn method_flags_parse() {
        let o = options(&[
            "-method",
            "kivi",
            "-bits",
            "3",
            "-grid",
            "asym",
            "-key-axis",
            "channel",
            "-value-axis=token",
            "-rotate",
            "-rotate-seed",
            "7",
            "-sink-tokens",
            "4",
            "-recent-tokens",
            "16",
            "-reconstruct",
        ]);
        assert_eq!(o.method, Method::Kivi);
        assert_eq!(
            (o.bits, o.grid, o.key_axis, o.value_axis),
            (
                3,
                Some(Grid::Asymmetric),
                Some(Axis::Channel),
                Some(Axis::Token)
            )
        );
        assert_eq!(
            (
                o.rotate,
                o.rotate_seed,
                o.sink_tokens,
                o.recent_tokens,
                o.reconstruct
            ),
            (true, 7, 4, 16, true)
        );
    }

    #[test]
    fn go_integer_syntax() {
        assert_eq!(parse_int("1_000"), None);
        assert_eq!(parse_int("0x_40"), Some(64));
        assert_eq!(parse_int("0b1000000"), Some(64));
        assert_eq!(parse_int("0o100"), Some(64));
        assert_eq!(parse_int("--1"), None);
        assert_eq!(parse_int(""), None);
        assert_eq!(parse_int("-9223372036854775808"), Some(i64::MIN));
    }
}

#[cfg(test)]
mod more_tests {
    use super::*;
    use std::os::unix::ffi::OsStringExt;

    fn options(args: &[OsString]) -> Options {
        match parse(args) {
            Ok(Command::Run(options)) => *options,
            other => panic!("{args:?} gave {other:?}"),
        }
    }

    fn os(s: &str) -> OsString {
        s.into()
    }

    #[test]
    fn a_path_need_not_be_utf8_but_a_number_must_be() {
        let name = OsString::from_vec(b"caf\xe9.safetensors".to_vec());
        let o = options(&[os("-input"), name.clone(), os("-output"), name.clone()]);
        assert_eq!(o.input, Some(PathBuf::from(&name)));
        let mut inline = b"-output=".to_vec();
        inline.extend_from_slice(name.as_encoded_bytes());
        assert_eq!(
            options(&[OsString::from_vec(inline)]).output,
            Some(PathBuf::from(&name))
        );
        let bad = OsString::from_vec(b"6\xff4".to_vec());
        let error = parse(&[os("-group-size"), bad]).unwrap_err();
        assert!(
            matches!(&error, FlagError::InvalidValue { flag, reason, .. } if flag == "group-size" && reason == "not valid UTF-8"),
            "{error:?}"
        );
        let error = parse(&[OsString::from_vec(b"-verbose=\xff".to_vec())]).unwrap_err();
        assert!(matches!(error, FlagError::InvalidBool { .. }), "{error:?}");
        let error = parse(&[OsString::from_vec(b"-\xff".to_vec())]).unwrap_err();
        assert!(matches!(error, FlagError::Undefined(_)), "{error:?}");
        let error = parse(&[OsString::from_vec(b"\xff".to_vec())]).unwrap_err();
        assert!(matches!(error, FlagError::Positional(_)), "{error:?}");
    }

    #[test]
    fn usage_lists_every_flag_once_with_its_help() {
        let text = usage();
        let (_, list) = text.split_once("\nFlags:\n").expect("a flag list");
        for flag in FLAGS.iter() {
            let line = format!("  -{} ", flag.name);
            let found = list
                .lines()
                .filter(|l| l.starts_with(&line) || l.trim_end() == line.trim_end())
                .count();
            assert_eq!(found, 1, "-{}", flag.name);
            let help = flag.help_text();
            let first = help.lines().next().unwrap();
            assert!(list.contains(first), "-{}", flag.name);
            assert!(!help.contains("{default}"), "-{}", flag.name);
        }
        // Defaults come from the options' own defaults.
        assert!(list.contains("8..1024 (default 64)\n"), "{list}");
        assert!(list.contains("(default 118156218559856)\n"), "{list}");
        assert!(
            list.contains("\n                       (default minmax)\n"),
            "{list}"
        );
        assert!(
            list.contains("bits per code of *_key tensors (default: -bits)\n"),
            "{list}"
        );
        assert!(text.contains("-input string") && text.contains("-group-size 64 -sparsity 0.0"));
        let names: std::collections::HashSet<_> = FLAGS.iter().map(|f| f.name).collect();
        assert_eq!(names.len(), FLAGS.len(), "a flag is defined twice");
    }

    #[test]
    fn layer_bits_rules_parse_and_match_first_wins() {
        let o = options(&[os("-layer-bits"), os("k:0,29=4;k:*=2; v:3-5=8/128;1=3")]);
        let rules = &o.layer_bits;
        assert_eq!(rules.len(), 4);
        assert_eq!(
            rules[0],
            LayerRule {
                keys: true,
                values: false,
                layers: Some(vec![0..=0, 29..=29]),
                bits: 4,
                rate: None,
                group_size: None
            }
        );
        assert_eq!(
            rules[2],
            LayerRule {
                keys: false,
                values: true,
                layers: Some(vec![3..=5]),
                bits: 8,
                rate: None,
                group_size: Some(128)
            }
        );
        assert!(rules[3].keys && rules[3].values);
        let first = |kind, layer| {
            rules
                .iter()
                .find(|r| r.matches(kind, layer))
                .map(|r| r.bits)
        };
        assert_eq!(first(TensorKind::Key, Some(29)), Some(4));
        assert_eq!(first(TensorKind::Key, Some(1)), Some(2));
        assert_eq!(
            first(TensorKind::Key, None),
            Some(2),
            "* covers names outside the rule"
        );
        assert_eq!(first(TensorKind::Value, Some(4)), Some(8));
        assert_eq!(first(TensorKind::Value, Some(1)), Some(3));
        assert_eq!(first(TensorKind::Value, Some(2)), None);
        assert_eq!(first(TensorKind::Value, None), None);
        for bad in [
            "k:0=7", "x:0=4", "k:a=4", "k:3-1=4", "k:0", "k:0=4/48", "k:0=4/",
        ] {
            assert!(
                matches!(
                    parse(&[os("-layer-bits"), os(bad)]),
                    Err(FlagError::InvalidValue { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn written_flags_keep_their_words_and_are_checked_like_the_command_line() {
        let words = [
            "-method",
            "kivi",
            "--group-size=32",
            "-rotate",
            "-bits",
            "3",
        ];
        let (written, options) = split_words(&words).unwrap();
        let taken: Vec<(&str, &str, Vec<String>)> = written
            .iter()
            .map(|w| (w.name, w.value.as_str(), w.words.clone()))
            .collect();
        let owned = |words: &[&str]| words.iter().map(|w| w.to_string()).collect::<Vec<_>>();
        assert_eq!(
            taken,
            [
                ("method", "kivi", owned(&["-method", "kivi"])),
                ("group-size", "32", owned(&["--group-size=32"])),
                ("rotate", "true", owned(&["-rotate"])),
                ("bits", "3", owned(&["-bits", "3"])),
            ]
        );
        assert_eq!((options.group_size, options.bits), (32, 3));
        for (bad, error) in [
            (&["-bits", "7"][..], "invalid value \"7\" for flag -bits"),
            (&["-group-size"], "flag needs an argument: -group-size"),
            (&["-nope"], "flag provided but not defined: -nope"),
            (&["-h"], "flag provided but not defined: -h"),
            (
                &["-sparsity", "0.1", "-outliers", "0.1"],
                "invalid codec settings",
            ),
        ] {
            let message = split_words(bad).unwrap_err().to_string();
            assert!(message.starts_with(error), "{bad:?}: {message}");
        }
    }
}

/// What the flags make of each tensor's codec settings.
#[cfg(test)]
mod codec_settings_tests {
    use super::*;

    fn options(args: &[&str]) -> Options {
        match parse(args) {
            Ok(Command::Run(options)) => *options,
            other => panic!("{other:?}"),
        }
    }

    fn params_for(options: &Options, tensor_name: &str) -> CodecParams {
        options.codec_settings().unwrap().params_for(tensor_name)
    }

    #[test]
    fn every_old_invocation_means_adr002_group_64() {
        for args in [
            &[
                "-input",
                "a",
                "-output",
                "b",
                "-group-size",
                "64",
                "-sparsity",
                "0.0",
            ][..],
            &[
                "-input",
                "a",
                "-metrics-only",
                "-group-size",
                "64",
                "-verbose",
            ],
            &["-input", "a", "-output", "b"],
        ] {
            let o = options(args);
            assert_eq!(
                params_for(&o, "layer_0_key"),
                CodecParams::adr002(64),
                "{args:?}"
            );
            assert_eq!(
                params_for(&o, "layer_0_value"),
                CodecParams::adr002(64),
                "{args:?}"
            );
        }
    }

    #[test]
    fn kivi_groups_keys_per_channel_and_values_per_token() {
        let o = options(&["-method", "kivi", "-bits", "2", "-group-size", "32"]);
        let key = params_for(&o, "layer_3_key");
        let value = params_for(&o, "layer_3_value");
        assert_eq!(
            (key.grid, key.axis, key.bits, key.group_size),
            (Grid::Asymmetric, Axis::Channel, 2, 32)
        );
        assert_eq!((value.grid, value.axis), (Grid::Asymmetric, Axis::Token));
        // Explicit flags override the preset, per tensor kind.
        let o = options(&[
            "-method",
            "kivi",
            "-grid",
            "sym",
            "-value-axis",
            "flat",
            "-rotate",
            "-sink-tokens",
            "4",
        ]);
        let value = params_for(&o, "v");
        assert_eq!(
            (value.grid, value.axis, value.sink_tokens),
            (Grid::Symmetric, Axis::Flat, 4)
        );
        assert_eq!(value.rotation_seed, Some(crate::flags::DEFAULT_ROTATE_SEED));
        assert_eq!(params_for(&o, "k_key").axis, Axis::Channel);
    }

    #[test]
    fn key_and_value_flags_override_bits_and_group_size_per_kind() {
        let o = options(&[
            "-method",
            "kivi",
            "-bits",
            "2",
            "-group-size",
            "64",
            "-key-bits",
            "3",
            "-key-group-size",
            "128",
            "-value-group-size=256",
            "-fit",
            "mse",
        ]);
        let key = params_for(&o, "layer_0_key");
        let value = params_for(&o, "layer_0_value");
        assert_eq!((key.bits, key.group_size, key.fit), (3, 128, Fit::Mse));
        assert_eq!(
            (value.bits, value.group_size, value.fit),
            (2, 256, Fit::Mse)
        );
        // Each falls back to the shared flag, and the last setting wins.
        let o = options(&[
            "-bits",
            "8",
            "-value-bits",
            "2",
            "-value-bits",
            "4",
            "-key-group-size",
            "32",
        ]);
        let key = params_for(&o, "layer_0_key");
        let value = params_for(&o, "layer_0_value");
        assert_eq!((key.bits, key.group_size, key.fit), (8, 32, Fit::MinMax));
        assert_eq!((value.bits, value.group_size), (4, 64));
        // ecsq rates: a fractional rule is a rate; under -rate every rule is.
        let rates = |args: &[&str]| -> Vec<Option<f64>> {
            let o = options(args);
            ["layer_0_key", "layer_1_key", "layer_0_value"]
                .map(|name| params_for(&o, name).rate)
                .to_vec()
        };
        let rules = ["-grid", "ecsq", "-layer-bits", "k:0=2.71;k:1=4"];
        assert_eq!(rates(&rules), [Some(2.71), None, None]);
        let with_rate = [&rules[..], &["-rate", "3.3"]].concat();
        assert_eq!(rates(&with_rate), [Some(2.71), Some(4.0), Some(3.3)]);
        let o = options(&["-outliers", "0.01", "-key-outliers=0.02"]);
        assert_eq!(params_for(&o, "layer_0_key").outliers, 0.02);
        assert_eq!(params_for(&o, "layer_0_value").outliers, 0.01);
        assert_eq!(params_for(&options(&[]), "layer_0_key").outliers, 0.0);
    }

    #[test]
    fn layer_bits_override_the_kind_flags_for_the_layers_they_name() {
        let o = options(&[
            "-bits",
            "3",
            "-key-group-size",
            "32",
            "-layer-bits",
            "k:0,29=4;k:*=2/128;v:5=8",
        ]);
        let bits_and_group = |name: &str| {
            let p = params_for(&o, name);
            (p.bits, p.group_size)
        };
        assert_eq!(bits_and_group("layer_0_key"), (4, 32));
        assert_eq!(bits_and_group("layer_29_key"), (4, 32));
        assert_eq!(bits_and_group("layer_7_key"), (2, 128));
        assert_eq!(bits_and_group("layer_5_value"), (8, 64));
        assert_eq!(bits_and_group("layer_6_value"), (3, 64));
        assert_eq!(bits_and_group("other"), (3, 64));
    }

    #[test]
    fn conflicting_settings_are_flag_errors_naming_the_tensors() {
        let message = |args: &[&str]| match parse(args) {
            Err(error @ FlagError::Settings(_)) => error.to_string(),
            other => panic!("{args:?}: {other:?}"),
        };
        assert_eq!(
            message(&["-sparsity", "0.1", "-outliers", "0.01"]),
            "invalid codec settings for key tensors: outliers cannot be combined with sparsity"
        );
        assert_eq!(
            message(&["-value-outliers", "0.01", "-sparsity", "0.1"]),
            "invalid codec settings for value tensors: outliers cannot be combined with sparsity"
        );
        assert!(message(&["-rate", "2.5"]).contains("is for the ecsq grid only"));
        assert_eq!(
            message(&["-grid", "lloyd", "-bits", "3", "-layer-bits", "k:1=2;v:0=8"]),
            "invalid codec settings for value tensors under -layer-bits rule 2: \
             the lloyd grid takes 2, 3 or 4 bits, not 8"
        );
        assert_eq!(
            message(&["-grid", "ecsq", "-outliers", "0.01"]),
            "invalid codec settings for key tensors: the ecsq grid does not combine with outliers"
        );
        // A rule for the other kind only is not held against this one.
        assert!(parse(&["-grid", "lloyd", "-bits", "3", "-layer-bits", "k:1=2"]).is_ok());
    }
}
