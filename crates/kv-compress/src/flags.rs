//! Go `flag`-package command-line syntax, by hand, so every invocation the
//! original's Python bridge makes parses exactly as Go parsed it:
//! `-name value`, `-name=value`, `--name[=value]`, booleans as `-b` or
//! `-b=false` (never `-b false`), `--` ends the flags, last setting wins.
//! Pure: no I/O, so it is unit-tested and fuzzable.

use std::path::PathBuf;

/// Key-axis / value-axis choices of `-key-axis` and `-value-axis`.
pub use kvformat::codec::{Axis, Fit, Grid};

/// Seed of `-rotate` when `-rotate-seed` is not given (documented in docs/format.md).
pub const DEFAULT_ROTATE_SEED: u64 = 0x6b76_636f_6d70; // "kvcomp"

/// Group sizes accepted by `-group-size`: powers of two in this range
/// (the contract documents 32, 64 and 128).
pub const GROUP_SIZE_RANGE: std::ops::RangeInclusive<usize> = 8..=1024;

/// A named set of method flags (`-method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// The original's method: symmetric 4-bit, flat groups (ADR-002).
    Adr002,
    /// KIVI: asymmetric, keys grouped per channel along tokens, values per token.
    Kivi,
}

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
}

impl Default for Options {
    fn default() -> Self {
        Options {
            input: None,
            output: None,
            group_size: 64,
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
        }
    }
}

/// What the command line asks for.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// `-h`, `-help`, `--help`: print usage, exit 0.
    Help,
    Run(Options),
}

/// A command-line error; `main` prints it with the usage and exits 2, as Go does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlagError {
    #[error("flag provided but not defined: -{0}")]
    Undefined(String),
    #[error("flag needs an argument: -{0}")]
    MissingValue(String),
    #[error("invalid value {value:?} for flag -{flag}: {reason}")]
    InvalidValue { flag: String, value: String, reason: String },
    #[error("invalid boolean value {value:?} for -{flag}: parse error")]
    InvalidBool { flag: String, value: String },
    #[error("{0}")]
    Conflict(String),
    #[error("bad flag syntax: {0}")]
    BadSyntax(String),
    #[error("unexpected argument {0:?} (every option is a -flag; booleans take -flag=false, not -flag false)")]
    Positional(String),
}

/// Usage text for `-h` and flag errors: mentions `-input` (the bridge probes for it).
pub const USAGE: &str = "\
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

Methods measured on SmolLM2-135M (docs/fidelity.md), about 4.3, 3.2 and 2.5 bits per value:
  -method kivi -bits 4 -rotate -grid sym -sink-tokens 4
  -method kivi -bits 3 -rotate -fit mse -key-group-size 128 -value-axis flat -value-group-size 256 -sink-tokens 1
  -method kivi -bits 2 -rotate -fit mse -key-group-size 64 -value-axis flat -value-group-size 256 -sink-tokens 2 -key-outliers 0.005

Flags:
  -input string        input file (a KV cache, or a packed file with -decompress)
  -output string       output file (required unless -metrics-only)
  -group-size int      values per quantization group: a power of two, 8..1024 (default 64)
  -key-group-size int  group size of *_key tensors (default: -group-size)
  -value-group-size int  group size of other tensors (default: -group-size)
  -sparsity float      fraction in [0, 1) of smallest-magnitude values dropped to 0; shrinks the file above 1/bits (0.25 at 4 bits), never grows it on the symmetric grid (default 0)
  -metrics-only        compress in memory, print metrics, write nothing
  -decompress          restore a packed file to a KV cache in its original dtypes
  -reconstruct         write the dequantized cache (input dtype) instead of the packed file
  -verbose             per-tensor progress on stderr and tensor_metrics in the JSON
  -method string       preset: adr002 (default: 4-bit symmetric flat groups) or kivi
                       (asymmetric, keys per channel along tokens, values per token)
  -bits int            bits per code: 2, 3, 4 or 8 (default 4)
  -key-bits int        bits per code of *_key tensors (default: -bits)
  -value-bits int      bits per code of other tensors (default: -bits)
  -outliers float      fraction in [0, 1) of values kept in FP16 beside the codes, those
                       whose codes err most (4 bytes each); not with -sparsity (default 0)
  -key-outliers float  the same for *_key tensors only (default: -outliers)
  -value-outliers float  the same for other tensors (default: -outliers)
  -grid string         sym or asym (default: the method's)
  -fit string          how each group's scale is chosen: minmax (the grid spans the
                       group, as ADR-002 and KIVI do) or mse (least squares, clips
                       outliers where that lowers the error; pays at 2 bits)
                       (default minmax)
  -key-axis string     groups of *_key tensors: flat, token or channel (default: the method's)
  -value-axis string   groups of other tensors: flat, token or channel (default: the method's)
  -rotate              randomized Hadamard rotation of each head vector before quantizing
  -rotate-seed int     seed of -rotate (default 118156218559856)
  -sink-tokens int     first tokens of each sequence kept in FP16 (default 0)
  -recent-tokens int   last tokens of each sequence kept in FP16 (default 0)
  -h, -help            this text
";

/// Parses the arguments after the program name.
pub fn parse(args: &[String]) -> Result<Command, FlagError> {
    let mut options = Options::default();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        if arg == "--" {
            return match args.get(i) {
                Some(stray) => Err(FlagError::Positional(stray.clone())),
                None => Ok(Command::Run(options)),
            };
        }
        let body = match arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) {
            Some(body) if !arg.is_empty() && arg != "-" => body,
            _ => return Err(FlagError::Positional(arg.clone())),
        };
        if body.is_empty() || body.starts_with('-') || body.starts_with('=') {
            return Err(FlagError::BadSyntax(arg.clone()));
        }
        let (name, inline_value) = match body.split_once('=') {
            Some((name, value)) => (name, Some(value.to_string())),
            None => (body, None),
        };
        let Some(kind) = flag_kind(name) else {
            if name == "h" || name == "help" {
                return Ok(Command::Help);
            }
            return Err(FlagError::Undefined(name.to_string()));
        };
        let value = match (kind, inline_value) {
            (FlagKind::Bool, None) => "true".to_string(),
            (_, Some(value)) => value,
            (FlagKind::Value, None) => match args.get(i) {
                Some(next) => {
                    i += 1;
                    next.clone()
                }
                None => return Err(FlagError::MissingValue(name.to_string())),
            },
        };
        set(&mut options, name, &value)?;
    }
    let outliers = [Some(options.outliers), options.key_outliers, options.value_outliers];
    if options.sparsity > 0.0 && outliers.iter().flatten().any(|&f| f > 0.0) {
        return Err(FlagError::Conflict(
            "-sparsity and -outliers (or -key-outliers, -value-outliers) cannot be combined; use one".into(),
        ));
    }
    Ok(Command::Run(options))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum FlagKind {
    Bool,
    Value,
}

fn flag_kind(name: &str) -> Option<FlagKind> {
    match name {
        "verbose" | "metrics-only" | "decompress" | "reconstruct" | "rotate" => Some(FlagKind::Bool),
        "input" | "output" | "group-size" | "key-group-size" | "value-group-size" | "sparsity" | "method" | "bits" | "key-bits" | "value-bits" | "fit" | "outliers" | "key-outliers" | "value-outliers" | "grid" | "key-axis" | "value-axis"
        | "rotate-seed" | "sink-tokens" | "recent-tokens" => Some(FlagKind::Value),
        _ => None,
    }
}

fn set(options: &mut Options, name: &str, value: &str) -> Result<(), FlagError> {
    let invalid = |reason: &str| FlagError::InvalidValue {
        flag: name.to_string(),
        value: value.to_string(),
        reason: reason.to_string(),
    };
    let boolean = || parse_bool(value).ok_or_else(|| FlagError::InvalidBool {
        flag: name.to_string(),
        value: value.to_string(),
    });
    let count = || parse_uint(value).ok_or_else(|| invalid("parse error"));
    match name {
        "input" => options.input = Some(PathBuf::from(value)),
        "output" => options.output = Some(PathBuf::from(value)),
        "verbose" => options.verbose = boolean()?,
        "metrics-only" => options.metrics_only = boolean()?,
        "decompress" => options.decompress = boolean()?,
        "reconstruct" => options.reconstruct = boolean()?,
        "rotate" => options.rotate = boolean()?,
        "group-size" | "key-group-size" | "value-group-size" => {
            let size = parse_int(value).ok_or_else(|| invalid("parse error"))?;
            let size = usize::try_from(size)
                .ok()
                .filter(|s| s.is_power_of_two() && GROUP_SIZE_RANGE.contains(s))
                .ok_or_else(|| invalid("must be a power of two from 8 to 1024 (32, 64 or 128 as documented)"))?;
            match name {
                "group-size" => options.group_size = size,
                "key-group-size" => options.key_group_size = Some(size),
                _ => options.value_group_size = Some(size),
            }
        }
        "sparsity" => {
            let sparsity: f64 = parse_float(value).ok_or_else(|| invalid("parse error"))?;
            if !(0.0..1.0).contains(&sparsity) {
                return Err(invalid("must be in [0, 1)"));
            }
            options.sparsity = sparsity;
        }
        "bits" | "key-bits" | "value-bits" => {
            let bits = match parse_int(value).ok_or_else(|| invalid("parse error"))? {
                2 => 2,
                3 => 3,
                4 => 4,
                8 => 8,
                _ => return Err(invalid("must be 2, 3, 4 or 8")),
            };
            match name {
                "bits" => options.bits = bits,
                "key-bits" => options.key_bits = Some(bits),
                _ => options.value_bits = Some(bits),
            }
        }
        "outliers" | "key-outliers" | "value-outliers" => {
            let fraction: f64 = parse_float(value).ok_or_else(|| invalid("parse error"))?;
            if !(0.0..1.0).contains(&fraction) {
                return Err(invalid("must be in [0, 1)"));
            }
            match name {
                "outliers" => options.outliers = fraction,
                "key-outliers" => options.key_outliers = Some(fraction),
                _ => options.value_outliers = Some(fraction),
            }
        }
        "fit" => {
            options.fit = match value {
                "minmax" => Fit::MinMax,
                "mse" => Fit::Mse,
                _ => return Err(invalid("must be minmax or mse")),
            }
        }
        "method" => {
            options.method = match value {
                "adr002" => Method::Adr002,
                "kivi" => Method::Kivi,
                _ => return Err(invalid("must be adr002 or kivi")),
            }
        }
        "grid" => {
            options.grid = Some(match value {
                "sym" => Grid::Symmetric,
                "asym" => Grid::Asymmetric,
                _ => return Err(invalid("must be sym or asym")),
            })
        }
        "key-axis" | "value-axis" => {
            let axis = match value {
                "flat" => Axis::Flat,
                "token" => Axis::Token,
                "channel" => Axis::Channel,
                _ => return Err(invalid("must be flat, token or channel")),
            };
            if name == "key-axis" {
                options.key_axis = Some(axis);
            } else {
                options.value_axis = Some(axis);
            }
        }
        "rotate-seed" => options.rotate_seed = count()?,
        "sink-tokens" => options.sink_tokens = usize::try_from(count()?).map_err(|_| invalid("too large"))?,
        "recent-tokens" => options.recent_tokens = usize::try_from(count()?).map_err(|_| invalid("too large"))?,
        _ => unreachable!("flag_kind() admitted an unhandled flag -{name}"),
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
    if value.is_empty() || (!named && !unsigned.starts_with(|c: char| c.is_ascii_digit() || c == '.')) {
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
            Ok(Command::Run(options)) => options,
            other => panic!("{args:?} gave {other:?}"),
        }
    }

    #[test]
    fn the_bridge_invocations_parse() {
        let o = options(&["-input", "in.st", "-output", "out.st", "-group-size", "64", "-sparsity", "0.0", "-verbose"]);
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
            assert!(!options(&["-verbose", &format!("--verbose={value}")]).verbose, "{value}");
        }
        assert_eq!(
            run(&["-verbose=yes"]),
            Err(FlagError::InvalidBool { flag: "verbose".into(), value: "yes".into() })
        );
    }

    #[test]
    fn a_bool_never_takes_the_next_argument() {
        assert_eq!(run(&["-verbose", "false"]), Err(FlagError::Positional("false".into())));
    }

    #[test]
    fn a_value_flag_takes_the_next_argument_even_if_it_looks_like_a_flag() {
        assert_eq!(options(&["-input", "-verbose"]).input, Some(PathBuf::from("-verbose")));
        assert_eq!(options(&["-input="]).input, Some(PathBuf::from("")));
    }

    #[test]
    fn last_setting_wins() {
        assert_eq!(options(&["-group-size", "32", "-group-size=128"]).group_size, 128);
    }

    #[test]
    fn double_dash_ends_the_flags() {
        assert!(options(&["-verbose", "--"]).verbose);
        assert_eq!(run(&["--", "-verbose"]), Err(FlagError::Positional("-verbose".into())));
    }

    #[test]
    fn help_in_every_spelling() {
        for flag in ["-h", "-help", "--help", "--h", "-help=1"] {
            assert_eq!(run(&["-input", "x", flag]), Ok(Command::Help), "{flag}");
        }
    }

    #[test]
    fn errors_read_like_go() {
        assert_eq!(run(&["-x"]).unwrap_err().to_string(), "flag provided but not defined: -x");
        assert_eq!(run(&["-input"]).unwrap_err().to_string(), "flag needs an argument: -input");
        assert_eq!(
            run(&["-group-size", "abc"]).unwrap_err().to_string(),
            "invalid value \"abc\" for flag -group-size: parse error"
        );
        assert_eq!(run(&["---x"]).unwrap_err(), FlagError::BadSyntax("---x".into()));
        assert_eq!(run(&["-=x"]).unwrap_err(), FlagError::BadSyntax("-=x".into()));
        assert_eq!(run(&["stray"]).unwrap_err(), FlagError::Positional("stray".into()));
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
            &["-bits", "5"],
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
        ] {
            assert!(matches!(run(args), Err(FlagError::InvalidValue { .. })), "{args:?}");
        }
        for args in [
            &["-sparsity", "0.1", "-outliers", "0.01"][..],
            &["-key-outliers=0.01", "-sparsity", "0.5"],
        ] {
            assert!(matches!(run(args), Err(FlagError::Conflict(_))), "{args:?}");
        }
        assert!(run(&["-sparsity", "0.1", "-outliers", "0"]).is_ok());
        assert_eq!(options(&["-sparsity", "0.999"]).sparsity, 0.999);
        assert_eq!(options(&["-sparsity", ".5"]).sparsity, 0.5);
        assert_eq!(options(&["-sparsity", "5e-1"]).sparsity, 0.5);
    }

    #[test]
    fn method_flags_parse() {
        let o = options(&[
            "-method", "kivi", "-bits", "3", "-grid", "asym", "-key-axis", "channel", "-value-axis=token", "-rotate",
            "-rotate-seed", "7", "-sink-tokens", "4", "-recent-tokens", "16", "-reconstruct",
        ]);
        assert_eq!(o.method, Method::Kivi);
        assert_eq!((o.bits, o.grid, o.key_axis, o.value_axis), (3, Some(Grid::Asymmetric), Some(Axis::Channel), Some(Axis::Token)));
        assert_eq!((o.rotate, o.rotate_seed, o.sink_tokens, o.recent_tokens, o.reconstruct), (true, 7, 4, 16, true));
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
