//! The codec settings of a run, resolved from the flags once
//! (`flags::Options::codec_settings`): the parameters of key and of value
//! tensors, and the `-layer-bits` rules over them. Every combination they can give a tensor is checked here against
//! the codec's one rule set ([`CodecParams::check_settings`]), so a
//! conflict is a flag error (exit 2) before any tensor is read; per tensor
//! only the rule that applies is picked and the shape is checked.

use std::ops::RangeInclusive;

use kvformat::codec::{CodecError, CodecParams};
use kvformat::preset::{layer_index, TensorKind};

/// One rule of `-layer-bits`: tensors of `kinds` in `layers` take `bits`
/// (and `group_size` if given), or with a fractional BITS the `ecsq` rate.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerRule {
    pub keys: bool,
    pub values: bool,
    /// `None`: every tensor of the kinds, whatever its name.
    pub layers: Option<Vec<RangeInclusive<usize>>>,
    /// The rule's width; for a fractional BITS the supported width nearest it.
    pub bits: u8,
    /// A fractional BITS (`-grid ecsq` only): the tensors' `-rate`.
    pub rate: Option<f64>,
    pub group_size: Option<usize>,
}

impl LayerRule {
    /// Whether the rule covers some tensor of `kind`.
    pub fn applies_to(&self, kind: TensorKind) -> bool {
        match kind {
            TensorKind::Key => self.keys,
            TensorKind::Value => self.values,
        }
    }

    /// Whether the rule covers a tensor of `kind` in `layer` (`None`: a name
    /// outside the `layer_{i}_key` rule, covered only by `*`).
    pub fn matches(&self, kind: TensorKind, layer: Option<usize>) -> bool {
        self.applies_to(kind)
            && match (&self.layers, layer) {
                (None, _) => true,
                (Some(ranges), Some(layer)) => ranges.iter().any(|range| range.contains(&layer)),
                (Some(_), None) => false,
            }
    }
}

/// Some tensors' settings break one of the codec's rules
/// ([`CodecParams::check_settings`]); a flag error.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid codec settings for {tensors}: {source}")]
pub struct SettingsError {
    /// `key tensors`, `value tensors under -layer-bits rule 2`.
    pub tensors: String,
    pub source: CodecError,
}

/// What every tensor of a run is encoded with.
#[derive(Clone, Debug, PartialEq)]
pub struct CodecSettings {
    /// The parameters of a key tensor and of any other (a value).
    key: CodecParams,
    value: CodecParams,
    /// `-layer-bits`, in order: the first rule that matches a tensor wins.
    rules: Vec<LayerRule>,
}

impl CodecSettings {
    /// The settings of key and value tensors and the `-layer-bits` rules
    /// over them, checked: every kind's parameters, alone and under each
    /// rule that can apply to it.
    pub fn new(
        key: CodecParams,
        value: CodecParams,
        rules: Vec<LayerRule>,
    ) -> Result<Self, SettingsError> {
        let settings = CodecSettings { key, value, rules };
        for kind in TensorKind::BOTH {
            let base = settings.base(kind);
            let invalid = |tensors: String| move |source| SettingsError { tensors, source };
            base.check_settings()
                .map_err(invalid(format!("{} tensors", kind.suffix())))?;
            for (number, rule) in settings.rules.iter().enumerate() {
                if rule.applies_to(kind) {
                    apply_rule(base.clone(), rule)
                        .check_settings()
                        .map_err(invalid(format!(
                            "{} tensors under -layer-bits rule {}",
                            kind.suffix(),
                            number + 1
                        )))?;
                }
            }
        }
        Ok(settings)
    }

    /// The parameters of the tensor named `tensor_name`: its kind's, under
    /// the first `-layer-bits` rule that matches its kind and layer.
    pub fn params_for(&self, tensor_name: &str) -> CodecParams {
        let kind = TensorKind::of(tensor_name);
        let layer = layer_index(tensor_name);
        let base = self.base(kind).clone();
        match self.rules.iter().find(|rule| rule.matches(kind, layer)) {
            Some(rule) => apply_rule(base, rule),
            None => base,
        }
    }

    fn base(&self, kind: TensorKind) -> &CodecParams {
        match kind {
            TensorKind::Key => &self.key,
            TensorKind::Value => &self.value,
        }
    }
}

/// `params` under `rule`: its bits (and group size), and its `ecsq` rate
/// where BITS is fractional; under `-rate` every rule's BITS is a rate.
fn apply_rule(params: CodecParams, rule: &LayerRule) -> CodecParams {
    CodecParams {
        bits: rule.bits,
        rate: rule.rate.or(params.rate.map(|_| f64::from(rule.bits))),
        group_size: rule.group_size.unwrap_or(params.group_size),
        ..params
    }
}
