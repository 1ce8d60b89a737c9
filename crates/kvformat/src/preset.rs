//! The named methods (ADR-002, KIVI), their default group size, and the
//! naming rule of a cache's tensors (`layer_{i}_key`, `layer_{i}_value`),
//! built by [`tensor_name`] and read by [`TensorKind::of`] and
//! [`layer_index`]: one definition, so the CLI, the validator, the tests and
//! any other writer agree on what a preset and a name mean.

use serde::Serialize;

use crate::codec::{Axis, Grid};

/// A tensor's kind by the cache's naming rule (`layer_{i}_key`,
/// `layer_{i}_value`): a name ending in `_key` is a key, any other a value
/// (the original compressed every tensor whatever its name).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TensorKind {
    Key,
    Value,
}

/// Values per quantization group unless told otherwise: the original's
/// `-group-size` default, and what its Python bridge passed.
pub const DEFAULT_GROUP_SIZE: usize = 64;

/// The name of `kind`'s tensor of layer `layer`: `layer_{layer}_key` or
/// `layer_{layer}_value`.
pub fn tensor_name(layer: usize, kind: TensorKind) -> String {
    format!("layer_{layer}_{}", kind.suffix())
}

impl TensorKind {
    /// Both kinds, in a layer's order (keys first).
    pub const BOTH: [TensorKind; 2] = [TensorKind::Key, TensorKind::Value];

    /// `key` or `value`, as the name ends.
    pub fn suffix(self) -> &'static str {
        match self {
            TensorKind::Key => "key",
            TensorKind::Value => "value",
        }
    }

    pub fn of(tensor_name: &str) -> Self {
        if tensor_name.ends_with("_key") {
            TensorKind::Key
        } else {
            TensorKind::Value
        }
    }
}

/// The `i` of `layer_{i}_key` / `layer_{i}_value` (decimal, no sign or
/// leading `+`), or `None` for a name outside that rule.
pub fn layer_index(tensor_name: &str) -> Option<usize> {
    let rest = tensor_name.strip_prefix("layer_")?;
    let digits = rest
        .strip_suffix("_key")
        .or_else(|| rest.strip_suffix("_value"))?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A named set of codec choices (`-method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// The original's method: symmetric grid, flat groups (4 bits: ADR-002).
    Adr002,
    /// KIVI: asymmetric grid, keys grouped per channel along tokens, values per token.
    Kivi,
    /// An inference engine's cache type (`llama-q4_0`, `vllm-fp8-e4m3`): its
    /// grid, its block layout, no LZ4 stage.
    Engine(Grid),
}

/// How the float8 grids' scales are chosen (`-fp8-scale`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fp8Scale {
    /// 1.0, vLLM's default without scales.
    #[default]
    Unit,
    /// One per tensor, `max|x| / max_finite`: llm-compressor's static scale.
    Calibrated,
    /// One per token and head, computed from its own values.
    Dynamic,
}

/// Group size of "the whole segment": one group per tensor (flat) or per
/// token and head (per-token axis).
pub const WHOLE_SEGMENT: usize = u32::MAX as usize;

impl Preset {
    /// The preset spelled `name` on the command line.
    pub fn from_name(name: &str) -> Option<Preset> {
        match name {
            "adr002" => Some(Preset::Adr002),
            "kivi" => Some(Preset::Kivi),
            _ => Grid::from_engine_method(name).map(Preset::Engine),
        }
    }

    pub fn grid(self) -> Grid {
        match self {
            Preset::Adr002 => Grid::Symmetric,
            Preset::Kivi => Grid::Asymmetric,
            Preset::Engine(grid) => grid,
        }
    }

    /// An engine preset's fixed bits, axis and group size, whatever the other
    /// flags say (the format is the engine's), and whether scales are 1.
    pub fn engine_layout(self, fp8_scale: Fp8Scale) -> Option<(u8, Axis, usize, bool)> {
        let Preset::Engine(grid) = self else {
            return None;
        };
        let bits = grid.spec().bits[0];
        let unit_scales = grid.spec().engine.as_ref().is_some_and(|e| e.unit_scale);
        Some(if let Some(group) = grid.engine_flat_group() {
            (bits, Axis::Flat, group, false)
        } else if let Some(block) = grid.engine_block() {
            // A block's scale is its own; -fp8-scale only says whether the
            // tensor scale above it (NVFP4's k_scale) is 1.
            let unit = unit_scales && fp8_scale == Fp8Scale::Unit;
            (bits, Axis::Token, block, unit)
        } else {
            match fp8_scale {
                // An engine without unit scales (TensorRT-LLM's int8) is calibrated.
                Fp8Scale::Unit => (bits, Axis::Flat, WHOLE_SEGMENT, unit_scales),
                Fp8Scale::Calibrated => (bits, Axis::Flat, WHOLE_SEGMENT, false),
                Fp8Scale::Dynamic => (bits, Axis::Token, WHOLE_SEGMENT, false),
            }
        })
    }

    pub fn axis(self, kind: TensorKind) -> Axis {
        match (self, kind) {
            (Preset::Adr002, _) => Axis::Flat,
            (Preset::Engine(_), _) => Axis::Token,
            (Preset::Kivi, TensorKind::Key) => Axis::Channel,
            (Preset::Kivi, TensorKind::Value) => Axis::Token,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_cache_rule() {
        assert_eq!(TensorKind::of("layer_3_key"), TensorKind::Key);
        assert_eq!(TensorKind::of("layer_3_value"), TensorKind::Value);
        assert_eq!(TensorKind::of("anything"), TensorKind::Value);
        assert_eq!(layer_index("layer_29_key"), Some(29));
        assert_eq!(layer_index("layer_0_value"), Some(0));
        for kind in TensorKind::BOTH {
            let name = tensor_name(7, kind);
            assert_eq!(TensorKind::of(&name), kind);
            assert_eq!(layer_index(&name), Some(7));
        }
        assert_eq!(tensor_name(12, TensorKind::Value), "layer_12_value");
        for name in [
            "layer__key",
            "layer_+1_key",
            "layer_1_bias",
            "k_key",
            "layer_1x_key",
        ] {
            assert_eq!(layer_index(name), None, "{name}");
        }
    }
}
