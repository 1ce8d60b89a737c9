//! `kv-compress`: parse Go-style flags, run, print one JSON object on stdout
//! or one `Error: ...` line on stderr. Exit 0 on success (a failed quality
//! check included), 1 on a run error, 2 on a command-line error, as Go does.

use std::io::Write;
use std::process::ExitCode;

use kv_compress::flags::{self, usage, Command};

fn main() -> ExitCode {
    // Before any thread exists (the signal handler below starts one).
    kvformat::heap::keep_freed_buffers();
    // SIGINT/SIGTERM/SIGHUP then remove this run's temp files instead of
    // leaving an output-sized one behind.
    if let Err(error) = kvformat::atomic::remove_temp_files_on_termination() {
        eprintln!("Error: cannot install the signal handler: {error}");
        return ExitCode::FAILURE;
    }
    // OS strings: `std::env::args()` panics on an argument that is not UTF-8.
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let options = match flags::parse(&args) {
        Ok(Command::Run(options)) => *options,
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
    // The outputs are put in place only once the report is delivered: a run
    // whose stdout is unwritable fails (exit 1) and leaves the old files.
    match kv_compress::pipeline::prepare(&options) {
        Ok((report, outputs)) => {
            let mut stdout = std::io::stdout().lock();
            if let Err(error) = stdout
                .write_all(report.to_json().as_bytes())
                .and_then(|()| stdout.flush())
            {
                eprintln!("Error: cannot write the report to stdout: {error}");
                return ExitCode::FAILURE;
            }
            match outputs.commit() {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("Error: {error}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(error) => {
            eprintln!("Error: {error}");
            if error.is_usage() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
