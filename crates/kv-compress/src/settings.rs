//! The codec settings of a run, resolved from the flags once: the
//! parameters of key and of value tensors, and the `-layer-bits` rules over
//! them. Every combination they can give a tensor is checked here against
//! the codec's one rule set ([`CodecParams::check_settings`]), so a
//! conflict is a flag error (exit 2) before any tensor is read; per tensor
//! only the rule that applies is picked and the shape is checked.

use kvformat::codec::{CodecError, CodecParams};
use kvformat::preset::{layer_index, TensorKind};

use crate::flags::{FlagError, LayerRule, Options};

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
    /// The settings the flags describe, checked: every tensor kind's
    /// parameters, alone and under each `-layer-bits` rule that can apply to it.
    pub fn resolve(options: &Options) -> Result<Self, FlagError> {
        let settings = CodecSettings {
            key: base_params(options, TensorKind::Key),
            value: base_params(options, TensorKind::Value),
            rules: options.layer_bits.clone(),
        };
        for kind in TensorKind::BOTH {
            let base = settings.base(kind);
            let invalid =
                |tensors: String| move |source: CodecError| FlagError::Settings { tensors, source };
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

/// The parameters of a `kind` tensor outside every `-layer-bits` rule:
/// `*_key` tensors (kvformat's naming rule) take the key axis, bits, group
/// size and outliers, every other tensor the value ones; unset flags take
/// the method's choice (grid, axes) or the shared flag.
fn base_params(options: &Options, kind: TensorKind) -> CodecParams {
    let (axis, bits, group_size, outliers) = match kind {
        TensorKind::Key => (
            options.key_axis,
            options.key_bits,
            options.key_group_size,
            options.key_outliers,
        ),
        TensorKind::Value => (
            options.value_axis,
            options.value_bits,
            options.value_group_size,
            options.value_outliers,
        ),
    };
    CodecParams {
        bits: bits.unwrap_or(options.bits),
        grid: options.grid.unwrap_or(options.method.grid()),
        axis: axis.unwrap_or(options.method.axis(kind)),
        group_size: group_size.unwrap_or(options.group_size),
        rotation_seed: options.rotate.then_some(options.rotate_seed),
        sink_tokens: options.sink_tokens,
        recent_tokens: options.recent_tokens,
        sparsity: options.sparsity,
        fit: options.fit,
        outliers: outliers.unwrap_or(options.outliers),
        rate: options.rate,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flags::{parse, Command};
    use kvformat::codec::{Axis, Fit, Grid};

    fn options(args: &[&str]) -> Options {
        match parse(args) {
            Ok(Command::Run(options)) => *options,
            other => panic!("{other:?}"),
        }
    }

    fn params_for(options: &Options, tensor_name: &str) -> CodecParams {
        CodecSettings::resolve(options)
            .unwrap()
            .params_for(tensor_name)
    }

    #[test]
    fn every_old_invocation_means_adr002_group_64() {
        for args in [
            &[
                "-input",
                "a",
                "-output",
                "b",
                "-group-size",
                "64",
                "-sparsity",
                "0.0",
            ][..],
            &[
                "-input",
                "a",
                "-metrics-only",
                "-group-size",
                "64",
                "-verbose",
            ],
            &["-input", "a", "-output", "b"],
        ] {
            let o = options(args);
            assert_eq!(
                params_for(&o, "layer_0_key"),
                CodecParams::adr002(64),
                "{args:?}"
            );
            assert_eq!(
                params_for(&o, "layer_0_value"),
                CodecParams::adr002(64),
                "{args:?}"
            );
        }
    }

    #[test]
    fn kivi_groups_keys_per_channel_and_values_per_token() {
        let o = options(&["-method", "kivi", "-bits", "2", "-group-size", "32"]);
        let key = params_for(&o, "layer_3_key");
        let value = params_for(&o, "layer_3_value");
        assert_eq!(
            (key.grid, key.axis, key.bits, key.group_size),
            (Grid::Asymmetric, Axis::Channel, 2, 32)
        );
        assert_eq!((value.grid, value.axis), (Grid::Asymmetric, Axis::Token));
        // Explicit flags override the preset, per tensor kind.
        let o = options(&[
            "-method",
            "kivi",
            "-grid",
            "sym",
            "-value-axis",
            "flat",
            "-rotate",
            "-sink-tokens",
            "4",
        ]);
        let value = params_for(&o, "v");
        assert_eq!(
            (value.grid, value.axis, value.sink_tokens),
            (Grid::Symmetric, Axis::Flat, 4)
        );
        assert_eq!(value.rotation_seed, Some(crate::flags::DEFAULT_ROTATE_SEED));
        assert_eq!(params_for(&o, "k_key").axis, Axis::Channel);
    }

    #[test]
    fn key_and_value_flags_override_bits_and_group_size_per_kind() {
        let o = options(&[
            "-method",
            "kivi",
            "-bits",
            "2",
            "-group-size",
            "64",
            "-key-bits",
            "3",
            "-key-group-size",
            "128",
            "-value-group-size=256",
            "-fit",
            "mse",
        ]);
        let key = params_for(&o, "layer_0_key");
        let value = params_for(&o, "layer_0_value");
        assert_eq!((key.bits, key.group_size, key.fit), (3, 128, Fit::Mse));
        assert_eq!(
            (value.bits, value.group_size, value.fit),
            (2, 256, Fit::Mse)
        );
        // Each falls back to the shared flag, and the last setting wins.
        let o = options(&[
            "-bits",
            "8",
            "-value-bits",
            "2",
            "-value-bits",
            "4",
            "-key-group-size",
            "32",
        ]);
        let key = params_for(&o, "layer_0_key");
        let value = params_for(&o, "layer_0_value");
        assert_eq!((key.bits, key.group_size, key.fit), (8, 32, Fit::MinMax));
        assert_eq!((value.bits, value.group_size), (4, 64));
        // ecsq rates: a fractional rule is a rate; under -rate every rule is.
        let rates = |args: &[&str]| -> Vec<Option<f64>> {
            let o = options(args);
            ["layer_0_key", "layer_1_key", "layer_0_value"]
                .map(|name| params_for(&o, name).rate)
                .to_vec()
        };
        let rules = ["-grid", "ecsq", "-layer-bits", "k:0=2.71;k:1=4"];
        assert_eq!(rates(&rules), [Some(2.71), None, None]);
        let with_rate = [&rules[..], &["-rate", "3.3"]].concat();
        assert_eq!(rates(&with_rate), [Some(2.71), Some(4.0), Some(3.3)]);
        let o = options(&["-outliers", "0.01", "-key-outliers=0.02"]);
        assert_eq!(params_for(&o, "layer_0_key").outliers, 0.02);
        assert_eq!(params_for(&o, "layer_0_value").outliers, 0.01);
        assert_eq!(params_for(&options(&[]), "layer_0_key").outliers, 0.0);
    }

    #[test]
    fn layer_bits_override_the_kind_flags_for_the_layers_they_name() {
        let o = options(&[
            "-bits",
            "3",
            "-key-group-size",
            "32",
            "-layer-bits",
            "k:0,29=4;k:*=2/128;v:5=8",
        ]);
        let bits_and_group = |name: &str| {
            let p = params_for(&o, name);
            (p.bits, p.group_size)
        };
        assert_eq!(bits_and_group("layer_0_key"), (4, 32));
        assert_eq!(bits_and_group("layer_29_key"), (4, 32));
        assert_eq!(bits_and_group("layer_7_key"), (2, 128));
        assert_eq!(bits_and_group("layer_5_value"), (8, 64));
        assert_eq!(bits_and_group("layer_6_value"), (3, 64));
        assert_eq!(bits_and_group("other"), (3, 64));
    }

    #[test]
    fn conflicting_settings_are_flag_errors_naming_the_tensors() {
        let message = |args: &[&str]| match parse(args) {
            Err(error @ FlagError::Settings { .. }) => error.to_string(),
            other => panic!("{args:?}: {other:?}"),
        };
        assert_eq!(
            message(&["-sparsity", "0.1", "-outliers", "0.01"]),
            "invalid codec settings for key tensors: outliers cannot be combined with sparsity"
        );
        assert_eq!(
            message(&["-value-outliers", "0.01", "-sparsity", "0.1"]),
            "invalid codec settings for value tensors: outliers cannot be combined with sparsity"
        );
        assert!(message(&["-rate", "2.5"]).contains("is for the ecsq grid only"));
        assert_eq!(
            message(&["-grid", "lloyd", "-bits", "3", "-layer-bits", "k:1=2;v:0=8"]),
            "invalid codec settings for value tensors under -layer-bits rule 2: \
             the lloyd grid takes 2, 3 or 4 bits, not 8"
        );
        assert_eq!(
            message(&["-grid", "ecsq", "-outliers", "0.01"]),
            "invalid codec settings for key tensors: the ecsq grid does not combine with outliers"
        );
        // A rule for the other kind only is not held against this one.
        assert!(parse(&["-grid", "lloyd", "-bits", "3", "-layer-bits", "k:1=2"]).is_ok());
    }
}
