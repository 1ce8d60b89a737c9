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

use serde::Serialize;

use crate::sweep::{SweepError, SweepRow, SweepTable, Variant};

/// Widths a probe quantizes its tensor at unless `--sensitivity-bits` says
/// otherwise: every width below the reference's.
pub const PROBE_BITS: [u8; 5] = [2, 3, 4, 5, 6];
/// The width of every other tensor, and of the reference variant.
pub const REFERENCE_BITS: u8 = 8;
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

/// Keys or values: the `-layer-bits` kind prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Key,
    Value,
}

impl Kind {
    fn prefix(self) -> char {
        match self {
            Kind::Key => 'k',
            Kind::Value => 'v',
        }
    }
}

/// One probe: `kind` of `layer` at `bits`, the rest at [`REFERENCE_BITS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub kind: Kind,
    pub layer: usize,
    pub bits: u8,
}

impl Probe {
    /// `k3@2`: layer 3's keys at 2 bits.
    fn label(self) -> String {
        format!("{}{}@{}", self.kind.prefix(), self.layer, self.bits)
    }

    fn parse(label: &str) -> Option<Probe> {
        let (tensor, bits) = label.split_once('@')?;
        let kind = match tensor.chars().next()? {
            'k' => Kind::Key,
            'v' => Kind::Value,
            _ => return None,
        };
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
        for kind in [Kind::Key, Kind::Value] {
            for &bits in widths {
                let probe = Probe { kind, layer, bits };
                variants.push(Variant::parse(&format!(
                    "{}={flags} -bits {REFERENCE_BITS} -layer-bits {}:{layer}={bits}",
                    probe.label(),
                    kind.prefix()
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
    #[error(
        "budget {budget} bits/value is below the {lowest:.4} that every tensor at its narrowest probed width takes; raise --bits or probe narrower widths (--sensitivity-bits)"
    )]
    Unreachable { budget: f64, lowest: f64 },
    #[error("budget {0} bits/value is not a positive number")]
    BadBudget(f64),
}

/// The bits of every layer's keys and values, and what the probes predict.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Allocation {
    pub budget: f64,
    /// `(kind, layer) -> bits`.
    #[serde(serialize_with = "serialize_tensor_bits")]
    pub bits: BTreeMap<(Kind, usize), u8>,
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
    bits: &BTreeMap<(Kind, usize), u8>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct TensorBits {
        kind: Kind,
        layer: usize,
        bits: u8,
    }
    serializer.collect_seq(bits.iter().map(|(&(kind, layer), &bits)| TensorBits {
        kind,
        layer,
        bits,
    }))
}

/// Predicted figures of one width for every tensor.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UniformFigures {
    pub bits: u8,
    pub predicted_bits_per_value: f64,
    pub predicted_kld: f64,
}

/// Per tensor: bits/value saved against the reference and KLD added, per width.
struct Choices {
    tensor: (Kind, usize),
    /// `(bits, saving, damage)`, the reference width first (0, 0).
    options: Vec<(u8, f64, f64)>,
}

/// Minimizes the predicted mean KLD within `budget` bits/value.
pub fn allocate(table: &SweepTable, budget: f64) -> Result<Allocation, AllocationError> {
    if !(budget.is_finite() && budget > 0.0) {
        return Err(AllocationError::BadBudget(budget));
    }
    let kld = |row: &SweepRow| {
        row.kld_mean.ok_or_else(|| AllocationError::NoKld {
            label: row.label.clone(),
        })
    };
    let reference = table
        .rows
        .iter()
        .find(|row| row.label == REFERENCE_LABEL)
        .ok_or(AllocationError::NoReference)?;
    let reference_kld = kld(reference)?;
    let mut probes: BTreeMap<(Kind, usize), BTreeMap<u8, &SweepRow>> = BTreeMap::new();
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
    let bits: BTreeMap<(Kind, usize), u8> = tensors
        .iter()
        .zip(&picks)
        .map(|(t, &pick)| (t.tensor, t.options[pick].0))
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
            bits: uniform_bits,
            predicted_bits_per_value: reference.bits_per_value - saving,
            predicted_kld: reference_kld + damage,
        }
    });
    let shared = reference
        .flags
        .strip_suffix(&format!(" -bits {REFERENCE_BITS}"))
        .ok_or_else(|| AllocationError::ReferenceFlags {
            flags: reference.flags.clone(),
        })?;
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
struct BitsFlags<'a>(&'a BTreeMap<(Kind, usize), u8>);

impl fmt::Display for BitsFlags<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut counts: BTreeMap<u8, usize> = BTreeMap::new();
        for &bits in self.0.values() {
            *counts.entry(bits).or_default() += 1;
        }
        let common = counts
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
            .map_or(REFERENCE_BITS, |(&bits, _)| bits);
        write!(f, "-bits {common}")?;
        let mut rules = Vec::new();
        for kind in [Kind::Key, Kind::Value] {
            for (&bits, _) in counts.iter().filter(|(&bits, _)| bits != common) {
                let layers: Vec<String> = self
                    .0
                    .iter()
                    .filter(|(&(k, _), &b)| k == kind && b == bits)
                    .map(|(&(_, layer), _)| layer.to_string())
                    .collect();
                if !layers.is_empty() {
                    rules.push(format!("{}:{}={bits}", kind.prefix(), layers.join(",")));
                }
            }
        }
        if !rules.is_empty() {
            write!(f, " -layer-bits {}", rules.join(";"))?;
        }
        Ok(())
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
                "(every tensor at {} bits: predicted {:.4} bits/value, mean KLD {:.6})",
                uniform.bits, uniform.predicted_bits_per_value, uniform.predicted_kld
            ));
        }
        lines.push(format!("kv-compress flags: {}", self.flags));
        lines.push(format!(
            "Measure it on other windows or text: kv-validate ... --variant \"allocated={}\"",
            self.flags
        ));
        lines.join("\n") + "\n"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::PassCriteria;
    use crate::sweep::Measurement;

    /// A sensitivity sweep's table with `layers` layers: tensor `t` (keys,
    /// values, layer by layer) saves `saving(t, bits)` and adds `damage(t, bits)`.
    fn table(
        layers: usize,
        reference_bpv: f64,
        saving: impl Fn(usize, u8) -> f64,
        damage: impl Fn(usize, u8) -> f64,
    ) -> SweepTable {
        let reference_kld = 0.001;
        let variants = probe_variants(layers, &[2, 3, 4], "-method kivi").unwrap();
        let measurements = variants
            .iter()
            .map(|variant| {
                let (bpv, kld) = match Probe::parse(&variant.label) {
                    Some(probe) => {
                        let t = 2 * probe.layer + usize::from(probe.kind == Kind::Value);
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
        assert_eq!(allocation.bits[&(Kind::Key, 1)], 3);
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
                kind: Kind::Value,
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
}
