//! Hugging Face `config.json`: the shape and the [`Architecture`] of every
//! family the decoder runs, with `transformers`' defaults, in both forms a
//! config comes in: the classic one (top-level `rope_theta`, `rope_scaling`,
//! Gemma 3's `rope_local_base_freq`) and transformers 5's `rope_parameters`
//! (one setting, or one per layer type). Every key that changes the math
//! is used or refused with the key named; keys that do not (dropout,
//! `initializer_range`, `use_cache`, ...) are ignored.

use std::path::Path;

use serde_json::{Map, Value};

use super::{layer_count, read_to_string, validated, LoadError};
use crate::model::architecture::{
    Activation, Architecture, Biases, Family, LayerAttention, NormWeight, Rope, RopeScaling,
};
use crate::model::LlamaConfig;

/// Model types that are refused with a reason rather than as unknown.
const REFUSED_MODEL_TYPES: [(&str, &str); 8] = [
    ("mixtral", "mixture-of-experts MLPs are not implemented"),
    ("qwen2_moe", "mixture-of-experts MLPs are not implemented"),
    ("qwen3_moe", "mixture-of-experts MLPs are not implemented"),
    (
        "deepseek_v2",
        "multi-head latent attention (an MLA cache, kv_lora_rank) is not implemented",
    ),
    (
        "deepseek_v3",
        "multi-head latent attention (an MLA cache, kv_lora_rank) is not implemented",
    ),
    (
        "qwen3_next",
        "hybrid linear-attention layers are not implemented",
    ),
    (
        "gemma3",
        "this is Gemma 3's multimodal wrapper; point kv-validate at a text-only gemma3_text config",
    ),
    ("jamba", "hybrid Mamba layers are not implemented"),
];

/// Keys of a RoPE setting (`rope_scaling` or a `rope_parameters` entry) the
/// decoder reads; any other key there is refused, as it would change the angles.
const ROPE_KEYS: [&str; 15] = [
    "rope_type",
    "type",
    "rope_theta",
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "truncate",
    "attention_factor",
    "mscale",
    "mscale_all_dim",
    "short_factor",
    "long_factor",
];

/// The parsed JSON object with the file it came from, for errors that name both.
struct ConfigJson<'a> {
    map: &'a Map<String, Value>,
    path: &'a Path,
}

impl<'a> ConfigJson<'a> {
    fn unsupported(&self, reason: String) -> LoadError {
        LoadError::Unsupported {
            path: self.path.to_path_buf(),
            reason,
        }
    }

    fn field_error(&self, field: &str, problem: &str) -> LoadError {
        LoadError::ConfigField {
            path: self.path.to_path_buf(),
            field: field.to_string(),
            problem: problem.to_string(),
        }
    }

    /// The value of `key`; `null` counts as absent, as in `transformers`.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>, LoadError> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| self.field_error(key, "expected a non-negative integer"))
            })
            .transpose()
    }

    fn usize(&self, key: &str) -> Result<usize, LoadError> {
        self.opt_usize(key)?
            .ok_or_else(|| self.field_error(key, "missing"))
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>, LoadError> {
        self.get(key)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| self.field_error(key, "expected a number"))
            })
            .transpose()
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool, LoadError> {
        self.get(key).map_or(Ok(default), |v| {
            v.as_bool()
                .ok_or_else(|| self.field_error(key, "expected true or false"))
        })
    }

    fn opt_str(&self, key: &str) -> Result<Option<&'a str>, LoadError> {
        self.get(key)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| self.field_error(key, "expected a string"))
            })
            .transpose()
    }

    fn object(&self, key: &str) -> Result<Option<ConfigJson<'a>>, LoadError> {
        self.get(key)
            .map(|v| {
                v.as_object()
                    .map(|map| ConfigJson {
                        map,
                        path: self.path,
                    })
                    .ok_or_else(|| self.field_error(key, "expected an object"))
            })
            .transpose()
    }
}

/// transformers' defaults that differ between families.
struct FamilyDefaults {
    rope_theta: f64,
    rms_norm_eps: f64,
    max_position_embeddings: usize,
    tie_word_embeddings: bool,
}

fn defaults(family: Family) -> FamilyDefaults {
    let (rope_theta, rms_norm_eps, max_position_embeddings, tie_word_embeddings) = match family {
        Family::Llama => (10_000.0, 1e-6, 2048, false),
        Family::Mistral => (10_000.0, 1e-6, 4096 * 32, false),
        Family::Qwen2 | Family::Qwen3 => (10_000.0, 1e-6, 32_768, false),
        Family::Gemma2 => (10_000.0, 1e-6, 8192, true),
        Family::Gemma3Text => (1_000_000.0, 1e-6, 131_072, true),
        Family::Phi3 => (10_000.0, 1e-5, 4096, false),
    };
    FamilyDefaults {
        rope_theta,
        rms_norm_eps,
        max_position_embeddings,
        tie_word_embeddings,
    }
}

/// Gemma 3's local (sliding-layer) RoPE base when `rope_local_base_freq` is absent.
const GEMMA3_LOCAL_ROPE_THETA: f64 = 10_000.0;

/// One RoPE setting from `settings` (a `rope_scaling` object or a
/// `rope_parameters` entry, named `field` in errors); keys it lacks
/// (`rope_theta`, `original_max_position_embeddings`) come from the top level.
fn rope(
    settings: Option<&ConfigJson>,
    field: &str,
    top: &ConfigJson,
    default_theta: f64,
    max_position_embeddings: usize,
) -> Result<Rope, LoadError> {
    let empty = Map::new();
    let settings = settings.map_or(
        ConfigJson {
            map: &empty,
            path: top.path,
        },
        |s| ConfigJson {
            map: s.map,
            path: s.path,
        },
    );
    if let Some(key) = settings
        .map
        .keys()
        .find(|k| !ROPE_KEYS.contains(&k.as_str()))
    {
        return Err(top.unsupported(format!(
            "{field}.{key} is set; kv-validate does not implement it and would compute other RoPE angles"
        )));
    }
    let named = |key: &str| format!("{field}.{key}");
    let number = |key: &str| settings.opt_f64(key);
    let required = |key: &str| number(key)?.ok_or_else(|| top.field_error(&named(key), "missing"));
    let theta = match number("rope_theta")? {
        Some(theta) => theta,
        None => top.opt_f64("rope_theta")?.unwrap_or(default_theta),
    };
    let original_max = || -> Result<usize, LoadError> {
        match settings.opt_usize("original_max_position_embeddings")? {
            Some(n) => Ok(n),
            None => top.usize("original_max_position_embeddings"),
        }
    };
    let rope_type = match settings.opt_str("rope_type")? {
        Some(t) => Some(t),
        None => settings.opt_str("type")?,
    };
    let scaling = match rope_type.unwrap_or("default") {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: required("factor")?,
        },
        "dynamic" => RopeScaling::Dynamic {
            factor: required("factor")?,
            max_position_embeddings,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: required("factor")?,
            low_freq_factor: required("low_freq_factor")?,
            high_freq_factor: required("high_freq_factor")?,
            original_max_position_embeddings: original_max()?,
        },
        "yarn" => {
            let original = original_max()?;
            let factor =
                number("factor")?.unwrap_or(max_position_embeddings as f64 / original as f64);
            let mscale_of = |mscale: f64| {
                if factor <= 1.0 {
                    1.0
                } else {
                    0.1 * mscale * factor.ln() + 1.0
                }
            };
            let attention_factor = match (
                number("attention_factor")?,
                number("mscale")?,
                number("mscale_all_dim")?,
            ) {
                (Some(a), _, _) => a,
                (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                    mscale_of(m) / mscale_of(all)
                }
                _ => mscale_of(1.0),
            };
            let beta = |key: &str, default: f64| -> Result<f64, LoadError> {
                Ok(number(key)?.filter(|b| *b != 0.0).unwrap_or(default))
            };
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original,
                beta_fast: beta("beta_fast", 32.0)?,
                beta_slow: beta("beta_slow", 1.0)?,
                truncate: settings.bool_or("truncate", true)?,
                attention_factor,
            }
        }
        "longrope" | "su" => {
            let original = original_max()?;
            let factor =
                number("factor")?.unwrap_or(max_position_embeddings as f64 / original as f64);
            let attention_factor = match number("attention_factor")? {
                Some(a) => a,
                None if factor <= 1.0 => 1.0,
                None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
            };
            let list = |key: &str| -> Result<Vec<f64>, LoadError> {
                settings
                    .get(key)
                    .and_then(Value::as_array)
                    .and_then(|values| values.iter().map(Value::as_f64).collect())
                    .ok_or_else(|| top.field_error(&named(key), "expected a list of numbers"))
            };
            RopeScaling::LongRope {
                short_factor: list("short_factor")?,
                long_factor: list("long_factor")?,
                original_max_position_embeddings: original,
                attention_factor,
            }
        }
        other => {
            return Err(top.unsupported(format!(
            "{} is {other:?}; implemented: default, linear, dynamic, llama3, yarn, longrope (su)",
            named("rope_type")
        )))
        }
    };
    Ok(Rope { theta, scaling })
}

/// The RoPE settings and, per layer type, which one it uses:
/// `(ropes, index for full-attention layers, index for sliding layers)`.
fn ropes(
    json: &ConfigJson,
    family: Family,
    theta: f64,
    max_position_embeddings: usize,
) -> Result<(Vec<Rope>, usize, usize), LoadError> {
    let rope_at = |settings: Option<&ConfigJson>, field: &str, theta: f64| {
        rope(settings, field, json, theta, max_position_embeddings)
    };
    if let Some(parameters) = json.object("rope_parameters")? {
        if json.get("rope_scaling").is_some() {
            return Err(json.unsupported(
                "both rope_parameters and rope_scaling are set; which one transformers \
                 uses depends on its version"
                    .into(),
            ));
        }
        let per_layer_type = ["full_attention", "sliding_attention"]
            .iter()
            .any(|t| parameters.map.contains_key(*t));
        if !per_layer_type {
            return Ok((
                vec![rope_at(Some(&parameters), "rope_parameters", theta)?],
                0,
                0,
            ));
        }
        if let Some(key) = parameters
            .map
            .keys()
            .find(|k| !["full_attention", "sliding_attention"].contains(&k.as_str()))
        {
            return Err(json.unsupported(format!(
                "rope_parameters.{key} is set; only full_attention and sliding_attention layers exist here"
            )));
        }
        let full = parameters.object("full_attention")?;
        let sliding = parameters.object("sliding_attention")?;
        let local_theta = if family == Family::Gemma3Text {
            GEMMA3_LOCAL_ROPE_THETA
        } else {
            theta
        };
        let ropes = vec![
            rope_at(full.as_ref(), "rope_parameters.full_attention", theta)?,
            rope_at(
                sliding.as_ref(),
                "rope_parameters.sliding_attention",
                local_theta,
            )?,
        ];
        return Ok((ropes, 0, 1));
    }
    let scaling = json.object("rope_scaling")?;
    let global = rope_at(scaling.as_ref(), "rope_scaling", theta)?;
    if family == Family::Gemma3Text {
        // Classic Gemma 3: rope_scaling and rope_theta are the global layers';
        // the sliding ones use plain RoPE at rope_local_base_freq.
        let local_theta = json
            .opt_f64("rope_local_base_freq")?
            .unwrap_or(GEMMA3_LOCAL_ROPE_THETA);
        return Ok((vec![global, Rope::plain(local_theta)], 0, 1));
    }
    Ok((vec![global], 0, 0))
}

/// Whether each layer slides: `layer_types` where the config has it, else
/// the family's rule; and the window the sliding ones use.
fn sliding_layers(
    json: &ConfigJson,
    family: Family,
    num_layers: usize,
) -> Result<(Vec<bool>, Option<usize>), LoadError> {
    let window = json.opt_usize("sliding_window")?;
    // Qwen's sliding_window is unused unless use_sliding_window (Qwen2.5
    // checkpoints set 32768 or 131072 and leave it off).
    let window = match family {
        Family::Llama => None,
        Family::Qwen2 | Family::Qwen3 if !json.bool_or("use_sliding_window", false)? => None,
        Family::Gemma2 | Family::Gemma3Text => Some(window.unwrap_or(4096)),
        _ => window,
    };
    let types = match json.get("layer_types") {
        Some(types) => {
            let types: Vec<&str> = types
                .as_array()
                .and_then(|list| list.iter().map(Value::as_str).collect())
                .ok_or_else(|| json.field_error("layer_types", "expected a list of strings"))?;
            if types.len() != num_layers {
                return Err(json.field_error(
                    "layer_types",
                    &format!("{} entries for num_hidden_layers {num_layers}", types.len()),
                ));
            }
            types
                .iter()
                .enumerate()
                .map(|(i, t)| match *t {
                    "full_attention" => Ok(false),
                    "sliding_attention" => Ok(true),
                    other => Err(json.unsupported(format!(
                        "layer_types[{i}] is {other:?}; only full_attention and sliding_attention \
                         layers are implemented (no hybrid or linear attention)"
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()?
        }
        None => {
            let pattern_slides = |i: usize| match family {
                Family::Gemma2 => (i + 1) % 2 != 0,
                Family::Gemma3Text => {
                    let pattern = json
                        .opt_usize("sliding_window_pattern")
                        .ok()
                        .flatten()
                        .unwrap_or(6);
                    pattern == 0 || (i + 1) % pattern != 0
                }
                Family::Qwen2 | Family::Qwen3 => {
                    i >= json
                        .opt_usize("max_window_layers")
                        .ok()
                        .flatten()
                        .unwrap_or(28)
                }
                _ => true,
            };
            (0..num_layers).map(pattern_slides).collect()
        }
    };
    Ok((types, window))
}

/// Config keys of other models' math that none of these families has;
/// a config that sets one is refused rather than run without it.
const REFUSED_KEYS: [(&str, &str); 6] = [
    (
        "kv_lora_rank",
        "multi-head latent attention (an MLA cache) is not implemented",
    ),
    (
        "num_local_experts",
        "mixture-of-experts MLPs are not implemented",
    ),
    ("num_experts", "mixture-of-experts MLPs are not implemented"),
    (
        "attention_chunk_size",
        "chunked attention is not implemented",
    ),
    (
        "use_bidirectional_attention",
        "bidirectional attention is not a causal decoder",
    ),
    ("no_rope_layers", "layers without RoPE are not implemented"),
];

fn architecture_of(
    json: &ConfigJson,
    family: Family,
    shape: &Shape,
) -> Result<Architecture, LoadError> {
    for (key, why) in REFUSED_KEYS {
        let set = match json.get(key) {
            None | Some(Value::Bool(false)) => false,
            Some(Value::Number(n)) => n.as_f64() != Some(0.0),
            Some(_) => true,
        };
        if set {
            return Err(json.unsupported(format!("{key} is set; {why}")));
        }
    }
    if let Some(partial) = json.opt_f64("partial_rotary_factor")?.filter(|p| *p != 1.0) {
        return Err(json.unsupported(format!(
            "partial_rotary_factor is {partial}; only RoPE over the whole head is implemented"
        )));
    }
    let is_gemma = matches!(family, Family::Gemma2 | Family::Gemma3Text);
    let (activation_key, default_activation) = if is_gemma {
        ("hidden_activation", "gelu_pytorch_tanh")
    } else {
        ("hidden_act", "silu")
    };
    let activation = match json.opt_str(activation_key)?.unwrap_or(default_activation) {
        "silu" => Activation::Silu,
        "gelu_pytorch_tanh" => Activation::GeluTanh,
        other => {
            return Err(json.unsupported(format!(
                "{activation_key} is {other:?}; implemented: \"silu\" (SwiGLU), \
                 \"gelu_pytorch_tanh\" (GeGLU)"
            )))
        }
    };
    let attention_bias = json.bool_or("attention_bias", false)?;
    let biases = match family {
        Family::Llama => Biases {
            qkv: attention_bias,
            output: attention_bias,
            mlp: json.bool_or("mlp_bias", false)?,
        },
        Family::Qwen2 => Biases {
            qkv: true,
            output: false,
            mlp: false,
        },
        Family::Qwen3 | Family::Gemma2 | Family::Gemma3Text => Biases {
            qkv: attention_bias,
            output: attention_bias,
            mlp: false,
        },
        Family::Mistral | Family::Phi3 => Biases::default(),
    };
    let softcap = |key: &str, default: Option<f64>| -> Result<Option<f64>, LoadError> {
        match json.map.get(key) {
            Some(Value::Null) => Ok(None),
            None => Ok(default),
            Some(_) => json.opt_f64(key),
        }
    };
    let (attention_softcap, final_logit_softcap) = match family {
        Family::Gemma2 => (
            softcap("attn_logit_softcapping", Some(50.0))?,
            softcap("final_logit_softcapping", Some(30.0))?,
        ),
        // Gemma 3's attention reads attn_logit_softcapping but never applies
        // it (transformers 5 passes no softcap to its attention): neither do we.
        Family::Gemma3Text => (None, softcap("final_logit_softcapping", None)?),
        _ => (None, None),
    };
    let query_scale = if is_gemma {
        json.opt_f64("query_pre_attn_scalar")?.unwrap_or(256.0)
    } else {
        shape.head_dim as f64
    };
    let (ropes, full_rope, sliding_rope) = ropes(
        json,
        family,
        shape.rope_theta,
        shape.max_position_embeddings,
    )?;
    let (slides, window) = sliding_layers(json, family, shape.num_layers)?;
    let layers = slides
        .into_iter()
        .map(|slides| {
            let sliding_window = window.filter(|_| slides);
            LayerAttention {
                sliding_window,
                rope: if slides { sliding_rope } else { full_rope },
            }
        })
        .collect();
    Ok(Architecture {
        family,
        norm_weight: if is_gemma {
            NormWeight::OffsetByOne
        } else {
            NormWeight::Plain
        },
        activation,
        biases,
        qk_norm: matches!(family, Family::Qwen3 | Family::Gemma3Text),
        sandwich_norms: is_gemma,
        scale_embeddings: is_gemma,
        query_scale,
        attention_softcap,
        final_logit_softcap,
        fused_projections: family == Family::Phi3,
        ropes,
        layers,
    })
}

/// What [`architecture_of`] needs of the shape.
struct Shape {
    head_dim: usize,
    num_layers: usize,
    rope_theta: f64,
    max_position_embeddings: usize,
}

fn config_of(json: &ConfigJson) -> Result<LlamaConfig, LoadError> {
    let model_type = json
        .opt_str("model_type")?
        .ok_or_else(|| json.field_error("model_type", "missing"))?;
    let family = match Family::from_model_type(model_type) {
        Some(family) => family,
        None => {
            let why = REFUSED_MODEL_TYPES
                .iter()
                .find(|(t, _)| *t == model_type)
                .map_or(
                    "it is not one of the families kv-validate implements",
                    |(_, why)| why,
                );
            let supported: Vec<&str> = Family::ALL.iter().map(|f| f.model_type()).collect();
            return Err(json.unsupported(format!(
                "model_type is {model_type:?}: {why} (supported: {})",
                supported.join(", ")
            )));
        }
    };
    let defaults = defaults(family);
    let hidden_size = json.usize("hidden_size")?;
    let num_attention_heads = json.usize("num_attention_heads")?;
    let num_hidden_layers = layer_count(
        json.path,
        "num_hidden_layers",
        json.usize("num_hidden_layers")?,
    )?;
    let head_dim = match json.opt_usize("head_dim")? {
        Some(d) => d,
        None if matches!(family, Family::Gemma2 | Family::Gemma3Text) => 256,
        None => hidden_size / num_attention_heads.max(1),
    };
    let max_position_embeddings = json
        .opt_usize("max_position_embeddings")?
        .unwrap_or(defaults.max_position_embeddings);
    let shape = Shape {
        head_dim,
        num_layers: num_hidden_layers,
        rope_theta: defaults.rope_theta,
        max_position_embeddings,
    };
    let architecture = architecture_of(json, family, &shape)?;
    let eos_token_id = match json.get("eos_token_id") {
        // One id or a list (Llama 3 lists several); we keep the first.
        Some(Value::Array(ids)) => ids.first().and_then(Value::as_u64),
        Some(id) => id.as_u64(),
        None => None,
    };
    let config = LlamaConfig {
        hidden_size,
        intermediate_size: json.usize("intermediate_size")?,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads: json
            .opt_usize("num_key_value_heads")?
            .unwrap_or(num_attention_heads),
        head_dim,
        rms_norm_eps: json
            .opt_f64("rms_norm_eps")?
            .unwrap_or(defaults.rms_norm_eps),
        vocab_size: json.usize("vocab_size")?,
        max_position_embeddings,
        tie_word_embeddings: json.bool_or("tie_word_embeddings", defaults.tie_word_embeddings)?,
        bos_token_id: json.opt_usize("bos_token_id")?.map(|id| id as u32),
        eos_token_id: eos_token_id.map(|id| id as u32),
        architecture,
    };
    validated(config, json.path)
}

/// Parses and checks a Hugging Face `config.json`.
pub fn read_hf_config(path: &Path) -> Result<LlamaConfig, LoadError> {
    let text = read_to_string(path)?;
    let value: Value = serde_json::from_str(&text).map_err(|source| LoadError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    let map = value.as_object().ok_or_else(|| LoadError::ConfigField {
        path: path.to_path_buf(),
        field: "(top level)".into(),
        problem: "expected a JSON object".into(),
    })?;
    config_of(&ConfigJson { map, path })
}
