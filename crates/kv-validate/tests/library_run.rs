//! A validation is a library call: the plan of a command line, carried out
//! in this process, prints what the binary prints for the same command line
//! (all but the wall time) and gives its verdict.

mod common;

use std::cell::RefCell;

use clap::Parser;
use common::*;
use kv_validate::cli::Cli;
use kv_validate::plan::Plan;
use kv_validate::run::{run, Console};

/// `text` without its `Wall time:` line, the one that differs run to run.
fn without_wall_time(text: &str) -> String {
    text.lines()
        .filter(|line| !line.starts_with("Wall time:"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn a_run_in_process_reports_what_the_binary_prints() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let prose = prose_path();
    let mut args = short_run_args(model.hf_dir.to_str().unwrap(), prose.to_str().unwrap(), "2");
    // The tiny random model's delta (about 6) passes this threshold.
    args.extend(["--threshold", "10"]);
    let compressor = kv_compress();
    let spawned = kv_validate(&args, &compressor);
    expect_success(&spawned);

    // The only test of this binary: no other thread reads the environment.
    std::env::set_var("KV_COMPRESS_PATH", &compressor);
    let cli = Cli::parse_from(std::iter::once("kv-validate").chain(args.iter().copied()));
    let plan = Plan::from_cli(&cli).unwrap();
    let report = RefCell::new(String::new());
    let console = Console {
        report: &|text| report.borrow_mut().push_str(text),
        status: &|_| {},
    };
    let passed = run(plan, &console).unwrap();

    assert!(passed, "the spawned run passed, so must this one");
    let printed = String::from_utf8(spawned.stdout).unwrap();
    assert!(printed.contains("Status: PASSED"), "{printed}");
    assert_eq!(
        without_wall_time(&report.into_inner()),
        without_wall_time(&printed)
    );
}
