//! `kv-compress`: parse Go-style flags, run, print one JSON object on stdout
//! or one `Error: ...` line on stderr. Exit 0 on success (a failed quality
//! check included), 1 on a run error, 2 on a command-line error, as Go does.

use std::io::Write;
use std::process::ExitCode;

use kv_compress::flags::{self, usage, Command};

fn main() -> ExitCode {
    // OS strings: `std::env::args()` panics on an argument that is not UTF-8.
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let options = match flags::parse(&args) {
        Ok(Command::Run(options)) => options,
        Ok(Command::Help) => {
            eprint!("{}", usage());
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            eprintln!("{error}");
            eprint!("{}", usage());
            return ExitCode::from(2);
        }
    };
    match kv_compress::run(&options) {
        Ok(report) => {
            let mut stdout = std::io::stdout().lock();
            match stdout.write_all(report.to_json().as_bytes()).and_then(|()| stdout.flush()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("Error: cannot write the report to stdout: {error}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(error) => {
            eprintln!("Error: {error}");
            ExitCode::FAILURE
        }
    }
}
