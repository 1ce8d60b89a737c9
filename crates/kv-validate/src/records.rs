//! Per-window records: every scored token's NLL on the baseline and on each
//! variant, its KL divergence and top-1 agreement, and the compressor's
//! metrics per window. Every report is a pure function of them
//! ([`crate::evaluate::Evaluation::from_records`]), so a run over all windows
//! and `kv-validate merge` of slices (`--windows START..END`, e.g. one per
//! GPU or machine) give the same figures to the last digit.
//!
//! A records file is JSON: the run's description (model, text, protocol,
//! compressor, pass criteria, variants, windows in the plan), the windows it
//! evaluated and its timings. Slices must agree on all of the description
//! but the device: the merged report lists each device the slices ran on. f64 values survive the round trip exactly
//! (serde_json's `float_roundtrip`, which kvformat turns on).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::run_types::{RunDescription, RunRecords, Timings, Variant, WindowRecord};

/// `format` of a records file.
pub const RECORDS_FORMAT: &str = "kv-validate records";
/// `version` of the layout this build writes and reads. Version 2 added the
/// run's content digests (`crate::identity`); version 1 files name model and
/// text by path alone, so they are refused: nothing could show that two of
/// them measured the same bytes.
pub const RECORDS_VERSION: u32 = 2;

/// Longest time a slice may record (about 32 years): merged sums of such
/// times cannot overflow, whatever a hostile file says.
const MAX_SLICE_SECONDS: u64 = 1_000_000_000;

/// Why records could not be read or merged.
#[derive(Debug, thiserror::Error)]
pub enum RecordsError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a kv-validate records file: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "{} is a {format:?} version {version} file; expected {RECORDS_FORMAT:?} version {RECORDS_VERSION}{}",
        path.display(),
        if *version < RECORDS_VERSION && format == RECORDS_FORMAT {
            " (older records name model and text by path only, not by content: re-run the slice)"
        } else {
            ""
        }
    )]
    Format {
        path: PathBuf,
        format: String,
        version: u32,
    },
    #[error("{}: window {index}: {problem}", path.display())]
    BadWindow {
        path: PathBuf,
        index: usize,
        problem: String,
    },
    #[error("{}: {problem}", path.display())]
    BadRun { path: PathBuf, problem: String },
    #[error(
        "{} and {} are not slices of the same run: their {field} differ ({ours} vs {theirs})",
        first.display(), path.display()
    )]
    DifferentRun {
        first: PathBuf,
        path: PathBuf,
        field: String,
        ours: String,
        theirs: String,
    },
    #[error("window {index} is in both {} and {}", first.display(), path.display())]
    Overlap {
        first: PathBuf,
        path: PathBuf,
        index: usize,
    },
    #[error("the slices do not cover windows {missing} of the run's {planned}")]
    Missing { missing: String, planned: usize },
    #[error("merge needs at least one records file")]
    NoFiles,
}

/// `--windows START..END`: the plan's windows `START <= index < END`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowRange {
    pub start: usize,
    pub end: usize,
}

impl std::str::FromStr for WindowRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?}: expected START..END, e.g. 0..40 (END exclusive)");
        let (start, end) = text.split_once("..").ok_or_else(bad)?;
        let start: usize = start.trim().parse().map_err(|_| bad())?;
        let end: usize = end.trim().parse().map_err(|_| bad())?;
        if start >= end {
            return Err(format!("{text:?}: START must be below END"));
        }
        Ok(WindowRange { start, end })
    }
}

impl WindowRange {
    /// The range checked against a plan of `planned` windows.
    pub fn within(self, planned: usize) -> Result<std::ops::Range<usize>, String> {
        if self.end > planned {
            return Err(format!(
                "--windows {}..{}: the plan has only {planned} windows (0..{planned})",
                self.start, self.end
            ));
        }
        Ok(self.start..self.end)
    }
}

impl RunRecords {
    pub fn new(
        run: RunDescription,
        sweep: bool,
        variants: Vec<Variant>,
        windows_planned: usize,
        windows: Vec<WindowRecord>,
        timings: Timings,
    ) -> Self {
        RunRecords {
            format: RECORDS_FORMAT.to_string(),
            version: RECORDS_VERSION,
            run,
            sweep,
            variants,
            windows_planned,
            windows,
            timings,
        }
    }

    /// Reads and validates a records file.
    pub fn read(path: &Path) -> Result<Self, RecordsError> {
        let text = std::fs::read_to_string(path).map_err(|source| RecordsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let parse_error = |source| RecordsError::Parse {
            path: path.to_path_buf(),
            source,
        };
        // Format and version first: an older layout is named as such, not
        // as a parse error of a field it lacks.
        #[derive(Deserialize)]
        struct Layout {
            format: String,
            version: u32,
        }
        let layout: Layout = serde_json::from_str(&text).map_err(parse_error)?;
        if layout.format != RECORDS_FORMAT || layout.version != RECORDS_VERSION {
            return Err(RecordsError::Format {
                path: path.to_path_buf(),
                format: layout.format,
                version: layout.version,
            });
        }
        let records: RunRecords = serde_json::from_str(&text).map_err(parse_error)?;
        records.validate(path)?;
        Ok(records)
    }

    /// Every window consistent with its bounds and the run's variants.
    fn validate(&self, path: &Path) -> Result<(), RecordsError> {
        if self.format != RECORDS_FORMAT || self.version != RECORDS_VERSION {
            return Err(RecordsError::Format {
                path: path.to_path_buf(),
                format: self.format.clone(),
                version: self.version,
            });
        }
        let bad_run = |problem: &str| RecordsError::BadRun {
            path: path.to_path_buf(),
            problem: problem.to_string(),
        };
        if self.variants.is_empty() || (!self.sweep && self.variants.len() != 1) {
            return Err(bad_run(
                "a validation has exactly one variant, a sweep at least one",
            ));
        }
        let timings = &self.timings;
        if [
            timings.total,
            timings.model,
            timings.cache_write,
            timings.cache_read,
            timings.compressor,
        ]
        .iter()
        .any(|time| time.as_secs() > MAX_SLICE_SECONDS)
        {
            // Sums over the slices of a merge stay far from overflow.
            return Err(bad_run(&format!(
                "timings: a time beyond {MAX_SLICE_SECONDS} seconds is implausible"
            )));
        }
        let mut previous = None;
        for window in &self.windows {
            let problem = window_problem(window, self.variants.len(), self.windows_planned)
                .or_else(|| {
                    (previous >= Some(window.index))
                        .then(|| "windows are not in increasing order of index".to_string())
                });
            if let Some(problem) = problem {
                return Err(RecordsError::BadWindow {
                    path: path.to_path_buf(),
                    index: window.index,
                    problem,
                });
            }
            previous = Some(window.index);
        }
        Ok(())
    }

    /// Writes the records as JSON, atomically.
    pub fn write(&self, path: &Path) -> Result<(), crate::output::OutputError> {
        crate::output::write_json(path, self)
    }
}

/// What is wrong with one window record, if anything.
fn window_problem(window: &WindowRecord, variants: usize, planned: usize) -> Option<String> {
    if window.index >= planned {
        return Some(format!("index beyond the plan's {planned} windows"));
    }
    if !(window.begin <= window.context_end && window.context_end < window.end) {
        return Some(format!(
            "bounds [{}, {}, {}) are not begin <= context_end < end",
            window.begin, window.context_end, window.end
        ));
    }
    let context = window.context_end - window.begin;
    let scored = window.end - window.context_end - usize::from(context == 0);
    let tokens = window.baseline_nll.len();
    if tokens != scored {
        return Some(format!("{tokens} baseline NLLs for {scored} scored tokens"));
    }
    if window.compressed() {
        if context == 0 || scored < 2 {
            return Some("variants recorded for a window without a compressed cache".into());
        }
        if window.variants.len() != variants {
            return Some(format!(
                "{} variants recorded, the run has {variants}",
                window.variants.len()
            ));
        }
    }
    let finite = |values: &[f64]| values.iter().all(|v| v.is_finite());
    if !finite(&window.baseline_nll) {
        return Some("a baseline NLL is not finite".into());
    }
    for (number, variant) in window.variants.iter().enumerate() {
        let lengths = [
            variant.nll.len(),
            variant.kld.len(),
            variant.top1_agrees.len(),
        ];
        if lengths != [tokens; 3] {
            return Some(format!(
                "variant {number}: {lengths:?} NLL/KLD/top-1 values for {tokens} tokens"
            ));
        }
        if !(finite(&variant.nll) && finite(&variant.kld)) {
            return Some(format!("variant {number}: an NLL or KLD is not finite"));
        }
        if let Some(problem) = crate::run_types::implausible_sizes(&variant.metrics) {
            return Some(format!("variant {number}: {problem}"));
        }
    }
    None
}

/// Combines slices of one run into the records of the whole run: the same
/// run description and variants, disjoint windows that together cover the
/// plan. Timings are summed.
pub fn merge(paths: &[PathBuf]) -> Result<RunRecords, RecordsError> {
    let merged = combine(paths)?;
    let missing = missing_ranges(
        merged.windows.iter().map(|w| w.index),
        merged.windows_planned,
    );
    if !missing.is_empty() {
        return Err(RecordsError::Missing {
            missing,
            planned: merged.windows_planned,
        });
    }
    Ok(merged)
}

/// [`merge`] without the plan's coverage: the records of the windows the
/// slices hold, such as a sensitivity sweep run on a few held-out windows.
pub fn combine(paths: &[PathBuf]) -> Result<RunRecords, RecordsError> {
    let (first_path, rest) = paths.split_first().ok_or(RecordsError::NoFiles)?;
    let mut merged = RunRecords::read(first_path)?;
    let mut owner: BTreeMap<usize, &PathBuf> = merged
        .windows
        .iter()
        .map(|w| (w.index, first_path))
        .collect();
    for path in rest {
        let slice = RunRecords::read(path)?;
        // Slices may run on different devices (a job runner's mixed
        // machines); the merged report names each one.
        if !merged
            .run
            .device
            .split(DEVICE_SEPARATOR)
            .any(|d| d == slice.run.device)
        {
            merged.run.device = format!(
                "{}{DEVICE_SEPARATOR}{}",
                merged.run.device, slice.run.device
            );
        }
        if let Some((field, ours, theirs)) = first_difference(&merged, &slice) {
            return Err(RecordsError::DifferentRun {
                first: first_path.clone(),
                path: path.clone(),
                field,
                ours,
                theirs,
            });
        }
        for window in &slice.windows {
            if let Some(first) = owner.insert(window.index, path) {
                return Err(RecordsError::Overlap {
                    first: first.clone(),
                    path: path.clone(),
                    index: window.index,
                });
            }
        }
        merged.windows.extend(slice.windows);
        merged.timings.add(&slice.timings);
    }
    merged.windows.sort_by_key(|w| w.index);
    Ok(merged)
}

/// Between the devices of merged slices that ran on different ones.
const DEVICE_SEPARATOR: &str = " + ";

/// The first field of the run's identity (the description's fields but the
/// device, then sweep, variants and window count) on which two records
/// differ, with both values as JSON.
fn first_difference(ours: &RunRecords, theirs: &RunRecords) -> Option<(String, String, String)> {
    let identity = |records: &RunRecords| {
        let mut fields = match serde_json::to_value(&records.run) {
            Ok(serde_json::Value::Object(fields)) => fields,
            _ => serde_json::Map::new(),
        };
        fields.remove("device");
        fields.insert("sweep".into(), records.sweep.into());
        fields.insert(
            "variants".into(),
            serde_json::to_value(&records.variants).unwrap_or_default(),
        );
        fields.insert("windows_planned".into(), records.windows_planned.into());
        fields
    };
    let (ours, theirs) = (identity(ours), identity(theirs));
    // What was measured (model, config, text, tokens by content) first:
    // when those differ, the descriptions and counts that follow from them
    // differ too, and the root cause is the one to name.
    let content_first =
        |(field, _): &(&String, &serde_json::Value)| !CONTENT_FIELDS.contains(&field.as_str());
    let mut fields: Vec<(&String, &serde_json::Value)> = ours.iter().collect();
    fields.sort_by_key(content_first);
    fields.into_iter().find_map(|(field, value)| {
        let other = theirs.get(field).cloned().unwrap_or_default();
        (*value != other).then(|| (field.clone(), value.to_string(), other.to_string()))
    })
}

/// The fields of [`crate::identity::ContentIds`], in the order they are compared.
const CONTENT_FIELDS: [&str; 4] = [
    "model_content",
    "config_content",
    "text_content",
    "tokens_content",
];

/// The indices below `planned` absent from ascending `present`, as `a..b` ranges.
fn missing_ranges(present: impl Iterator<Item = usize>, planned: usize) -> String {
    let mut gaps = Vec::new();
    let mut next = 0;
    for index in present.chain([planned]) {
        if index > next {
            gaps.push(format!("{next}..{index}"));
        }
        next = index + 1;
    }
    gaps.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_ranges_parse_and_check_the_plan() {
        let range: WindowRange = "3..7".parse().unwrap();
        assert_eq!(range, WindowRange { start: 3, end: 7 });
        assert_eq!(range.within(7), Ok(3..7));
        assert!(range.within(6).unwrap_err().contains("only 6 windows"));
        for bad in ["3", "a..4", "4..4", "5..2", "..3"] {
            assert!(bad.parse::<WindowRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn missing_ranges_name_the_gaps() {
        assert_eq!(missing_ranges([0, 1, 2].into_iter(), 3), "");
        assert_eq!(missing_ranges([1, 2, 5].into_iter(), 8), "0..1, 3..5, 6..8");
        assert_eq!(missing_ranges(std::iter::empty(), 2), "0..2");
    }
}
