//! The scoring progress: a bar on stderr for a person, or, in a worker of
//! `--devices` (told so by [`PROGRESS_ENV`]), machine-readable lines
//! `kv-validate-progress DONE TOTAL` (tokens) on stderr that the parent
//! sums into one bar ([`Combined`]).

use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};

/// Set (to anything) in a worker's environment: print progress lines.
pub const PROGRESS_ENV: &str = "KV_VALIDATE_PROGRESS_LINES";
/// The first word of a progress line.
pub const PROGRESS_PREFIX: &str = "kv-validate-progress";

/// Progress in scored tokens.
pub struct TokenProgress {
    bar: ProgressBar,
    /// `Some((done, total))` when progress lines are asked for.
    lines: Option<Mutex<(u64, u64)>>,
}

impl TokenProgress {
    /// A bar of `total` tokens when `visible`; lines instead when the
    /// environment asks for them (a worker runs `--quiet`).
    pub fn new(total: u64, visible: bool) -> Self {
        let lines = std::env::var_os(PROGRESS_ENV).map(|_| Mutex::new((0, total)));
        if let Some(lines) = &lines {
            print_line(&lines.lock().unwrap_or_else(|e| e.into_inner()));
        }
        TokenProgress {
            bar: if visible {
                bar(total)
            } else {
                ProgressBar::hidden()
            },
            lines,
        }
    }

    pub fn inc(&self, tokens: u64) {
        self.bar.inc(tokens);
        if let Some(lines) = &self.lines {
            let mut state = lines.lock().unwrap_or_else(|e| e.into_inner());
            state.0 += tokens;
            print_line(&state);
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

fn print_line(&(done, total): &(u64, u64)) {
    use std::io::Write;
    // A parent gone is no reason to fail: it will not read the line anyway.
    let _ = writeln!(std::io::stderr(), "{PROGRESS_PREFIX} {done} {total}");
}

fn bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} tokens, {per_sec}, ETA {eta}")
            .expect("static progress template is valid")
            .progress_chars("=> "),
    );
    bar.set_message("scoring");
    bar
}

/// `Some((done, total))` when `line` is a progress line.
pub fn parse_line(line: &str) -> Option<(u64, u64)> {
    let mut words = line.strip_prefix(PROGRESS_PREFIX)?.split_whitespace();
    let done = words.next()?.parse().ok()?;
    let total = words.next()?.parse().ok()?;
    words.next().is_none().then_some((done, total))
}

/// The workers' progress lines summed into one bar.
pub struct Combined {
    bar: ProgressBar,
    workers: Mutex<Vec<(u64, u64)>>,
}

impl Combined {
    pub fn new(workers: usize, visible: bool) -> Self {
        Combined {
            bar: if visible {
                bar(0)
            } else {
                ProgressBar::hidden()
            },
            workers: Mutex::new(vec![(0, 0); workers]),
        }
    }

    /// Worker `worker` reported `done` of `total` tokens.
    pub fn update(&self, worker: usize, done: u64, total: u64) {
        let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(state) = workers.get_mut(worker) {
            *state = (done, total);
        }
        let (done, total) = workers
            .iter()
            .fold((0, 0), |(d, t), &(done, total)| (d + done, t + total));
        self.bar.set_length(total);
        self.bar.set_position(done);
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_parse_and_other_lines_do_not() {
        assert_eq!(parse_line("kv-validate-progress 16 128"), Some((16, 128)));
        for other in [
            "error: cannot open x",
            "kv-validate-progress 16",
            "kv-validate-progress a 1",
            "kv-validate-progress 1 2 3",
        ] {
            assert_eq!(parse_line(other), None, "{other}");
        }
    }

    #[test]
    fn the_combined_bar_sums_the_workers() {
        let combined = Combined::new(2, false);
        combined.update(0, 3, 10);
        combined.update(1, 5, 12);
        combined.update(0, 4, 10);
        assert_eq!(combined.bar.position(), 9);
        assert_eq!(combined.bar.length(), Some(22));
    }
}
