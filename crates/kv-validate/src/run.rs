//! Carries out a [`Plan`]: loads what it names, runs the evaluation (or the
//! merge, the allocation, the capacity report, the quick test, the
//! benchmark), writes the files it asks for and hands the report's text to
//! the caller. A test drives a whole run here without spawning a process.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use kvformat::CacheDtype;

use crate::allocation::{allocate, probe_variants};
use crate::bench;
use crate::capacity::{
    ensure_sweep_of_model, read_sweep, read_sweep_table, CapacityReport, Method,
};
pub use crate::conclude::Console;
use crate::conclude::{cache_dtype_of, evaluation_of, report, write_json};
use crate::data::load_text;
use crate::evaluate::{ensure_measurable, evaluate, EvalOptions, Evaluation};
use crate::identity::ContentIds;
use crate::long_context::LongContextReport;
use crate::long_plot;
use crate::model::device::{cache_dtype_storing, dtype_name, open_device};
use crate::model::load::{load_model, read_model_config, LoadedModel, ModelSource};
use crate::output;
use crate::passkey::PasskeyRun;
use crate::perplexity::{plan_windows, Protocol};
use crate::plan::{
    AllocationSource, CapacityPlan, EvaluationPlan, ModelPlan, ModelWork, Plan, VariantsPlan,
};
use crate::quick_test::run_quick_test;
use crate::records::{combine, merge};
use crate::run_types::{CompressSettings, RunDescription, RunRecords, Variant};
use crate::sweep::{SweepReport, SweepTable};

/// Carries out `plan`; `Ok(passed)` (a validation's verdict, a sweep's
/// recommendation, `true` for what has none).
pub fn run(plan: Plan, console: &Console<'_>) -> anyhow::Result<bool> {
    match plan {
        Plan::Merge { files, outputs } => {
            let records = merge(&files)?;
            if !records.sweep && outputs.sweep_outputs() {
                bail!("--sweep-csv, --sweep-plot and --sweep-kld-plot need the records of a sweep");
            }
            report(&outputs, &records, &evaluation_of(&records), console)
        }
        Plan::Allocate {
            source,
            budget,
            json,
            flags_file,
        } => {
            let (table, source) = match source {
                AllocationSource::SweepJson(path) => {
                    (read_sweep_table(&path)?, path.display().to_string())
                }
                AllocationSource::Records(files) => (
                    sweep_table_of(&files)?,
                    format!("{} records files", files.len()),
                ),
            };
            let allocation = allocate(&table, budget)
                .with_context(|| format!("cannot allocate from {source}"))?;
            (console.report)(&allocation.render_text());
            if let Some(path) = json {
                output::write_json(&path, &allocation)?;
            }
            if let Some(path) = flags_file {
                output::write_atomically(&path, allocation.flags_file()?)?;
            }
            Ok(true)
        }
        Plan::Capacity(plan) => {
            run_capacity(&plan, console)?;
            Ok(true)
        }
        Plan::QuickTest {
            compressor,
            settings,
            cache_dtype,
            json,
        } => {
            (console.status)(&format!(
                "quick test with {}",
                compressor.program().display()
            ));
            let report = run_quick_test(&compressor, &settings, cache_dtype)?;
            (console.report)(&report.render_text());
            write_json(json.as_deref(), &report)?;
            Ok(report.passed)
        }
        Plan::Model(plan) => run_model(plan, console),
        Plan::Workers(plan) => crate::workers::run_workers(&plan, console),
    }
}

/// Opens the device, loads the model, then benchmarks or evaluates.
fn run_model(plan: ModelPlan, console: &Console<'_>) -> anyhow::Result<bool> {
    let opened = open_device(plan.device)?;
    if let Some(reason) = &opened.fallback_reason {
        (console.status)(reason);
    }
    let dtype = plan.dtype.unwrap_or_else(|| opened.default_dtype());
    let cache_dtype = plan
        .cache_dtype
        .unwrap_or_else(|| cache_dtype_storing(dtype));
    (console.status)(&format!(
        "loading the model on {} in {}",
        opened.name,
        dtype_name(dtype)
    ));
    let loaded = load_model(&plan.model, &opened.device, dtype, plan.show_progress)?;
    let run = ModelRun {
        model: &plan.model,
        loaded: &loaded,
        device: opened.name.clone(),
        cache_dtype,
        show_progress: plan.show_progress,
    };
    match plan.work {
        ModelWork::Bench { lengths, json } => {
            run_forward_benchmark(&lengths, json.as_deref(), &loaded, &opened.name, console)
        }
        ModelWork::LongContext {
            lengths,
            targets,
            evaluation,
            plot,
        } => run.context_lengths(&lengths, targets, *evaluation, plot.as_deref(), console),
        ModelWork::Passkey(passkey_plan) => {
            let report = PasskeyRun {
                loaded: &loaded,
                device: run.device.clone(),
                cache_dtype,
                status: console.status,
            }
            .run(&passkey_plan)?;
            (console.report)(&report.render_text());
            write_json(passkey_plan.json.as_deref(), &report)?;
            if let Some(path) = &passkey_plan.plot {
                output::write_atomically(path, long_plot::render_passkey_svg(&report))?;
            }
            Ok(true)
        }
        ModelWork::Evaluate(evaluation_plan) => {
            match run.evaluate(&evaluation_plan, console)? {
                Some((records, evaluation)) => {
                    report(&evaluation_plan.outputs, &records, &evaluation, console)
                }
                // A --windows slice: its records are its only output.
                None => Ok(true),
            }
        }
    }
}

/// A loaded model and what the evaluation needs to know of where it runs.
struct ModelRun<'a> {
    /// Where the model came from (its files are identified by content).
    model: &'a ModelSource,
    loaded: &'a LoadedModel,
    device: String,
    cache_dtype: CacheDtype,
    show_progress: bool,
}

impl ModelRun<'_> {
    /// Tokenizes the text, plans the windows, scores every variant on them
    /// and writes the records (`--records`); the records and their figures,
    /// or `None` for a `--windows` slice.
    fn evaluate(
        &self,
        plan: &EvaluationPlan,
        console: &Console<'_>,
    ) -> anyhow::Result<Option<(RunRecords, Evaluation)>> {
        let loaded = self.loaded;
        let config = loaded.model.config();
        let (sweep, variants) = match &plan.variants {
            VariantsPlan::Single(settings) => (
                false,
                vec![Variant {
                    label: settings.label(),
                    settings: settings.clone(),
                }],
            ),
            VariantsPlan::Sweep(variants) => (true, variants.clone()),
            VariantsPlan::Sensitivity { widths, flags } => (
                true,
                probe_variants(config.num_hidden_layers, widths, flags)?,
            ),
        };
        (console.status)("loading the text");
        let text = load_text(&plan.text, self.show_progress)?;
        let tokens = loaded
            .tokenizer
            .encode(text.text.as_str(), true)
            .map_err(|error| anyhow::anyhow!("cannot tokenize {}: {error}", text.description))?
            .get_ids()
            .to_vec();
        let content = ContentIds::of_run(self.model, &text.text, &tokens)?;

        let max_positions = config.max_position_embeddings;
        let protocol = match plan.context_targets {
            Some((context, targets)) => Protocol::ContextTargets { context, targets },
            None => Protocol::sliding_for_model(max_positions),
        };
        if protocol.window_len() > max_positions {
            bail!(
                "a window of {} tokens exceeds the model's context of {max_positions} tokens",
                protocol.window_len()
            );
        }
        let windows = plan_windows(tokens.len(), protocol, plan.max_windows)?;
        if plan.slice.is_partial() {
            // The whole run must measure something; this slice need not.
            ensure_measurable(&windows)?;
        }
        let slice = plan
            .slice
            .resolve(windows.len())
            .map_err(anyhow::Error::msg)?;
        let protocol_text = protocol.describe()
            + &format!("; {} windows over {} tokens", windows.len(), tokens.len());
        (console.status)(&format!("{}; {protocol_text}", loaded.description));

        let options = EvalOptions {
            cache_dtype: self.cache_dtype,
            model_name: loaded.description.clone(),
            show_progress: self.show_progress,
            scratch_parent: plan.scratch_parent.clone(),
            slice_start: plan.slice.is_partial().then_some(slice.start),
            pipeline_depth: plan.pipeline_depth,
        };
        let settings: Vec<CompressSettings> = variants.iter().map(|v| v.settings.clone()).collect();
        let evaluation = evaluate(
            &loaded.model,
            &tokens,
            &windows[slice.clone()],
            &plan.compressor,
            &settings,
            &options,
        )?;
        let run = RunDescription {
            model: loaded.description.clone(),
            data: text.description,
            protocol: protocol_text,
            compressor: plan.compressor.program().display().to_string(),
            device: self.device.clone(),
            cache_dtype: self.cache_dtype.torch_name().to_string(),
            criteria: plan.criteria,
            content,
        };
        let records = RunRecords::new(
            run,
            sweep,
            variants,
            windows.len(),
            evaluation.records.clone(),
            evaluation.timings.clone(),
        );
        if let Some(path) = &plan.records {
            records.write(path).context("cannot write the records")?;
        }
        if plan.slice.is_partial() {
            (console.status)(&format!(
                "windows {}..{} of {} evaluated, records in {}; `kv-validate merge` combines the slices",
                slice.start,
                slice.end,
                windows.len(),
                plan.records.as_deref().unwrap_or(Path::new("-")).display()
            ));
            return Ok(None);
        }
        Ok(Some((records, evaluation)))
    }
}

impl ModelRun<'_> {
    /// `--context-lengths`: the evaluation at each length (windows of
    /// length + `targets` tokens), one report; `Ok(some method passes at every length)`.
    fn context_lengths(
        &self,
        lengths: &[usize],
        targets: usize,
        mut plan: EvaluationPlan,
        plot: Option<&Path>,
        console: &Console<'_>,
    ) -> anyhow::Result<bool> {
        let max = self.loaded.model.config().max_position_embeddings;
        if let Some(&too_long) = lengths.iter().find(|&&length| length + targets > max) {
            bail!(
                "--context-lengths {too_long}: a window of {too_long} context + {targets} \
                 targets exceeds the model's maximum context of {max} tokens"
            );
        }
        let mut per_length = Vec::with_capacity(lengths.len());
        for &length in lengths {
            (console.status)(&format!("context length {length}"));
            plan.context_targets = Some((length, targets));
            let (records, evaluation) = self
                .evaluate(&plan, console)?
                .expect("a context-length sweep has no --windows slice");
            let cache_dtype = cache_dtype_of(&records)?;
            per_length.push((
                length,
                SweepReport::new(&records.run, &evaluation, &records.variants, cache_dtype),
            ));
        }
        let report = LongContextReport::new(targets, per_length);
        (console.report)(&report.render_text());
        write_json(plan.outputs.json.as_deref(), &report)?;
        if let Some(path) = plot {
            output::write_atomically(path, long_plot::render_context_svg(&report))?;
        }
        Ok(report.passed())
    }
}

/// The sweep table of the windows that slices' records hold (`allocate --records`).
fn sweep_table_of(files: &[PathBuf]) -> anyhow::Result<SweepTable> {
    let records = combine(files)?;
    if !records.sweep {
        bail!("allocate --records needs the records of a --sensitivity sweep");
    }
    let cache_dtype = cache_dtype_of(&records)?;
    let evaluation = evaluation_of(&records);
    Ok(SweepReport::new(&records.run, &evaluation, &records.variants, cache_dtype).table)
}

/// The forward-pass benchmark: a table on stdout, JSON with `--json`.
fn run_forward_benchmark(
    lengths: &[usize],
    json: Option<&Path>,
    loaded: &LoadedModel,
    device: &str,
    console: &Console<'_>,
) -> anyhow::Result<bool> {
    /// Median of this many timed prefills per length.
    const RUNS: usize = 3;
    let max_positions = loaded.model.config().max_position_embeddings;
    if let Some(&too_long) = lengths.iter().find(|&&n| n == 0 || n > max_positions) {
        bail!(
            "--bench-forward {too_long}: lengths must be 1..={max_positions} (the model's context)"
        );
    }
    let speeds = bench::bench_forward(&loaded.model, lengths, RUNS)?;
    let model = format!("{} on {device}", loaded.description);
    (console.report)(&bench::render_table(&model, &speeds));
    write_json(
        json,
        &serde_json::json!({ "model": loaded.description, "device": device, "forward": speeds }),
    )?;
    Ok(true)
}

/// `kv-validate capacity`: prints the report, writes its JSON and plot.
fn run_capacity(plan: &CapacityPlan, console: &Console<'_>) -> anyhow::Result<()> {
    let (config, config_file) = read_model_config(&plan.model)?;
    let methods = match &plan.sweep_json {
        Some(path) => {
            let sweep = read_sweep(path)?;
            ensure_sweep_of_model(path, sweep.config_content.as_ref(), &config_file)?;
            Method::from_sweep(&sweep.table)
        }
        None => Method::defaults(),
    };
    let name = match &plan.model {
        ModelSource::Hub { repo, revision } => format!("{repo}@{revision}"),
        ModelSource::LocalDir(path) | ModelSource::Gguf(path) => path.display().to_string(),
    };
    let report = CapacityReport::new(
        name,
        &config_file,
        &config,
        plan.weights_dtype,
        &plan.gpus,
        methods,
        plan.sweep_json.as_deref(),
    )?;
    (console.report)(&report.render_text());
    if let Some(path) = &plan.json {
        output::write_json(path, &report)?;
    }
    if let Some(path) = &plan.plot {
        output::write_atomically(path, report.render_svg())?;
    }
    Ok(())
}
