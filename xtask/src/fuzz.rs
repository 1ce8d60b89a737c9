//! `cargo xtask fuzz --seconds N [--target NAME]`: builds the libFuzzer
//! targets of `fuzz/` and runs each for N seconds, seeded with real files.
//!
//! No cargo-fuzz install and no nightly toolchain: the stable compiler accepts
//! the nightly-only flags cargo-fuzz passes (sanitizer coverage, AddressSanitizer)
//! under `RUSTC_BOOTSTRAP=1`, so this builds the fuzz crate with them itself,
//! into `target/fuzz`, away from the normal build. Any crash, panic, hang,
//! single allocation over [`MALLOC_LIMIT_MB`] or resident memory over
//! [`RSS_LIMIT_MB`] fails the task; the input that did it is saved under
//! `target/fuzz/artifacts/<target>/` for `testdata/fuzz-regressions/<target>/`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use kvformat::codec::{Axis, CodecParams, Grid};
use kvformat::packed::{pack_tensor, write_packed};
use kvformat::{write_cache, CacheDtype, CacheTensor, Sidecar};

use crate::util::{cargo, repo_root, run_checked, target_dir};

/// The targets, as named in `fuzz/Cargo.toml`.
pub const TARGETS: [&str; 4] = [
    "cache_reader",
    "packed_decoder",
    "sidecar_parser",
    "flag_parser",
];

/// Allocation budget: any single allocation above this is a bug (hostile
/// sizes must be rejected before allocating), and so is a resident set above
/// [`RSS_LIMIT_MB`]. Inputs are at most [`MAX_INPUT_BYTES`], so honest use
/// stays far below both.
const MALLOC_LIMIT_MB: u32 = 512;
const RSS_LIMIT_MB: u32 = 2048;
const MAX_INPUT_BYTES: u32 = 32 * 1024;
/// One input taking longer than this is a hang.
const HANG_SECONDS: u32 = 10;

/// What libFuzzer is built with: cargo-fuzz's defaults (sanitizer coverage
/// with comparison tracing, AddressSanitizer) plus debug assertions and
/// overflow checks, so an arithmetic overflow is a crash too.
const RUSTFLAGS: &str = "-Cpasses=sancov-module \
    -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
    -Cllvm-args=-sanitizer-coverage-pc-table \
    -Cllvm-args=-sanitizer-coverage-trace-compares \
    -Cllvm-args=-simplifycfg-branch-fold-threshold=0 \
    --cfg fuzzing \
    -Zsanitizer=address -Cunsafe-allow-abi-mismatch=sanitizer \
    -Cdebug-assertions -Coverflow-checks -Cforce-frame-pointers";

struct Options {
    seconds: u32,
    targets: Vec<&'static str>,
}

fn parse_options(args: &[String]) -> Result<Options> {
    let mut seconds = None;
    let mut targets = TARGETS.to_vec();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--seconds" => {
                seconds = Some(value()?.parse().context("--seconds takes a whole number")?)
            }
            "--target" => {
                let name = value()?;
                let Some(&target) = TARGETS.iter().find(|t| *t == name) else {
                    bail!(
                        "unknown fuzz target `{name}` (one of {})",
                        TARGETS.join(", ")
                    );
                };
                targets = vec![target];
            }
            other => bail!("unknown fuzz argument `{other}` (--seconds N [--target NAME])"),
        }
    }
    let seconds = seconds.context("--seconds N is required")?;
    Ok(Options { seconds, targets })
}

/// One target's run: executions and whether libFuzzer found nothing.
struct Outcome {
    target: &'static str,
    executions: u64,
    passed: bool,
}

pub fn run(args: &[String]) -> Result<std::process::ExitCode> {
    let options = parse_options(args)?;
    let fuzz_dir = target_dir().join("fuzz");
    let binaries = build(&fuzz_dir)?;
    let mut outcomes = Vec::new();
    for &target in &options.targets {
        let corpus = fuzz_dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        write_seeds(target, &corpus)?;
        outcomes.push(run_target(
            &binaries.join(target),
            target,
            &corpus,
            &fuzz_dir,
            options.seconds,
        )?);
    }
    eprintln!("\n| target | seconds | executions | result |\n|---|---:|---:|---|");
    for o in &outcomes {
        let result = if o.passed {
            "no crash, hang or over-budget allocation"
        } else {
            "FAILED (see above)"
        };
        eprintln!(
            "| {} | {} | {} | {result} |",
            o.target, options.seconds, o.executions
        );
    }
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.passed)
        .map(|o| o.target)
        .collect();
    if failed.is_empty() {
        Ok(std::process::ExitCode::SUCCESS)
    } else {
        eprintln!(
            "error: fuzzing found a bug in {}; the inputs are in {}",
            failed.join(", "),
            fuzz_dir.join("artifacts").display()
        );
        Ok(std::process::ExitCode::FAILURE)
    }
}

/// Builds every target and returns the directory holding the binaries.
fn build(fuzz_dir: &Path) -> Result<PathBuf> {
    let host = host_triple()?;
    eprintln!(
        "xtask: building the fuzz targets (sanitizer coverage + ASan) into {}...",
        fuzz_dir.display()
    );
    run_checked(
        Command::new(cargo())
            .current_dir(repo_root().join("fuzz"))
            .env("RUSTC_BOOTSTRAP", "1")
            .env("RUSTFLAGS", RUSTFLAGS)
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .args([
                "build",
                "--release",
                "--bins",
                "--target",
                &host,
                "--target-dir",
            ])
            .arg(fuzz_dir),
    )?;
    Ok(fuzz_dir.join(host).join("release"))
}

/// The compiler's host triple; the fuzz build names it so RUSTFLAGS reach
/// only the targets, never build scripts or proc macros.
fn host_triple() -> Result<String> {
    let output = Command::new("rustc")
        .arg("-vV")
        .output()
        .context("running rustc -vV")?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("host: ").map(str::to_string))
        .context("rustc -vV names no host")
}

fn run_target(
    binary: &Path,
    target: &'static str,
    corpus: &Path,
    fuzz_dir: &Path,
    seconds: u32,
) -> Result<Outcome> {
    let artifacts = fuzz_dir.join("artifacts").join(target);
    std::fs::create_dir_all(&artifacts)?;
    let regressions = repo_root()
        .join("testdata")
        .join("fuzz-regressions")
        .join(target);
    eprintln!("xtask: fuzzing {target} for {seconds} s...");
    let mut command = Command::new(binary);
    command
        .arg(corpus)
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg(format!("-malloc_limit_mb={MALLOC_LIMIT_MB}"))
        .arg(format!("-timeout={HANG_SECONDS}"))
        .arg(format!("-max_len={MAX_INPUT_BYTES}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-print_final_stats=1");
    // Saved regressions seed the run too (read-only: new finds go to `corpus`).
    if regressions.is_dir() {
        command.arg(&regressions);
    }
    let output = command
        .output()
        .with_context(|| format!("running {}", binary.display()))?;
    let log = String::from_utf8_lossy(&output.stderr);
    let executions = log
        .lines()
        .find_map(|line| line.strip_prefix("stat::number_of_executed_units:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    if !output.status.success() {
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        eprintln!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
    }
    Ok(Outcome {
        target,
        executions,
        passed: output.status.success(),
    })
}

/// Writes the target's seed inputs into its corpus directory (overwriting
/// earlier seeds of the same name; what the fuzzer added stays).
fn write_seeds(target: &str, corpus: &Path) -> Result<()> {
    match target {
        "cache_reader" => cache_seeds(corpus),
        "packed_decoder" => packed_seeds(corpus),
        "sidecar_parser" => sidecar_seeds(corpus),
        "flag_parser" => flag_seeds(corpus),
        other => bail!("no seeds for {other}"),
    }
}

/// Small deterministic values with the awkward cases mixed in: zeros, a
/// denormal, huge and tiny magnitudes, a constant run.
fn seed_values(count: usize) -> Vec<f32> {
    (0..count)
        .map(|i| match i % 16 {
            0 => 0.0,
            1 => 1e-40,
            2 => 3.0e4,
            3 => -1e-6,
            4..=7 => 0.5,
            _ => ((i as f32) * 0.37).sin() * 2.0,
        })
        .collect()
}

const SEED_SHAPE: [usize; 4] = [1, 2, 8, 16];

fn seed_tensors() -> Vec<(String, Vec<f32>)> {
    let count = SEED_SHAPE.iter().product();
    ["layer_0_key", "layer_0_value"]
        .iter()
        .map(|n| (n.to_string(), seed_values(count)))
        .collect()
}

fn seed_metadata() -> BTreeMap<String, String> {
    BTreeMap::from([("model_name".to_string(), "fuzz-seed".to_string())])
}

fn cache_seeds(corpus: &Path) -> Result<()> {
    let tensors = seed_tensors();
    for dtype in [CacheDtype::F32, CacheDtype::F16, CacheDtype::BF16] {
        let views: Vec<CacheTensor<'_>> = tensors
            .iter()
            .map(|(name, values)| CacheTensor {
                name,
                dtype,
                shape: &SEED_SHAPE,
                values,
            })
            .collect();
        let path = corpus.join(format!("seed-cache-{}.safetensors", dtype.torch_name()));
        write_cache(&path, &views, &seed_metadata())?;
        // The Go original's writer: the same file without header padding.
        let unpadded = unpad_header(&std::fs::read(&path)?)?;
        std::fs::write(
            corpus.join(format!(
                "seed-cache-{}-unpadded.safetensors",
                dtype.torch_name()
            )),
            unpadded,
        )?;
    }
    Ok(())
}

/// The file with the trailing spaces of its header JSON removed.
fn unpad_header(bytes: &[u8]) -> Result<Vec<u8>> {
    let len = usize::try_from(u64::from_le_bytes(bytes[..8].try_into()?))?;
    let header = std::str::from_utf8(&bytes[8..8 + len])?.trim_end();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&bytes[8 + len..]);
    Ok(out)
}

/// One codec configuration per method and option the CLI offers.
fn seed_codecs() -> Vec<(&'static str, CodecParams)> {
    let adr002 = CodecParams::adr002(64);
    let kivi = |axis| CodecParams {
        grid: Grid::Asymmetric,
        axis,
        group_size: 8,
        ..CodecParams::adr002(8)
    };
    vec![
        ("adr002-g64", adr002.clone()),
        ("adr002-g32", CodecParams::adr002(32)),
        ("adr002-g128", CodecParams::adr002(128)),
        (
            "bits2",
            CodecParams {
                bits: 2,
                ..adr002.clone()
            },
        ),
        (
            "bits3",
            CodecParams {
                bits: 3,
                ..adr002.clone()
            },
        ),
        (
            "bits8",
            CodecParams {
                bits: 8,
                ..adr002.clone()
            },
        ),
        ("kivi-channel", kivi(Axis::Channel)),
        ("kivi-token", kivi(Axis::Token)),
        (
            "rotated",
            CodecParams {
                rotation_seed: Some(7),
                ..adr002.clone()
            },
        ),
        (
            "kept-tokens",
            CodecParams {
                sink_tokens: 2,
                recent_tokens: 2,
                ..adr002.clone()
            },
        ),
        (
            "ecsq",
            CodecParams {
                grid: Grid::Ecsq,
                axis: Axis::Channel,
                sink_tokens: 1,
                rate: Some(2.5),
                ..CodecParams::adr002(1024)
            },
        ),
        (
            "sparse",
            CodecParams {
                sparsity: 0.5,
                ..adr002
            },
        ),
    ]
}

fn packed_seeds(corpus: &Path) -> Result<()> {
    let tensors = seed_tensors();
    for (label, params) in seed_codecs() {
        for dtype in [CacheDtype::F32, CacheDtype::F16, CacheDtype::BF16] {
            let packed = tensors
                .iter()
                .map(|(name, values)| {
                    let stored = dtype.to_f32(&dtype.from_f32(values)).into_owned();
                    pack_tensor(name, dtype, &SEED_SHAPE, &stored, &params)
                        .map(|(tensor, _)| tensor)
                })
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("packing the {label} seed"))?;
            let path = corpus.join(format!(
                "seed-packed-{label}-{}.safetensors",
                dtype.torch_name()
            ));
            write_packed(&path, &packed, &seed_metadata())?;
        }
    }
    Ok(())
}

fn sidecar_seeds(corpus: &Path) -> Result<()> {
    let sidecar = Sidecar {
        num_layers: 22,
        num_kv_heads: 4,
        seq_len: 2048,
        head_dim: 64,
        dtype: "float16".into(),
        model_name: "TinyLlama/TinyLlama-1.1B-Chat-v1.0".into(),
    };
    sidecar.write(&corpus.join("seed-sidecar.metadata.json"))?;
    // Python's json.dump spelling: one line, ", " and ": " separators.
    let python = r#"{"num_layers": 2, "num_kv_heads": 4, "seq_len": 16, "head_dim": 64, "dtype": "bfloat16", "model_name": "m"}"#;
    std::fs::write(corpus.join("seed-sidecar-python.metadata.json"), python)?;
    Ok(())
}

fn flag_seeds(corpus: &Path) -> Result<()> {
    let lines: [&[&str]; 8] = [
        &[
            "-input",
            "in.safetensors",
            "-output",
            "out.safetensors",
            "-group-size",
            "64",
            "-sparsity",
            "0.0",
            "-verbose",
        ],
        &[
            "-input",
            "in.safetensors",
            "-metrics-only",
            "-group-size",
            "64",
            "-verbose",
        ],
        &[
            "-decompress",
            "-input",
            "in.safetensors",
            "-output",
            "out.safetensors",
            "-verbose",
        ],
        &["-h"],
        &[
            "--input=in",
            "--output=out",
            "-group-size=0x40",
            "-sparsity=5e-1",
            "-decompress=false",
            "-reconstruct=true",
        ],
        &[
            "-method",
            "kivi",
            "-bits",
            "2",
            "-grid",
            "asym",
            "-key-axis",
            "channel",
            "-value-axis",
            "token",
            "-rotate",
            "-rotate-seed",
            "0b101",
            "-sink-tokens",
            "4",
            "-recent-tokens",
            "8",
            "--",
            "x",
        ],
        &["-input", "a", "-output"],
        &["-grid", "ecsq", "-rate", "2.35", "-key-group-size", "1024"],
    ];
    for (i, line) in lines.iter().enumerate() {
        std::fs::write(corpus.join(format!("seed-flags-{i}")), line.join("\0"))?;
    }
    Ok(())
}
