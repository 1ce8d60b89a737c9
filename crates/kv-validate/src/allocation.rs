//! Per-layer bit allocation (issue 9's "where the bits go"), measured
//! rather than guessed: a sensitivity sweep (`--sensitivity`) quantizes one
//! layer's keys or values at a time at 2 to 6 bits with every other
//! tensor at 8 bits, so each probe's mean KLD above the all-8-bit reference
//! is that tensor's own damage at that width. Damages of separate tensors
//! add up closely (on SmolLM2, keys alone at 2 bits plus values alone sum to
//! within 10% of both together; docs/fidelity.md), so `kv-validate allocate`
//! picks the bits of every layer and kind that minimize the summed damage
//! within a bits/value budget: a multiple-choice knapsack, solved exactly by
//! dynamic programming over the budget in steps of 1e-4 bits/value. The
//! bits/value each choice saves is read from the probes' own measured sizes,
//! so scales, offsets and kept tokens are counted as kv-compress stores them.

use std::collections::BTreeMap;
use std::fmt;

use kv_compress::flags::kind_letter;
use kvformat::preset::TensorKind;
use serde::Serialize;

use crate::run_types::Variant;
use crate::sweep::{SweepError, SweepRow, SweepTable};

/// Widths a probe quantizes its tensor at unless `--sensitivity-bits` says
/// otherwise: every width below the reference's.
pub const PROBE_BITS: [u8; 5] = [2, 3, 4, 5, 6];
/// The width of every other tensor, and of the reference variant.
pub const REFERENCE_BITS: u8 = 8;
/// The kv-compress flags that set a width or rate: the probes' own, which
/// `--sensitivity-flags` must leave to them.
pub const SENSITIVITY_BITS_FLAGS: [&str; 5] =
    ["bits", "key-bits", "value-bits", "layer-bits", "rate"];
/// The label of the all-8-bit variant.
pub const REFERENCE_LABEL: &str = "reference";
/// The flags probes and the allocation share when `--sensitivity-flags` is
/// not given: the least-squares KIVI layout of docs/fidelity.md (rotation,
/// keys per channel in groups of 128 tokens, values in flat groups of 256,
/// one sink token).
pub const DEFAULT_PROBE_FLAGS: &str = "-method kivi -rotate -fit mse -key-group-size 128 \
     -value-axis flat -value-group-size 256 -sink-tokens 1";
/// Budget steps of the dynamic program, bits/value.
const STEP: f64 = 1e-4;

/// One probe: `kind` of `layer` at `bits`, the rest at [`REFERENCE_BITS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub kind: TensorKind,
    pub layer: usize,
    pub bits: u8,
}

impl Probe {
    /// `k3@2`: layer 3's keys at 2 bits.
    fn label(self) -> String {
        format!("{}{}@{}", kind_letter(self.kind), self.layer, self.bits)
    }

    fn parse(label: &str) -> Option<Probe> {
        let (tensor, bits) = label.split_once('@')?;
        let letter = tensor.chars().next()?;
        let kind = TensorKind::BOTH
            .into_iter()
            .find(|&kind| kind_letter(kind) == letter)?;
        Some(Probe {
            kind,
            layer: tensor[1..].parse().ok()?,
            bits: bits.parse().ok()?,
        })
    }
}

/// The sensitivity sweep of a model with `layers` layers: every probe at
/// each of `widths`, then the reference. `flags` are the kv-compress flags
/// they share; each variant appends ` -bits 8` (and its `-layer-bits` rule),
/// so `flags` must not set bits themselves.
pub fn probe_variants(
    layers: usize,
    widths: &[u8],
    flags: &str,
) -> Result<Vec<Variant>, SweepError> {
    let mut variants = Vec::with_capacity(layers * 2 * widths.len() + 1);
    for layer in 0..layers {
        for kind in TensorKind::BOTH {
            for &bits in widths {
                let probe = Probe { kind, layer, bits };
                variants.push(Variant::parse(&format!(
                    "{}={flags} -bits {REFERENCE_BITS} -layer-bits {}:{layer}={bits}",
                    probe.label(),
                    kind_letter(kind)
                ))?);
            }
        }
    }
    variants.push(Variant::parse(&format!(
        "{REFERENCE_LABEL}={flags} -bits {REFERENCE_BITS}"
    ))?);
    Ok(variants)
}

/// Why no allocation could be made from a sweep.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AllocationError {
    #[error(
        "the sweep has no {REFERENCE_LABEL:?} row: allocate reads the JSON of a \
         `kv-validate --sensitivity` sweep"
    )]
    NoReference,
    #[error("the sweep has no probe rows (labels like k0@2): it is not a --sensitivity sweep")]
    NoProbes,
    #[error("row {label:?} has no mean KLD (no token was scored on a compressed cache)")]
    NoKld { label: String },
    #[error("the sweep lacks probe {label:?}: every tensor needs the same probed widths")]
    MissingProbe { label: String },
    #[error("the reference row's flags {flags:?} do not end in -bits {REFERENCE_BITS}")]
    ReferenceFlags { flags: String },
    #[error("the reference row's flags {flags:?} are not kv-compress flags: {reason}")]
    BadFlags { flags: String, reason: String },
    #[error(
        "budget {budget} bits/value is below the {lowest:.4} that every tensor at its narrowest probed width takes; raise --bits or probe narrower widths (--sensitivity-bits)"
    )]
    Unreachable { budget: f64, lowest: f64 },
    #[error("budget {0} bits/value is not a positive number")]
    BadBudget(f64),
    #[error(
        "flag word {word:?} holds a blank, quote or backslash, which xargs and $(cat FILE) \
         would split or unquote: it cannot go to --flags-file"
    )]
    UnsafeFlagWord { word: String },
}

/// The bits of every layer's keys and values, and what the probes predict.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Allocation {
    pub budget: f64,
    /// `(kind, layer) -> bits` (for an ecsq sweep, the fractional rate).
    #[serde(serialize_with = "serialize_tensor_bits")]
    pub bits: BTreeMap<(TensorKind, usize), f64>,
    /// The reference's bits/value minus the chosen probes' savings.
    pub predicted_bits_per_value: f64,
    /// The reference's mean KLD plus the chosen probes' damages.
    pub predicted_kld: f64,
    /// The same with every tensor at the budget's whole bits, for comparison
    /// (`None` when those bits were not probed).
    pub uniform: Option<UniformFigures>,
    /// kv-compress flags of the allocation.
    pub flags: String,
}

/// `bits` as a JSON list of `{kind, layer, bits}` (JSON keys are strings).
fn serialize_tensor_bits<S: serde::Serializer>(
    bits: &BTreeMap<(TensorKind, usize), f64>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct TensorBits {
        kind: TensorKind,
        layer: usize,
        bits: f64,
    }
    serializer.collect_seq(bits.iter().map(|(&(kind, layer), &bits)| TensorBits {
        kind,
        layer,
        bits,
    }))
}

/// Predicted figures of one width (or ecsq rate) for every tensor.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UniformFigures {
    pub bits: f64,
    pub predicted_bits_per_value: f64,
    pub predicted_kld: f64,
}

/// Per tensor: bits/value saved against the reference and KLD added, per width.
struct Choices {
    tensor: (TensorKind, usize),
    /// `(bits, saving, damage)`, the reference width first (0, 0).
    options: Vec<(u8, f64, f64)>,
}

fn kld(row: &SweepRow) -> Result<f64, AllocationError> {
    row.kld_mean.ok_or_else(|| AllocationError::NoKld {
        label: row.label.clone(),
    })
}

/// Minimizes the predicted mean KLD within `budget` bits/value: over the
/// probed widths for fixed-width grids, over fractional rates for an
/// ecsq sweep (see [`water_fill`]).
pub fn allocate(table: &SweepTable, budget: f64) -> Result<Allocation, AllocationError> {
    if !(budget.is_finite() && budget > 0.0) {
        return Err(AllocationError::BadBudget(budget));
    }
    let reference = table
        .rows
        .iter()
        .find(|row| row.label == REFERENCE_LABEL)
        .ok_or(AllocationError::NoReference)?;
    let reference_kld = kld(reference)?;
    let shared = reference
        .flags
        .strip_suffix(&format!(" -bits {REFERENCE_BITS}"))
        .ok_or_else(|| AllocationError::ReferenceFlags {
            flags: reference.flags.clone(),
        })?;
    let words: Vec<&str> = shared.split_whitespace().collect();
    let (_, shared_options) =
        kv_compress::flags::split_words(&words).map_err(|error| AllocationError::BadFlags {
            flags: shared.to_string(),
            reason: error.to_string(),
        })?;
    let mut probes: BTreeMap<(TensorKind, usize), BTreeMap<u8, &SweepRow>> = BTreeMap::new();
    for row in &table.rows {
        if let Some(probe) = Probe::parse(&row.label) {
            probes
                .entry((probe.kind, probe.layer))
                .or_default()
                .insert(probe.bits, row);
        }
    }
    if probes.is_empty() {
        return Err(AllocationError::NoProbes);
    }
    // Every width probed anywhere, which every tensor must have.
    let widths: Vec<u8> = probes
        .values()
        .flat_map(|rows| rows.keys().copied())
        .collect::<std::collections::BTreeSet<u8>>()
        .into_iter()
        .collect();
    let mut tensors = Vec::with_capacity(probes.len());
    for (&tensor, rows) in &probes {
        let mut options = vec![(REFERENCE_BITS, 0.0, 0.0)];
        for &bits in &widths {
            let label = Probe {
                kind: tensor.0,
                layer: tensor.1,
                bits,
            }
            .label();
            let row = rows
                .get(&bits)
                .ok_or(AllocationError::MissingProbe { label })?;
            // A probe scoring below the reference is noise: no damage.
            let damage = (kld(row)? - reference_kld).max(0.0);
            options.push((bits, reference.bits_per_value - row.bits_per_value, damage));
        }
        tensors.push(Choices { tensor, options });
    }
    // A grid sized by a rate (ecsq) takes fractional ones: water filling sets them.
    let grid = shared_options
        .grid
        .unwrap_or_else(|| shared_options.method.grid());
    if grid.spec().rate {
        return water_fill(&tensors, reference, budget, shared);
    }
    let lowest = reference.bits_per_value
        - tensors
            .iter()
            .map(|t| t.options.iter().map(|o| o.1).fold(0.0, f64::max))
            .sum::<f64>();
    let needed = reference.bits_per_value - budget;
    if needed > reference.bits_per_value - lowest + 1e-12 {
        return Err(AllocationError::Unreachable { budget, lowest });
    }
    let picks = cheapest_damage(&tensors, needed);
    let bits: BTreeMap<(TensorKind, usize), f64> = tensors
        .iter()
        .zip(&picks)
        .map(|(t, &pick)| (t.tensor, f64::from(t.options[pick].0)))
        .collect();
    let chosen = |picks: &[usize]| {
        tensors
            .iter()
            .zip(picks)
            .fold((0.0, 0.0), |(s, d), (t, &pick)| {
                (s + t.options[pick].1, d + t.options[pick].2)
            })
    };
    let (saving, damage) = chosen(&picks);
    let uniform_bits = budget.floor() as u8;
    let uniform = widths.contains(&uniform_bits).then(|| {
        let index = 1 + widths.iter().position(|&b| b == uniform_bits).unwrap();
        let (saving, damage) = chosen(&vec![index; tensors.len()]);
        UniformFigures {
            bits: f64::from(uniform_bits),
            predicted_bits_per_value: reference.bits_per_value - saving,
            predicted_kld: reference_kld + damage,
        }
    });
    Ok(Allocation {
        budget,
        flags: format!("{shared} {}", BitsFlags(&bits)),
        bits,
        predicted_bits_per_value: reference.bits_per_value - saving,
        predicted_kld: reference_kld + damage,
        uniform,
    })
}

/// Per tensor, the option index of least total damage whose savings reach
/// `needed` (exact on the grid of [`STEP`]; savings are rounded down so the
/// budget holds).
fn cheapest_damage(tensors: &[Choices], needed: f64) -> Vec<usize> {
    let target = if needed <= 0.0 {
        0
    } else {
        (needed / STEP - 1e-9).ceil() as usize
    };
    let steps = |saving: f64| (saving.max(0.0) / STEP + 1e-9).floor() as usize;
    // best[s]: least damage with savings of at least min(s, target) steps;
    // came_from[i][s]: the option tensor i took to reach s, and the state before.
    let mut best = vec![f64::INFINITY; target + 1];
    best[0] = 0.0;
    let mut came_from: Vec<Vec<(u8, u32)>> = Vec::with_capacity(tensors.len());
    for tensor in tensors {
        let mut next = vec![f64::INFINITY; target + 1];
        let mut from = vec![(0u8, 0u32); target + 1];
        for (state, &damage) in best.iter().enumerate() {
            if damage.is_infinite() {
                continue;
            }
            for (index, &(_, saving, added)) in tensor.options.iter().enumerate() {
                let reached = (state + steps(saving)).min(target);
                if damage + added < next[reached] {
                    next[reached] = damage + added;
                    from[reached] = (index as u8, state as u32);
                }
            }
        }
        best = next;
        came_from.push(from);
    }
    let mut chosen = vec![0usize; tensors.len()];
    let mut state = target;
    for (i, from) in came_from.iter().enumerate().rev() {
        let (index, previous) = from[state];
        chosen[i] = usize::from(index);
        state = previous as usize;
    }
    chosen
}

/// `-bits B -layer-bits RULE`: B the commonest width (the lower on a tie),
/// RULE every tensor at another width, e.g. `-bits 2 -layer-bits k:8,18=3;v:3=4`.
struct BitsFlags<'a>(&'a BTreeMap<(TensorKind, usize), f64>);

impl fmt::Display for BitsFlags<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut counts: BTreeMap<u8, usize> = BTreeMap::new();
        for &bits in self.0.values() {
            *counts.entry(bits as u8).or_default() += 1;
        }
        let common = counts
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
            .map_or(REFERENCE_BITS, |(&bits, _)| bits);
        write!(f, "-bits {common}")?;
        let mut rules = Vec::new();
        for kind in TensorKind::BOTH {
            for (&bits, _) in counts.iter().filter(|(&bits, _)| bits != common) {
                let layers: Vec<String> = self
                    .0
                    .iter()
                    .filter(|(&(k, _), &b)| k == kind && b as u8 == bits)
                    .map(|(&(_, layer), _)| layer.to_string())
                    .collect();
                if !layers.is_empty() {
                    rules.push(format!("{}:{}={bits}", kind_letter(kind), layers.join(",")));
                }
            }
        }
        if !rules.is_empty() {
            write!(f, " -layer-bits {}", rules.join(";"))?;
        }
        Ok(())
    }
}

/// Lowest and highest code rate the water filling gives a tensor, beyond
/// what its means and kept tokens take: below one bit the ecsq step is
/// wider than the values, above 8 the reference's width.
const RATE_BOUNDS: (f64, f64) = (1.0, REFERENCE_BITS as f64);

/// Fractional ecsq rates: an entropy-coded tensor's squared error falls by
/// 4x per bit of rate (`step^2 / 12`, the step halving per bit), so its
/// damage at rate `R` is modelled as `d * 4^(p - R)` from its probe's damage
/// `d` at rate `p`. Minimizing the summed damage at a mean rate (each
/// tensor holding a share `w` of the values, equal in a Llama-family cache)
/// gives every tensor `R = p + log2(d / w) / 2 - theta` (reverse
/// water filling), clamped to [`RATE_BOUNDS`], with `theta` set by
/// bisection so the rates use the budget. Rates are cut to hundredths,
/// down, so the budget holds. Uses the probes at the width nearest the budget.
fn water_fill(
    tensors: &[Choices],
    reference: &SweepRow,
    budget: f64,
    shared: &str,
) -> Result<Allocation, AllocationError> {
    let reference_kld = kld(reference)?;
    // The probes at the width nearest the budget (options[0] is the reference).
    let probe = (1..tensors[0].options.len())
        .min_by(|&a, &b| {
            let gap = |i: usize| (f64::from(tensors[0].options[i].0) - budget).abs();
            gap(a).total_cmp(&gap(b))
        })
        .expect("probes exist");
    // Every layer's keys and values have one shape in a Llama-family
    // cache, so each tensor holds the same share of the values, and a
    // probe's saving against the reference is its tensor's whole change of
    // rate: its stored rate at the probe is the reference's less saving / w.
    let shares = vec![1.0 / tensors.len() as f64; tensors.len()];
    let probe_rates: Vec<f64> = tensors
        .iter()
        .zip(&shares)
        .map(|(t, &w)| reference.bits_per_value - t.options[probe].1 / w)
        .collect();
    let damages: Vec<f64> = tensors
        .iter()
        .map(|t| t.options[probe].2.max(1e-12))
        .collect();
    // The reference's stored bits beyond its nominal width (means, kept
    // tokens) bound every tensor's rate from below and above.
    let overhead = reference.bits_per_value - f64::from(REFERENCE_BITS);
    let (lowest, highest) = (RATE_BOUNDS.0 + overhead, RATE_BOUNDS.1 + overhead);
    let rates_at = |theta: f64| -> Vec<f64> {
        damages
            .iter()
            .zip(&shares)
            .zip(&probe_rates)
            .map(|((&d, &w), &p)| (p + (d / w).log2() / 2.0 - theta).clamp(lowest, highest))
            .collect()
    };
    let mean = |rates: &[f64]| rates.iter().zip(&shares).map(|(r, w)| r * w).sum::<f64>();
    if budget < lowest {
        return Err(AllocationError::Unreachable { budget, lowest });
    }
    let (mut low, mut high) = (-64.0, 64.0);
    for _ in 0..200 {
        let theta = (low + high) / 2.0;
        if mean(&rates_at(theta)) > budget {
            low = theta;
        } else {
            high = theta;
        }
    }
    let rates: Vec<f64> = rates_at(high)
        .iter()
        .map(|r| (r * 100.0 + 1e-6).floor() / 100.0)
        .collect();
    let damage_at = |rates: &[f64]| {
        reference_kld
            + damages
                .iter()
                .zip(&probe_rates)
                .zip(rates)
                .map(|((&d, &p), &r)| d * 4f64.powf(p - r))
                .sum::<f64>()
    };
    let uniform = UniformFigures {
        bits: budget,
        predicted_bits_per_value: budget,
        predicted_kld: damage_at(&vec![budget; rates.len()]),
    };
    let bits: BTreeMap<(TensorKind, usize), f64> = tensors
        .iter()
        .zip(&rates)
        .map(|(t, &r)| (t.tensor, r))
        .collect();
    Ok(Allocation {
        budget,
        // -rate covers tensors outside the naming rule, which no rule names.
        flags: format!(
            "{shared} -rate {} {}",
            budget.min(highest),
            RateFlags(&bits)
        ),
        predicted_bits_per_value: mean(&rates),
        predicted_kld: damage_at(&rates),
        bits,
        uniform: Some(uniform),
    })
}

/// `-layer-bits` with one rule per rate, e.g. `k:0,5=2.71;v:3=3.40`.
struct RateFlags<'a>(&'a BTreeMap<(TensorKind, usize), f64>);

impl fmt::Display for RateFlags<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rules: BTreeMap<(TensorKind, String), Vec<String>> = BTreeMap::new();
        for (&(kind, layer), &rate) in self.0 {
            rules
                .entry((kind, format!("{rate:.2}")))
                .or_default()
                .push(layer.to_string());
        }
        let rules: Vec<String> = rules
            .iter()
            .map(|((kind, rate), layers)| {
                format!("{}:{}={rate}", kind_letter(*kind), layers.join(","))
            })
            .collect();
        write!(f, "-layer-bits {}", rules.join(";"))
    }
}

impl Allocation {
    pub fn render_text(&self) -> String {
        let mut lines = vec![format!(
            "Allocation for {} bits/value: predicted {:.4} bits/value, mean KLD {:.6}",
            self.budget, self.predicted_bits_per_value, self.predicted_kld
        )];
        if let Some(uniform) = &self.uniform {
            lines.push(format!(
                "(every tensor at {} bits/value: predicted {:.4} bits/value, mean KLD {:.6})",
                uniform.bits, uniform.predicted_bits_per_value, uniform.predicted_kld
            ));
        }
        // Quoted for a POSIX shell: a `-layer-bits` rule holds `;`, which
        // would end the command where the flags are pasted.
        lines.push(format!("kv-compress flags: {}", self.shell_flags()));
        lines.push(format!(
            "Measure it on other windows or text: kv-validate ... --variant {}",
            crate::shell::quote(&format!("allocated={}", self.flags))
        ));
        lines.join("\n") + "\n"
    }

    /// The flags as shell words, each quoted where a POSIX shell would
    /// otherwise read a character of it as syntax.
    pub fn shell_flags(&self) -> String {
        crate::shell::quote_words(&self.flags)
    }

    /// `--flags-file`: one flag word per line, unquoted, for
    /// `xargs kv-compress ... < FILE` or `kv-compress ... $(cat FILE)`: both
    /// split on blanks and newlines only, and xargs removes quotes and
    /// backslashes, so a word holding any of those is refused.
    pub fn flags_file(&self) -> Result<String, AllocationError> {
        let mut text = String::new();
        for word in self.flags.split_whitespace() {
            if word.contains(['\'', '"', '\\']) {
                return Err(AllocationError::UnsafeFlagWord { word: word.into() });
            }
            text.push_str(word);
            text.push('\n');
        }
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run_types::PassCriteria;
    use crate::sweep::Measurement;

    #[test]
    fn printed_flags_are_quoted_and_the_flags_file_is_one_word_a_line() {
        let allocation = Allocation {
            budget: 3.0,
            bits: BTreeMap::new(),
            predicted_bits_per_value: 3.0,
            predicted_kld: 0.0,
            uniform: None,
            flags: "-method kivi -bits 2 -layer-bits k:8,18=3;v:3=4".into(),
        };
        assert_eq!(
            allocation.shell_flags(),
            "-method kivi -bits 2 -layer-bits 'k:8,18=3;v:3=4'"
        );
        assert_eq!(
            allocation.flags_file().unwrap(),
            "-method\nkivi\n-bits\n2\n-layer-bits\nk:8,18=3;v:3=4\n"
        );
        // A quote cannot go through xargs unquoted: the flags file refuses it.
        let quoted = Allocation {
            flags: "-bits 2 it's".into(),
            ..allocation
        };
        assert!(matches!(
            quoted.flags_file(),
            Err(AllocationError::UnsafeFlagWord { word }) if word == "it's"
        ));
    }

    /// A sensitivity sweep's table with `layers` layers: tensor `t` (keys,
    /// values, layer by layer) saves `saving(t, bits)` and adds `damage(t, bits)`.
    fn table(
        layers: usize,
        reference_bpv: f64,
        saving: impl Fn(usize, u8) -> f64,
        damage: impl Fn(usize, u8) -> f64,
    ) -> SweepTable {
        probe_table(
            layers,
            &[2, 3, 4],
            "-method kivi",
            reference_bpv,
            saving,
            damage,
        )
    }

    /// [`table`] with the probed widths and shared flags given.
    fn probe_table(
        layers: usize,
        widths: &[u8],
        flags: &str,
        reference_bpv: f64,
        saving: impl Fn(usize, u8) -> f64,
        damage: impl Fn(usize, u8) -> f64,
    ) -> SweepTable {
        let reference_kld = 0.001;
        let variants = probe_variants(layers, widths, flags).unwrap();
        let measurements = variants
            .iter()
            .map(|variant| {
                let (bpv, kld) = match Probe::parse(&variant.label) {
                    Some(probe) => {
                        let t = 2 * probe.layer + usize::from(probe.kind == TensorKind::Value);
                        (
                            reference_bpv - saving(t, probe.bits),
                            reference_kld + damage(t, probe.bits),
                        )
                    }
                    None => (reference_bpv, reference_kld),
                };
                Measurement {
                    label: variant.label.clone(),
                    flags: variant.settings.label(),
                    bits_per_value: bpv,
                    compression_ratio: 32.0 / bpv,
                    perplexity: 10.0,
                    delta_standard_error: None,
                    fidelity: crate::fidelity::TokenFigures::of(
                        &[kld, kld],
                        &[true, true],
                        &[0.0, 0.0],
                    ),
                }
            })
            .collect();
        SweepTable::new(
            10.0,
            PassCriteria {
                threshold: Some(0.5),
                max_kld: None,
            },
            measurements,
        )
    }

    /// Every assignment of {2, 3, 4, 8} to the tensors: the least damage
    /// within the budget, by enumeration.
    fn brute_force(
        tensors: usize,
        reference_bpv: f64,
        budget: f64,
        saving: &dyn Fn(usize, u8) -> f64,
        damage: &dyn Fn(usize, u8) -> f64,
    ) -> f64 {
        let widths = [8u8, 2, 3, 4];
        let mut best = f64::INFINITY;
        for code in 0..4usize.pow(tensors as u32) {
            let (mut bpv, mut kld) = (reference_bpv, 0.0);
            for t in 0..tensors {
                let bits = widths[code / 4usize.pow(t as u32) % 4];
                if bits != 8 {
                    bpv -= saving(t, bits);
                    kld += damage(t, bits);
                }
            }
            if bpv <= budget + 1e-9 {
                best = best.min(kld);
            }
        }
        best
    }

    #[test]
    fn the_dynamic_program_finds_the_enumerated_optimum() {
        // Three layers, six tensors of unequal sensitivity and size.
        let saving = |t: usize, bits: u8| (8 - bits) as f64 * (1.0 + 0.05 * t as f64) / 6.0;
        let damage = |t: usize, bits: u8| {
            let sensitivity = [5.0, 1.0, 0.2, 3.0, 0.7, 9.0][t];
            sensitivity * 4f64.powi(-(i32::from(bits) - 2)) * 1e-3
        };
        let reference_bpv = 8.3;
        let sweep = table(3, reference_bpv, saving, damage);
        // All at 2 bits: 8.3 - 6.75 = 1.55 bits/value.
        for budget in [1.55, 2.3, 3.0, 3.35, 4.1, 5.5, 8.3] {
            let allocation = allocate(&sweep, budget).unwrap();
            let expected = brute_force(6, reference_bpv, budget, &saving, &damage);
            assert!(
                (allocation.predicted_kld - 0.001 - expected).abs() < 1e-12,
                "budget {budget}: {} against {expected}",
                allocation.predicted_kld - 0.001
            );
            assert!(allocation.predicted_bits_per_value <= budget + 1e-9);
        }
    }

    #[test]
    fn the_flags_name_the_commonest_width_and_the_exceptions() {
        // Layer 1's keys are ten times as sensitive as anything else.
        let saving = |_: usize, bits: u8| (8 - bits) as f64 * 0.25;
        let damage = |t: usize, bits: u8| {
            let sensitivity = if t == 2 { 10.0 } else { 1.0 };
            sensitivity * 4f64.powi(-(i32::from(bits) - 2)) * 1e-3
        };
        // Reference 9.25; all six at 2 bits save 9 (0.25 bits/value left):
        // a budget of 0.5 buys exactly one tensor at 3 bits.
        let sweep = table(3, 9.0 + 0.25, saving, damage);
        let allocation = allocate(&sweep, 0.25 + 0.25).unwrap();
        assert_eq!(allocation.bits[&(TensorKind::Key, 1)], 3.0);
        assert!(
            allocation
                .flags
                .ends_with("-method kivi -bits 2 -layer-bits k:1=3"),
            "{}",
            allocation.flags
        );
        assert_eq!(
            allocate(&sweep, 0.2),
            Err(AllocationError::Unreachable {
                budget: 0.2,
                lowest: 0.25
            })
        );
    }

    #[test]
    fn probes_round_trip_their_labels_and_flags() {
        let variants = probe_variants(2, &[2, 3, 4], "-method kivi").unwrap();
        assert_eq!(variants.len(), 2 * 2 * 3 + 1);
        assert_eq!(variants[0].label, "k0@2");
        assert_eq!(
            variants[0].settings.extra_args.join(" "),
            "-method kivi -bits 8 -layer-bits k:0=2"
        );
        assert_eq!(
            Probe::parse("v1@4"),
            Some(Probe {
                kind: TensorKind::Value,
                layer: 1,
                bits: 4
            })
        );
        assert_eq!(Probe::parse(REFERENCE_LABEL), None);
        assert_eq!(variants.last().unwrap().label, REFERENCE_LABEL);
        let mut partial = table(2, 8.3, |_, bits| (8 - bits) as f64 * 0.1, |_, _| 1e-3);
        partial.rows.retain(|row| row.label != "k0@3");
        assert_eq!(
            allocate(&partial, 5.0),
            Err(AllocationError::MissingProbe {
                label: "k0@3".into()
            })
        );
        let empty = SweepTable::new(
            1.0,
            PassCriteria {
                threshold: Some(0.5),
                max_kld: None,
            },
            vec![],
        );
        assert_eq!(allocate(&empty, 3.0), Err(AllocationError::NoReference));
    }

    #[test]
    fn ecsq_rates_fill_the_budget_by_reverse_water_filling() {
        // Six tensors of equal size probed at 3 bits; tensors 1 and 2 are 4x
        // and 16x as sensitive. Reference: 8 bits plus 0.1 of means and sinks.
        let sensitivity = [1.0, 4.0, 16.0, 1.0, 1.0, 1.0];
        let sweep = probe_table(
            3,
            &[3],
            "-grid ecsq -sink-tokens 1",
            8.1,
            |_, bits| (8 - bits) as f64 / 6.0,
            |t, _| sensitivity[t] * 1e-3,
        );
        let allocation = allocate(&sweep, 3.1).unwrap();
        let rate = |t: usize| {
            allocation.bits[&(
                if t % 2 == 0 {
                    TensorKind::Key
                } else {
                    TensorKind::Value
                },
                t / 2,
            )]
        };
        // 4x the damage buys log2(4) / 2 = 1 bit more, 16x two; the
        // marginal damages 4^-R * d are then equal (the optimum).
        assert!(
            (rate(1) - rate(0) - 1.0).abs() <= 0.011,
            "{:?}",
            allocation.bits
        );
        assert!(
            (rate(2) - rate(0) - 2.0).abs() <= 0.011,
            "{:?}",
            allocation.bits
        );
        let mean = (0..6).map(rate).sum::<f64>() / 6.0;
        assert!((3.09 - 1e-9..=3.1 + 1e-9).contains(&mean), "{mean}");
        assert!((allocation.predicted_bits_per_value - mean).abs() < 1e-12);
        // Uniform 3.1 everywhere: damage 24e-3 at the probe's 3.1; filled:
        // 6 equal marginal damages summing less.
        let uniform = allocation.uniform.as_ref().unwrap();
        assert!((uniform.predicted_kld - 0.001 - 24e-3).abs() < 1e-9);
        assert!(allocation.predicted_kld < uniform.predicted_kld * 0.8);
        assert!(
            allocation
                .flags
                .ends_with("-grid ecsq -sink-tokens 1 -rate 3.1 -layer-bits k:0,2=2.60;k:1=4.60;v:1,2=2.60;v:0=3.60"),
            "{}",
            allocation.flags
        );
        assert!(
            allocation.flags.contains(&format!("v:0={:.2}", rate(1))),
            "{}",
            allocation.flags
        );
        // A budget at the lower bound (one bit of codes beside the
        // reference's 0.1 of means and sinks) clamps every tensor to it.
        let low = allocate(&sweep, 1.1).unwrap();
        assert!(low.bits.values().all(|&r| r == 1.1), "{:?}", low.bits);
        assert!(matches!(
            allocate(&sweep, 1.0),
            Err(AllocationError::Unreachable { .. })
        ));
    }
}
