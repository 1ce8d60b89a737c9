//! How a run ends: from its records to the report, printed on the console
//! and written where the flags ask (JSON, a sweep's CSV and plots). A
//! single run, `merge` and the workers of `--devices` all end here, so they
//! print the same report figure for figure.

use std::path::Path;

use anyhow::Context;
use kvformat::CacheDtype;

use crate::cli::Outputs;
use crate::evaluate::Evaluation;
use crate::output;
use crate::plot;
use crate::report::ValidationReport;
use crate::run_types::{CompressSettings, RunRecords};
use crate::sweep::SweepReport;

/// Where a run's text goes: the report (stdout) and status lines (stderr).
pub struct Console<'a> {
    pub report: &'a dyn Fn(&str),
    pub status: &'a dyn Fn(&str),
}

/// The figures of every variant over the windows `records` hold.
pub(crate) fn evaluation_of(records: &RunRecords) -> Evaluation {
    let settings: Vec<CompressSettings> = records
        .variants
        .iter()
        .map(|v| v.settings.clone())
        .collect();
    Evaluation::from_records(&settings, records.windows.clone(), records.timings.clone())
}

/// The cache dtype a run's description names.
pub(crate) fn cache_dtype_of(records: &RunRecords) -> anyhow::Result<CacheDtype> {
    CacheDtype::from_torch_name(&records.run.cache_dtype)
        .with_context(|| format!("unknown cache dtype {:?}", records.run.cache_dtype))
}

/// Prints and writes the report of `evaluation` (computed from `records`),
/// a sweep's or a validation's; `Ok(passed)`. A run and `merge` both end here.
pub(crate) fn report(
    outputs: &Outputs,
    records: &RunRecords,
    evaluation: &Evaluation,
    console: &Console<'_>,
) -> anyhow::Result<bool> {
    if records.sweep {
        let cache_dtype = cache_dtype_of(records)?;
        return finish_sweep(
            outputs,
            &SweepReport::new(&records.run, evaluation, &records.variants, cache_dtype),
            console,
        );
    }
    let report = ValidationReport::new(&records.run, evaluation, &evaluation.variants[0]);
    (console.report)(&report.render_text());
    write_json(outputs.json.as_deref(), &report)?;
    Ok(report.passed)
}

/// Prints the sweep table, writes its CSV, plots and JSON; `Ok(some variant passed)`.
fn finish_sweep(
    outputs: &Outputs,
    report: &SweepReport,
    console: &Console<'_>,
) -> anyhow::Result<bool> {
    (console.report)(&report.render_text());
    if let Some(path) = &outputs.sweep_csv {
        output::write_atomically(path, report.table.to_csv())?;
    }
    if let Some(path) = &outputs.sweep_plot {
        output::write_atomically(path, plot::render_svg(&report.table))?;
    }
    if let Some(path) = &outputs.sweep_kld_plot {
        output::write_atomically(path, plot::render_kld_svg(&report.table))?;
    }
    write_json(outputs.json.as_deref(), report)?;
    Ok(report.table.recommendation.is_some())
}

/// Writes `report` as JSON where `--json` (or a plan's JSON path) asks.
pub(crate) fn write_json(
    path: Option<&Path>,
    report: &impl serde::Serialize,
) -> anyhow::Result<()> {
    if let Some(path) = path {
        output::write_json(path, report).context("cannot write the JSON report")?;
    }
    Ok(())
}
