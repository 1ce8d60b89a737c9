//! `kv-validate capacity`: what each KV-cache method buys in serving
//! capacity. From a model's config alone: KV bytes per token and per request
//! at FP16 and at each method's bits/value, and the largest batch of
//! concurrent requests that fits in a GPU's memory after the weights, for the
//! four traffic profiles the Compass recommender plans with. Pure arithmetic,
//! so the tests check it against hand-computed figures.

use std::path::{Path, PathBuf};

use kvformat::codec::{payload_len, CodecParams, Layout, ScaleDtype, SparseForm, GRIDS};
use kvformat::preset::{Fp8Scale, Preset, DEFAULT_GROUP_SIZE};
use serde::{Deserialize, Serialize};

use crate::identity::ContentId;
use crate::model::LlamaConfig;
use crate::plot::{render_points, Chart, Point};
use crate::sweep::SweepTable;

/// Prompt -> output tokens: the Compass recommender's four standard profiles.
pub const PROFILES: [Profile; 4] = [
    Profile {
        prompt_tokens: 512,
        output_tokens: 256,
    },
    Profile {
        prompt_tokens: 1024,
        output_tokens: 1024,
    },
    Profile {
        prompt_tokens: 4096,
        output_tokens: 512,
    },
    Profile {
        prompt_tokens: 10240,
        output_tokens: 1536,
    },
];

/// GPU memory sizes used when none is given: `memory.total` as nvidia-smi
/// reports it for an H100 80GB (81,559 MiB) and an H200 (143,771 MiB).
pub const DEFAULT_GPUS: [(&str, u64); 2] =
    [("H100 80GB", 81_559 << 20), ("H200 141GB", 143_771 << 20)];

/// Bits of the codes of the uniform methods reported without a sweep.
const CODEC_BITS: [u8; 4] = [8, 4, 3, 2];
/// Their group size: the default of kv-compress (ADR-002).
const CODEC_GROUP_SIZE: usize = DEFAULT_GROUP_SIZE;

/// One request: its prompt and the tokens it generates; at its end the
/// cache holds both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Profile {
    pub prompt_tokens: u64,
    pub output_tokens: u64,
}

impl Profile {
    pub fn tokens(&self) -> u64 {
        self.prompt_tokens + self.output_tokens
    }

    pub fn name(&self) -> String {
        format!("{}→{}", self.prompt_tokens, self.output_tokens)
    }
}

/// A GPU's memory: a name for the report and its size in bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GpuMemory {
    pub name: String,
    pub bytes: u64,
}

impl GpuMemory {
    /// `--gpu-memory`: a size with a unit, `80GiB`, `141GB`, `81559MiB`, or
    /// bytes; decimal units are powers of 1000, binary ones of 1024.
    pub fn parse(text: &str) -> Result<Self, String> {
        let trimmed = text.trim();
        let split = trimmed
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(trimmed.len());
        let (number, unit) = trimmed.split_at(split);
        let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1.0,
            "kb" => 1e3,
            "mb" => 1e6,
            "gb" => 1e9,
            "tb" => 1e12,
            "kib" => 1024.0,
            "mib" => 1024f64.powi(2),
            "gib" => 1024f64.powi(3),
            "tib" => 1024f64.powi(4),
            other => {
                return Err(format!(
                    "{text:?}: unknown unit {other:?} (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)"
                ))
            }
        };
        let value: f64 = number
            .parse()
            .map_err(|_| format!("{text:?}: expected a size such as 80GiB"))?;
        let bytes = value * scale;
        if !(bytes >= 1.0 && bytes < 2f64.powi(63)) {
            return Err(format!("{text:?}: not a plausible memory size"));
        }
        Ok(GpuMemory {
            name: trimmed.to_string(),
            bytes: bytes.round() as u64,
        })
    }

    pub fn defaults() -> Vec<Self> {
        DEFAULT_GPUS
            .iter()
            .map(|&(name, bytes)| GpuMemory {
                name: name.into(),
                bytes,
            })
            .collect()
    }
}

/// `--weights-dtype`: the bytes each weight takes in GPU memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum WeightsDtype {
    F32,
    F16,
    Bf16,
    /// One byte a weight; scales not counted.
    Int8,
    /// Half a byte a weight; scales not counted.
    Int4,
}

impl WeightsDtype {
    pub fn bits(self) -> u64 {
        match self {
            WeightsDtype::F32 => 32,
            WeightsDtype::F16 | WeightsDtype::Bf16 => 16,
            WeightsDtype::Int8 => 8,
            WeightsDtype::Int4 => 4,
        }
    }
}

/// A KV-cache method: its bits per cached value and, from a sweep, what it cost.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Method {
    pub label: String,
    pub bits_per_value: f64,
    /// Perplexity delta measured by a sweep.
    pub delta: Option<f64>,
    /// Mean KL divergence (nats) measured by a sweep.
    pub kld_mean: Option<f64>,
}

impl Method {
    /// FP16, the uncompressed reference, then kv-compress's symmetric grids
    /// at 8, 4 (ADR-002), 3 and 2 bits with one FP16 scale per 64 values,
    /// their bits/value computed by the codec's own payload length.
    pub fn defaults() -> Vec<Self> {
        let layout = Layout {
            scale_dtype: ScaleDtype::F16,
            sparse_form: SparseForm::Dense,
            coded_bytes: None,
            coder: None,
        };
        let shape = [1, 1, CODEC_GROUP_SIZE, CODEC_GROUP_SIZE];
        let values = (CODEC_GROUP_SIZE * CODEC_GROUP_SIZE) as f64;
        let mut methods = vec![Method::fp16()];
        for bits in CODEC_BITS {
            let params = CodecParams {
                bits,
                ..CodecParams::adr002(CODEC_GROUP_SIZE)
            };
            let bytes = payload_len(&shape, &params, &layout).expect("a valid codec and shape");
            methods.push(Method {
                label: if bits == 4 {
                    "adr002-g64".into()
                } else {
                    format!("int{bits}-g64")
                },
                bits_per_value: 8.0 * bytes as f64 / values,
                delta: None,
                kld_mean: None,
            });
        }
        methods.extend(Method::engine_formats());
        methods
    }

    /// Every inference engine's cache format (fp8 with a per-tensor scale),
    /// its bits/value from the codec's payload length: the engine's bytes.
    fn engine_formats() -> Vec<Self> {
        let shape = [1, 1, CODEC_GROUP_SIZE, CODEC_GROUP_SIZE];
        let values = (CODEC_GROUP_SIZE * CODEC_GROUP_SIZE) as f64;
        GRIDS
            .iter()
            .filter_map(|spec| spec.engine.as_ref().map(|engine| (spec.grid, engine)))
            .map(|(grid, engine)| {
                let (bits, axis, group_size, unit_scale) = Preset::Engine(grid)
                    .engine_layout(Fp8Scale::Calibrated)
                    .expect("an engine grid has the engine's layout");
                let params = CodecParams {
                    bits,
                    grid,
                    axis,
                    group_size,
                    unit_scale,
                    ..CodecParams::adr002(group_size)
                };
                let layout = Layout {
                    // An engine grid's first scale dtype is the engine's
                    // (quanto: a half-precision model's scale and shift).
                    scale_dtype: grid.spec().scale_dtypes[0],
                    sparse_form: SparseForm::Dense,
                    coded_bytes: None,
                    coder: None,
                };
                let bytes = payload_len(&shape, &params, &layout).expect("a valid engine format");
                Method {
                    label: engine.method.to_string(),
                    bits_per_value: 8.0 * bytes as f64 / values,
                    delta: None,
                    kld_mean: None,
                }
            })
            .collect()
    }

    fn fp16() -> Self {
        Method {
            label: "fp16".into(),
            bits_per_value: 16.0,
            delta: None,
            kld_mean: None,
        }
    }

    /// FP16, then every row of a sweep's table with its measured delta and KLD.
    pub fn from_sweep(table: &SweepTable) -> Vec<Self> {
        std::iter::once(Method::fp16())
            .chain(table.rows.iter().map(|row| Method {
                label: row.label.clone(),
                bits_per_value: row.bits_per_value,
                delta: Some(row.delta),
                kld_mean: row.kld_mean,
            }))
            .collect()
    }
}

/// Why the capacity report could not be made; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum CapacityError {
    #[error("{}: cannot read the sweep JSON: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a kv-validate sweep JSON (--sweep --json): {source}", path.display())]
    NotSweep {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// A config whose sizes multiply past 64 bits; the largest factor is named.
    #[error(
        "{}: {field} = {value} is implausible: the {quantity} ({formula}) would not fit in 64 bits",
        path.display()
    )]
    Overflow {
        path: PathBuf,
        field: &'static str,
        value: u64,
        quantity: &'static str,
        formula: &'static str,
    },
    #[error(
        "{}: does not say which model it measured (no config_content: written by an older \
         kv-validate, or by hand), so its figures cannot be set beside {}'s; re-run the sweep \
         or merge with this kv-validate",
        sweep.display(), config.display()
    )]
    SweepWithoutModel { sweep: PathBuf, config: PathBuf },
    #[error(
        "{}: measured another model: its config_content is {theirs} but {} has {ours}; \
         a sweep's figures hold for the model it ran",
        sweep.display(), config.display()
    )]
    SweepOfOtherModel {
        sweep: PathBuf,
        config: PathBuf,
        theirs: String,
        ours: String,
    },
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
}

/// A size computed from a config's fields, in checked arithmetic: an
/// overflow is an error naming the largest field that went into it.
struct SizeFormula<'a> {
    config_file: &'a Path,
    quantity: &'static str,
    formula: &'static str,
    fields: &'a [(&'static str, u64)],
}

impl SizeFormula<'_> {
    fn product(&self, factors: &[u64]) -> Result<u64, CapacityError> {
        let product = factors.iter().try_fold(1u64, |p, &f| p.checked_mul(f));
        product.ok_or_else(|| self.overflow())
    }

    fn sum(&self, terms: &[u64]) -> Result<u64, CapacityError> {
        let sum = terms.iter().try_fold(0u64, |s, &t| s.checked_add(t));
        sum.ok_or_else(|| self.overflow())
    }

    fn overflow(&self) -> CapacityError {
        let &(field, value) = self
            .fields
            .iter()
            .max_by_key(|(_, value)| *value)
            .expect("fields are named");
        CapacityError::Overflow {
            path: self.config_file.to_path_buf(),
            field,
            value,
            quantity: self.quantity,
            formula: self.formula,
        }
    }
}

/// Fails unless the sweep at `sweep` ran the model whose config `config_file`
/// is (same `config_content`: SHA-256 and size of config.json, or of the GGUF).
pub fn ensure_sweep_of_model(
    sweep: &Path,
    config_content: Option<&ContentId>,
    config_file: &Path,
) -> Result<(), CapacityError> {
    let Some(theirs) = config_content else {
        return Err(CapacityError::SweepWithoutModel {
            sweep: sweep.to_path_buf(),
            config: config_file.to_path_buf(),
        });
    };
    let ours = ContentId::of_files(&[config_file.to_path_buf()])?;
    if *theirs != ours {
        let show = |id: &ContentId| format!("sha256 {} ({} bytes)", id.sha256, id.bytes);
        return Err(CapacityError::SweepOfOtherModel {
            sweep: sweep.to_path_buf(),
            config: config_file.to_path_buf(),
            theirs: show(theirs),
            ours: show(&ours),
        });
    }
    Ok(())
}

/// The sweep table of a sweep's JSON report (`--sweep --json` or `merge`).
pub fn read_sweep_table(path: &Path) -> Result<SweepTable, CapacityError> {
    read_sweep(path).map(|sweep| sweep.table)
}

/// What `capacity` reads of a sweep's JSON report: its table and the model
/// it measured.
#[derive(Deserialize)]
pub struct SweepJson {
    pub table: SweepTable,
    /// Absent from reports of older versions and hand-written ones.
    pub config_content: Option<ContentId>,
}

/// A sweep's JSON report (`--sweep --json` or `merge`).
pub fn read_sweep(path: &Path) -> Result<SweepJson, CapacityError> {
    let text = std::fs::read_to_string(path).map_err(|source| CapacityError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str::<SweepJson>(&text).map_err(|source| CapacityError::NotSweep {
        path: path.to_path_buf(),
        source,
    })
}

/// Parameters of a model with this config: embeddings, per layer the Q, K,
/// V, O projections (with their biases where the family has them), the
/// gated MLP, the RMSNorms (four per layer in Gemma, plus per-head q/k norms
/// in Qwen3 and Gemma 3), the final norm, and the output head unless it is
/// tied to the embeddings.
pub fn parameter_count(config: &LlamaConfig, config_file: &Path) -> Result<u64, CapacityError> {
    let [hidden, intermediate, heads, kv_heads, head_dim, vocab, layers] = [
        config.hidden_size,
        config.intermediate_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
        config.vocab_size,
        config.num_hidden_layers,
    ]
    .map(|n| n as u64);
    let size = SizeFormula {
        config_file,
        quantity: "parameter count",
        formula: "embeddings + layers x (attention + MLP + norms) + head",
        fields: &[
            ("hidden_size", hidden),
            ("intermediate_size", intermediate),
            ("num_attention_heads", heads),
            ("num_key_value_heads", kv_heads),
            ("head_dim", head_dim),
            ("vocab_size", vocab),
            ("num_hidden_layers", layers),
        ],
    };
    let product = |factors: &[u64]| size.product(factors);
    let sum = |terms: &[u64]| size.sum(terms);
    let arch = &config.architecture;
    let attention = sum(&[
        product(&[2, hidden, heads, head_dim])?,
        product(&[2, hidden, kv_heads, head_dim])?,
    ])?;
    let qkv_outputs = sum(&[heads, product(&[2, kv_heads])?])?;
    let attention_biases = sum(&[
        product(&[u64::from(arch.biases.qkv), qkv_outputs, head_dim])?,
        product(&[u64::from(arch.biases.output), hidden])?,
    ])?;
    let mlp_biases = sum(&[product(&[2, intermediate])?, hidden])?;
    let mlp = sum(&[
        product(&[3, hidden, intermediate])?,
        product(&[u64::from(arch.biases.mlp), mlp_biases])?,
    ])?;
    let norms = sum(&[
        product(&[if arch.sandwich_norms { 4 } else { 2 }, hidden])?,
        product(&[u64::from(arch.qk_norm), 2, head_dim])?,
    ])?;
    let per_layer = sum(&[attention, attention_biases, mlp, norms])?;
    let embeddings = product(&[vocab, hidden])?;
    let head = if config.tie_word_embeddings {
        0
    } else {
        embeddings
    };
    sum(&[embeddings, product(&[layers, per_layer])?, hidden, head])
}

/// Keys and values cached per token while no sliding window is full:
/// layers x 2 x KV heads x head_dim.
pub fn kv_values_per_token(config: &LlamaConfig, config_file: &Path) -> Result<u64, CapacityError> {
    let fields = [
        ("num_hidden_layers", config.num_hidden_layers as u64),
        ("num_key_value_heads", config.num_key_value_heads as u64),
        ("head_dim", config.head_dim as u64),
    ];
    let size = SizeFormula {
        config_file,
        quantity: "KV values per token",
        formula: "num_hidden_layers x 2 x num_key_value_heads x head_dim",
        fields: &fields,
    };
    size.product(&[fields[0].1, 2, fields[1].1, fields[2].1])
}

/// Keys and values one sequence of `tokens` holds: a sliding-window layer
/// holds at most its window (what a serving engine allocates for it).
/// Saturates at `u64::MAX` rather than wrap.
pub fn kv_values_for_tokens(config: &LlamaConfig, tokens: u64) -> u64 {
    let per_layer_token = (2 * config.num_key_value_heads * config.head_dim) as u64;
    config
        .architecture
        .layers
        .iter()
        .map(|layer| {
            let held = layer
                .sliding_window
                .map_or(tokens, |window| tokens.min(window as u64));
            per_layer_token.saturating_mul(held)
        })
        .fold(0, u64::saturating_add)
}

/// The longest sequence whose cache fits in `free` bytes at
/// `bits_per_value`; `u64::MAX` when every layer slides and even a full
/// window of each fits.
fn max_cached_tokens(config: &LlamaConfig, bits_per_value: f64, free: u64) -> u64 {
    let bytes = |tokens: u64| kv_values_for_tokens(config, tokens) as f64 * bits_per_value / 8.0;
    let fits = |tokens: u64| bytes(tokens) <= free as f64;
    let (mut low, mut high) = (0u64, 1u64 << 62);
    if fits(high) {
        return u64::MAX;
    }
    // Invariant: fits(low), !fits(high).
    while high - low > 1 {
        let middle = low + (high - low) / 2;
        if fits(middle) {
            low = middle;
        } else {
            high = middle;
        }
    }
    low
}

/// One method's capacity on one GPU for one profile.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CapacityRow {
    pub gpu: String,
    pub method: String,
    pub prompt_tokens: u64,
    pub output_tokens: u64,
    pub kv_bytes_per_request: f64,
    /// Requests whose whole cache (prompt + output) fits at once.
    pub max_concurrent_requests: u64,
}

/// One method on one GPU: the tokens of cache that fit after the weights.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GpuMethodFit {
    pub gpu: String,
    pub method: String,
    pub max_cached_tokens: u64,
}

/// A GPU and what the weights leave of it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GpuBudget {
    pub name: String,
    pub bytes: u64,
    /// Bytes left for the KV cache (0 when the weights do not fit).
    pub free_bytes: u64,
}

/// A method with its cache bytes per token.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MethodCost {
    #[serde(flatten)]
    pub method: Method,
    /// While no sliding window is full.
    pub kv_bytes_per_token: f64,
    /// One request's cache per profile, in [`PROFILES`] order (sliding
    /// layers hold at most their window).
    pub kv_bytes_per_request: Vec<f64>,
}

/// The whole report, in the shape of its JSON (`--json`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CapacityReport {
    pub model: String,
    pub config_file: String,
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub kv_values_per_token: u64,
    /// Counted from the config (`parameter_count`).
    pub parameters: u64,
    pub weights_dtype: WeightsDtype,
    pub weights_bytes: u64,
    pub gpus: Vec<GpuBudget>,
    pub profiles: Vec<Profile>,
    pub methods: Vec<MethodCost>,
    pub fits: Vec<GpuMethodFit>,
    pub rows: Vec<CapacityRow>,
    /// The sweep whose methods these are, if any.
    pub sweep_json: Option<String>,
}

impl CapacityReport {
    pub fn new(
        model: String,
        config_file: &Path,
        config: &LlamaConfig,
        weights_dtype: WeightsDtype,
        gpus: &[GpuMemory],
        methods: Vec<Method>,
        sweep_json: Option<&Path>,
    ) -> Result<Self, CapacityError> {
        let values = kv_values_per_token(config, config_file)?;
        let parameters = parameter_count(config, config_file)?;
        // parameters x bits / 8, rounded up, without forming parameters x bits.
        let size = SizeFormula {
            config_file,
            quantity: "weights' bytes",
            formula: "parameters x bits / 8",
            fields: &[("parameters", parameters)],
        };
        let bits = weights_dtype.bits();
        let weights_bytes = size.sum(&[
            size.product(&[parameters / 8, bits])?,
            (parameters % 8 * bits).div_ceil(8),
        ])?;
        let methods: Vec<MethodCost> = methods
            .into_iter()
            .map(|method| MethodCost {
                kv_bytes_per_token: values as f64 * method.bits_per_value / 8.0,
                kv_bytes_per_request: PROFILES
                    .iter()
                    .map(|profile| {
                        kv_values_for_tokens(config, profile.tokens()) as f64
                            * method.bits_per_value
                            / 8.0
                    })
                    .collect(),
                method,
            })
            .collect();
        let budgets: Vec<GpuBudget> = gpus
            .iter()
            .map(|gpu| GpuBudget {
                name: gpu.name.clone(),
                bytes: gpu.bytes,
                free_bytes: gpu.bytes.saturating_sub(weights_bytes),
            })
            .collect();
        let fits_in = |free: u64, bytes: f64| (free as f64 / bytes).floor() as u64;
        let mut rows = Vec::new();
        let mut fits = Vec::new();
        for gpu in &budgets {
            for cost in &methods {
                fits.push(GpuMethodFit {
                    gpu: gpu.name.clone(),
                    method: cost.method.label.clone(),
                    max_cached_tokens: max_cached_tokens(
                        config,
                        cost.method.bits_per_value,
                        gpu.free_bytes,
                    ),
                });
                for (profile, &per_request) in PROFILES.iter().zip(&cost.kv_bytes_per_request) {
                    rows.push(CapacityRow {
                        gpu: gpu.name.clone(),
                        method: cost.method.label.clone(),
                        prompt_tokens: profile.prompt_tokens,
                        output_tokens: profile.output_tokens,
                        kv_bytes_per_request: per_request,
                        max_concurrent_requests: fits_in(gpu.free_bytes, per_request),
                    });
                }
            }
        }
        Ok(CapacityReport {
            model,
            config_file: config_file.display().to_string(),
            num_layers: config.num_hidden_layers,
            num_kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
            kv_values_per_token: values,
            parameters,
            weights_dtype,
            weights_bytes,
            gpus: budgets,
            profiles: PROFILES.to_vec(),
            methods,
            fits,
            rows,
            sweep_json: sweep_json.map(|p| p.display().to_string()),
        })
    }

    fn row(&self, gpu: &str, method: &str, profile: &Profile) -> &CapacityRow {
        self.rows
            .iter()
            .find(|r| {
                r.gpu == gpu
                    && r.method == method
                    && r.prompt_tokens == profile.prompt_tokens
                    && r.output_tokens == profile.output_tokens
            })
            .expect("a row per gpu, method and profile")
    }

    /// The text report: the model's cache cost per method, then per GPU the
    /// largest batch of each profile.
    pub fn render_text(&self) -> String {
        let gib = |bytes: f64| bytes / 1024f64.powi(3);
        let mib = |bytes: f64| bytes / 1024f64.powi(2);
        let mut out = format!(
            "{}: {} layers x 2 x {} KV heads x {} = {} cached values per token\n\
             weights: {} parameters (counted from the config) x {} bits = {} bytes ({:.2} GiB)\n\n",
            self.model,
            self.num_layers,
            self.num_kv_heads,
            self.head_dim,
            self.kv_values_per_token,
            self.parameters,
            self.weights_dtype.bits(),
            self.weights_bytes,
            gib(self.weights_bytes as f64),
        );
        let profile_names: Vec<String> = self.profiles.iter().map(Profile::name).collect();
        out += &format!("{:<32} {:>10} {:>12}", "method", "bits/value", "KV B/token");
        for name in &profile_names {
            out += &format!(" {:>14}", format!("MiB {name}"));
        }
        out += &format!(" {:>10} {:>10}\n", "delta", "mean KLD");
        for cost in &self.methods {
            out += &format!(
                "{:<32} {:>10.3} {:>12}",
                cost.method.label,
                cost.method.bits_per_value,
                trim_number(cost.kv_bytes_per_token)
            );
            for bytes in &cost.kv_bytes_per_request {
                out += &format!(" {:>14.2}", mib(*bytes));
            }
            let optional =
                |v: Option<f64>, digits: usize| v.map_or("-".into(), |v| format!("{v:+.digits$}"));
            out += &format!(
                " {:>10} {:>10}\n",
                optional(cost.method.delta, 4),
                cost.method
                    .kld_mean
                    .map_or("-".into(), |v| format!("{v:.5}"))
            );
        }
        for gpu in &self.gpus {
            out += &format!(
                "\n{}: {} bytes ({:.2} GiB), {:.2} GiB after the weights; largest batch of concurrent requests\n",
                gpu.name,
                gpu.bytes,
                gib(gpu.bytes as f64),
                gib(gpu.free_bytes as f64)
            );
            out += &format!("{:<32}", "method");
            for name in &profile_names {
                out += &format!(" {name:>11}");
            }
            out += &format!(" {:>14}\n", "cached tokens");
            for cost in &self.methods {
                out += &format!("{:<32}", cost.method.label);
                for profile in &self.profiles {
                    let row = self.row(&gpu.name, &cost.method.label, profile);
                    out += &format!(" {:>11}", row.max_concurrent_requests);
                }
                let fit = self
                    .fits
                    .iter()
                    .find(|f| f.gpu == gpu.name && f.method == cost.method.label)
                    .expect("a fit per gpu and method");
                let tokens = match fit.max_cached_tokens {
                    u64::MAX => "unbounded".to_string(),
                    tokens => tokens.to_string(),
                };
                out += &format!(" {tokens:>14}\n");
            }
        }
        out
    }

    /// Concurrency against bits/value on the first GPU: one line per profile.
    pub fn render_svg(&self) -> String {
        let gpu = &self.gpus[0];
        let mut points = Vec::new();
        let mut lines = Vec::new();
        let mut by_bits: Vec<&MethodCost> = self.methods.iter().collect();
        by_bits.sort_by(|a, b| a.method.bits_per_value.total_cmp(&b.method.bits_per_value));
        for profile in &self.profiles {
            let mut line = Vec::new();
            for (i, cost) in by_bits.iter().enumerate() {
                let row = self.row(&gpu.name, &cost.method.label, profile);
                line.push(points.len());
                points.push(Point {
                    // The profile names its line at the lowest bits, the largest batch.
                    label: if i == 0 {
                        profile.name()
                    } else {
                        String::new()
                    },
                    name: format!("{} {}", cost.method.label, profile.name()),
                    bits_per_value: cost.method.bits_per_value,
                    value: row.max_concurrent_requests as f64,
                    passed: true,
                });
            }
            lines.push(line);
        }
        render_points(
            &points,
            &lines,
            &Chart {
                title: format!(
                    "{}: concurrent requests in {} after {} weights",
                    self.model,
                    gpu.name,
                    self.weights_dtype.name()
                ),
                y_label: "largest batch (log scale)".into(),
                linear: 1.0,
                bound: None,
                line_name: "one profile",
            },
        )
    }
}

impl WeightsDtype {
    fn name(self) -> &'static str {
        match self {
            WeightsDtype::F32 => "f32",
            WeightsDtype::F16 => "f16",
            WeightsDtype::Bf16 => "bf16",
            WeightsDtype::Int8 => "int8",
            WeightsDtype::Int4 => "int4",
        }
    }
}

/// `22528`, `5984.5`: integers without a fraction, others to 0.1 byte.
fn trim_number(value: f64) -> String {
    if value.fract() == 0.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}
