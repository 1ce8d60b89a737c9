//! `kv-validate`: the command line over the library. It parses the flags,
//! resolves them into a plan ([`kv_validate::plan`]), carries it out
//! ([`kv_validate::run`]), prints the report and maps the outcome to the
//! exit code (0 passed, 1 failed, 2 error).

use std::process::ExitCode;

use clap::Parser;

use kv_validate::cli::Cli;
use kv_validate::plan::Plan;
use kv_validate::run::{run, Console};

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
    let quiet = cli.quiet;
    let console = Console {
        report: &|text| print!("{text}"),
        status: &|message| {
            if !quiet {
                eprintln!("{message}");
            }
        },
    };
    let outcome = Plan::from_cli(&cli)
        .map_err(anyhow::Error::from)
        .and_then(|plan| run(plan, &console));
    match outcome {
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
