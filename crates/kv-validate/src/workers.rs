//! `--devices`: one worker per device, each this very binary
//! (`std::env::current_exe`) with the parent's command line, its device, its
//! balanced part of the windows (`--worker-shard J/D`) and a records file of
//! its own in a scratch directory. Their progress lines
//! ([`crate::progress`]) become one bar; their records are merged by the
//! code `kv-validate merge` runs and reported as a single run is. A worker
//! that fails stops the others (SIGTERM, so each cleans up its kv-compress
//! and scratch files, then SIGKILL) and fails the run with its error; no
//! output is written then. Each worker leads a process group of its own and
//! gets SIGTERM from the kernel when the parent dies (`PR_SET_PDEATHSIG`),
//! so a signal that stops the parent stops the workers, which clean up.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::cleanup::ScratchDir;
use crate::conclude::{evaluation_of, report, Console};
use crate::data::{load_text, TextSource};
use crate::model::load::{fetch_hub_model, ModelSource};
use crate::plan::WorkersPlan;
use crate::progress::{parse_line, Combined, PROGRESS_ENV};
use crate::records::{combine, merge};
use crate::shard::Shard;

/// Flags of the parent that a worker must not get: their values are the
/// parent's (outputs, the device list, the scratch directory: each worker
/// gets one of its own inside the parent's). Each takes a value.
const PARENT_ONLY: [&str; 7] = [
    "--devices",
    "--scratch-dir",
    "--records",
    "--json",
    "--sweep-csv",
    "--sweep-plot",
    "--sweep-kld-plot",
];
/// Flags whose value may start with a dash: their value is copied verbatim,
/// never taken for a flag.
const HYPHEN_VALUES: [&str; 4] = [
    "--compress-arg",
    "--variant",
    "--sensitivity-flags",
    "--threshold",
];
/// How long a stopped worker gets to clean up before SIGKILL.
const GRACE: Duration = Duration::from_secs(5);
/// How often the parent looks at its workers.
const POLL: Duration = Duration::from_millis(50);

/// The parent's arguments (after the program name) without
/// [`PARENT_ONLY`] flags and `--quiet`.
pub fn worker_args(parent: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut args = Vec::new();
    let mut parent = parent.into_iter();
    while let Some(arg) = parent.next() {
        let text = arg.to_string_lossy();
        let name = text.split_once('=').map_or(&*text, |(name, _)| name);
        let has_value = text.contains('=');
        if PARENT_ONLY.contains(&name) {
            if !has_value {
                parent.next();
            }
        } else if text == "--quiet" {
        } else if HYPHEN_VALUES.contains(&name) && !has_value {
            args.push(arg);
            args.extend(parent.next());
        } else if text == "--" {
            args.push(arg);
            args.extend(parent.by_ref());
        } else {
            args.push(arg);
        }
    }
    args
}

/// One running worker.
struct Worker {
    number: usize,
    device: String,
    /// `None` once reaped.
    child: Option<Child>,
    records: PathBuf,
    /// Its last stderr line that was not progress (its error, when it fails).
    last_line: Arc<Mutex<Option<String>>>,
    reader: Option<JoinHandle<()>>,
}

impl Worker {
    fn spawn(
        number: usize,
        count: usize,
        device: &str,
        args: &[OsString],
        dir: &ScratchDir,
        progress: &Arc<Combined>,
    ) -> anyhow::Result<Worker> {
        let exe = std::env::current_exe().context("cannot locate the running kv-validate")?;
        let records = dir.path().join(format!("worker-{number}.json"));
        // Inside the parent's directory, so whatever a stopped worker leaves
        // there goes when the parent's directory does.
        let scratch = dir.path().join(format!("worker-{number}"));
        std::fs::create_dir(&scratch)
            .with_context(|| format!("cannot make {}", scratch.display()))?;
        let shard = Shard {
            index: number,
            count,
        };
        let mut command = Command::new(&exe);
        command
            .args(args)
            .args([OsStr::new("--device"), OsStr::new(device)])
            .arg("--worker-shard")
            .arg(shard.to_string())
            .arg("--records")
            .arg(&records)
            .arg("--scratch-dir")
            .arg(&scratch)
            .arg("--quiet")
            .env(PROGRESS_ENV, "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        {
            use std::os::unix::process::CommandExt;
            command.process_group(0);
            // SAFETY: prctl(2) is async-signal-safe; nothing else runs
            // between fork and exec.
            unsafe {
                command.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start worker {number} (device {device})"))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let last_line = Arc::new(Mutex::new(None));
        let reader = {
            let (last_line, progress) = (last_line.clone(), progress.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    match parse_line(&line) {
                        Some((done, total)) => progress.update(number, done, total),
                        None if !line.trim().is_empty() => {
                            *last_line.lock().unwrap_or_else(|e| e.into_inner()) = Some(line)
                        }
                        None => {}
                    }
                }
            })
        };
        Ok(Worker {
            number,
            device: device.to_string(),
            child: Some(child),
            records,
            last_line,
            reader: Some(reader),
        })
    }

    /// `Some(status)` once the worker has exited (reaped).
    fn poll(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        let Some(child) = &mut self.child else {
            return Ok(None);
        };
        let Some(status) = child.try_wait()? else {
            return Ok(None);
        };
        self.child = None;
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        Ok(Some(status))
    }

    /// Asks a running worker to stop (SIGTERM: it kills its kv-compress and
    /// removes its scratch files), then kills its group after [`GRACE`].
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id() as libc::pid_t;
        // SAFETY: kill(2) has no memory-safety preconditions; the worker is
        // not yet reaped, so its pid (and group id) is still ours.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + GRACE;
        while Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(POLL);
        }
        // SAFETY: as above; still not reaped.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
        let _ = child.wait();
    }

    fn failure(&self, status: ExitStatus) -> String {
        let last = self.last_line.lock().unwrap_or_else(|e| e.into_inner());
        let why = match (&*last, status.code()) {
            (Some(line), _) => line.strip_prefix("error: ").unwrap_or(line).to_string(),
            (None, Some(code)) => format!("exit status {code}"),
            (None, None) => format!("{status}"),
        };
        format!(
            "worker {} (device {}) failed: {why}",
            self.number, self.device
        )
    }
}

/// Carries out `--devices`: fetches what the hub holds once, runs the
/// workers, merges their records and reports; `Ok(passed)` as a single run.
pub fn run_workers(plan: &WorkersPlan, console: &Console<'_>) -> anyhow::Result<bool> {
    let started = Instant::now();
    if let ModelSource::Hub { repo, revision } = &plan.model {
        (console.status)("fetching the model once for the workers");
        fetch_hub_model(repo, revision, plan.show_progress)?;
    }
    if let TextSource::WikiText2 { .. } = &plan.text {
        load_text(&plan.text, plan.show_progress)?;
    }
    let dir = ScratchDir::new("kv-validate-workers-", &plan.scratch_parent).with_context(|| {
        format!(
            "cannot make the workers' directory in {}",
            plan.scratch_parent.display()
        )
    })?;
    let args = worker_args(std::env::args_os().skip(1));
    let progress = Arc::new(Combined::new(plan.devices.len(), plan.show_progress));
    (console.status)(&format!(
        "{} workers: {}",
        plan.devices.len(),
        plan.devices.join(", ")
    ));
    let mut workers = Vec::with_capacity(plan.devices.len());
    for (number, device) in plan.devices.iter().enumerate() {
        let worker = Worker::spawn(number, plan.devices.len(), device, &args, &dir, &progress);
        match worker {
            Ok(worker) => workers.push(worker),
            Err(error) => {
                workers.iter_mut().for_each(Worker::stop);
                return Err(error);
            }
        }
    }
    if let Err(error) = wait_all(&mut workers) {
        progress.finish();
        workers.iter_mut().for_each(Worker::stop);
        return Err(error);
    }
    progress.finish();
    let paths: Vec<PathBuf> = workers.iter().map(|w| w.records.clone()).collect();
    let mut records = if plan.slice.is_partial() {
        combine(&paths)?
    } else {
        merge(&paths)?
    };
    records.timings.total = started.elapsed();
    if let Some(path) = &plan.records {
        records.write(path).context("cannot write the records")?;
    }
    if plan.slice.is_partial() {
        (console.status)(&format!(
            "{} windows of {} evaluated on {} devices, records in {}; `kv-validate merge` \
             combines the slices",
            records.windows.len(),
            records.windows_planned,
            plan.devices.len(),
            plan.records
                .as_deref()
                .unwrap_or(std::path::Path::new("-"))
                .display()
        ));
        return Ok(true);
    }
    report(&plan.outputs, &records, &evaluation_of(&records), console)
}

impl Drop for Worker {
    /// An early return (an error, a panic) must not leave a worker running.
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits for every worker; the first failure as an error.
fn wait_all(workers: &mut [Worker]) -> anyhow::Result<()> {
    let mut running = workers.len();
    while running > 0 {
        for worker in workers.iter_mut() {
            if let Some(status) = worker.poll()? {
                running -= 1;
                if !status.success() {
                    bail!("{}", worker.failure(status));
                }
            }
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<OsString> {
        words.iter().map(OsString::from).collect()
    }

    #[test]
    fn workers_get_the_parents_flags_but_its_outputs_and_devices() {
        let parent = args(&[
            "--gguf",
            "m.gguf",
            "--devices",
            "cpu,cpu",
            "--json=r.json",
            "--records",
            "all.json",
            "--compress-arg",
            "--json",
            "--quiet",
            "--shard",
            "1/4",
            "--sweep-plot",
            "s.svg",
            "--variant",
            "a=-bits 4",
        ]);
        assert_eq!(
            worker_args(parent),
            args(&[
                "--gguf",
                "m.gguf",
                "--compress-arg",
                "--json",
                "--shard",
                "1/4",
                "--variant",
                "a=-bits 4",
            ])
        );
    }
}
