//! The one dispatch over group quantizers: which quantizer a tensor's
//! [`Grid`] selects, how it chooses every group's parameters, what it stores
//! in the payload's levels and codes sections, and its code <-> value
//! mapping. The encoder and decoder call only this; a new quantizer is a
//! file of its own (like `quantizer`, `codebook` or `ecsq`) plus a variant here.

use super::codebook::{self, Codebook};
use super::groups::{GroupGeometry, Plan};
use super::quantizer::{self, CodeRange, GroupMapping};
use super::scales::GroupParams;
use super::scales::ScaleDtype;
use super::EntropyCoder;
use super::{bitpack, ecsq, fp4, fp8, ggml, int8, quanto, CodecError, CodecParams, Grid};

/// NVFP4's levels section: its f32 `k_scale`, little-endian.
const TENSOR_SCALE_LEN: usize = 4;

/// NVFP4's `k_scale`, which must be a positive normal f32 as the encoder writes it.
fn read_tensor_scale(level_bytes: &[u8]) -> Result<f32, CodecError> {
    let bytes: [u8; TENSOR_SCALE_LEN] = level_bytes
        .try_into()
        .map_err(|_| CodecError::CorruptPayload("nvfp4's tensor scale is not 4 bytes"))?;
    let scale = f32::from_le_bytes(bytes);
    if scale.is_normal() && scale > 0.0 {
        Ok(scale)
    } else {
        Err(CodecError::CorruptPayload(
            "nvfp4's tensor scale is not a positive normal number",
        ))
    }
}

/// An engine grid's code <-> value mapping (sparsity is refused for them,
/// so every value of a group has a code).
struct EngineMapping<'a> {
    grid: Grid,
    /// NVFP4's per-tensor `k_scale` (1 for the others).
    tensor_scale: f32,
    /// The quanto grids' arithmetic dtype (the model's).
    model_dtype: ScaleDtype,
    params: &'a GroupParams,
}

impl GroupMapping for EngineMapping<'_> {
    fn codes(&self, group: usize, values: &[f32], _kept: Option<&[bool]>, codes: &mut [u8]) {
        let scale = self.params.scales[group];
        if self.grid.is_fp8() {
            fp8::codes(self.grid, values, scale, codes);
        } else if self.grid == Grid::Int8Trt {
            int8::codes(values, scale, codes);
        } else if self.grid.is_fp4() {
            fp4::codes(self.grid, values, scale, self.tensor_scale, codes);
        } else if self.grid.is_quanto() {
            let bits = self.grid.spec().bits[0];
            let shift = self.params.offsets[group];
            quanto::codes(bits, values, scale, shift, self.model_dtype, codes);
        } else {
            ggml::codes(self.grid, values, codes);
        }
    }

    fn values(&self, group: usize, codes: &[u8], _kept: Option<&[bool]>, out: &mut [f32]) {
        let scale = self.params.scales[group];
        if self.grid.is_fp8() {
            fp8::values(self.grid, codes, scale, out);
        } else if self.grid == Grid::Int8Trt {
            int8::values(codes, scale, out);
        } else if self.grid.is_fp4() {
            fp4::values(self.grid, codes, scale, self.tensor_scale, out);
        } else if self.grid.is_quanto() {
            let shift = self.params.offsets[group];
            quanto::values(codes, scale, shift, self.model_dtype, out);
        } else {
            let min = self.params.offsets.get(group).copied().unwrap_or(0.0);
            ggml::values(self.grid, codes, scale, min, out);
        }
    }
}

/// A tensor's group quantizer, with whatever it shares across groups.
pub(crate) enum GroupQuantizer {
    /// The uniform grids (`sym`, `asym`): a scale (and offset) per group.
    Uniform(CodeRange),
    /// The codebook grids (`lloyd`, `kmeans`): levels times a scale per group.
    Codebook {
        grid: Grid,
        bits: u8,
        codebook: Codebook,
    },
    /// Entropy-coded uniform codes (`ecsq`): one step, an offset per group,
    /// and (when chosen, not read) the codes section the choice coded.
    Ecsq {
        step: f32,
        coded: Option<ecsq::Coded>,
        coder: EntropyCoder,
    },
    /// An inference engine's cache type (`ggml`, `fp8`, `fp4`): its own
    /// scales and codes, and NVFP4's per-tensor `k_scale` (1 for the others;
    /// NVFP4 stores it as the levels section).
    Engine {
        grid: Grid,
        tensor_scale: f32,
        model_dtype: ScaleDtype,
    },
}

impl GroupQuantizer {
    /// Fits the quantizer to `grouped` (values in group order, `kept` the
    /// values a sparsity mask keeps, `plan` the tensor's): every group's
    /// stored parameters, and for a codebook its levels.
    pub fn choose(
        params: &CodecParams,
        grouped: &[f32],
        kept: Option<&[bool]>,
        plan: &Plan,
    ) -> (GroupParams, Self) {
        let geometry = &plan.geometry;
        match params.grid {
            Grid::Symmetric | Grid::Asymmetric => {
                let range = CodeRange::of(params);
                let group_params =
                    quantizer::group_params(grouped, kept, geometry, range, params.fit);
                (group_params, GroupQuantizer::Uniform(range))
            }
            Grid::Lloyd | Grid::Kmeans => {
                let (group_params, codebook) = codebook::choose(
                    params.grid,
                    params.bits,
                    params.fit,
                    grouped,
                    kept,
                    geometry,
                );
                let quantizer = GroupQuantizer::Codebook {
                    grid: params.grid,
                    bits: params.bits,
                    codebook,
                };
                (group_params, quantizer)
            }
            Grid::Ecsq => {
                // validate() refuses sparsity with ecsq: nothing is dropped.
                let target = match params.rate {
                    Some(rate) => ecsq::Target::PayloadBits {
                        budget: rate * plan.total_count() as f64,
                        fixed_bits: 16.0 * plan.kept_token_count() as f64,
                    },
                    None => ecsq::Target::Gaussian(f64::from(params.bits)),
                };
                let choice = ecsq::choose(target, grouped, geometry);
                let quantizer = GroupQuantizer::Ecsq {
                    step: choice.step,
                    coded: Some(choice.coded),
                    coder: EntropyCoder::Rans,
                };
                (choice.params, quantizer)
            }
            grid => {
                let model_dtype = params.model_dtype.unwrap_or(ScaleDtype::F32);
                let (group_params, tensor_scale) = if grid.is_fp8() {
                    let unit = params.unit_scale;
                    (fp8::group_params(grid, grouped, geometry, unit), 1.0)
                } else if grid == Grid::Int8Trt {
                    (int8::group_params(grouped, geometry), 1.0)
                } else if grid.is_fp4() {
                    fp4::group_params(grid, grouped, geometry, params.unit_scale)
                } else if grid.is_quanto() {
                    let bits = grid.spec().bits[0];
                    let dtype = model_dtype;
                    (quanto::group_params(bits, grouped, geometry, dtype), 1.0)
                } else {
                    (ggml::group_params(grid, grouped, geometry), 1.0)
                };
                let quantizer = GroupQuantizer::Engine {
                    grid,
                    tensor_scale,
                    model_dtype,
                };
                (group_params, quantizer)
            }
        }
    }

    /// The quantizer a payload was written with, from its levels section
    /// and its layout's entropy coder.
    pub fn read(
        params: &CodecParams,
        level_bytes: &[u8],
        coder: Option<EntropyCoder>,
    ) -> Result<Self, CodecError> {
        Ok(match params.grid {
            Grid::Symmetric | Grid::Asymmetric => GroupQuantizer::Uniform(CodeRange::of(params)),
            Grid::Lloyd | Grid::Kmeans => GroupQuantizer::Codebook {
                grid: params.grid,
                bits: params.bits,
                codebook: codebook::read_levels(params.grid, params.bits, level_bytes)?,
            },
            Grid::Ecsq => GroupQuantizer::Ecsq {
                step: ecsq::read_levels(level_bytes)?,
                coded: None,
                coder: coder.unwrap_or_default(),
            },
            grid => GroupQuantizer::Engine {
                grid,
                tensor_scale: if grid == Grid::Nvfp4 {
                    read_tensor_scale(level_bytes)?
                } else {
                    1.0
                },
                model_dtype: params.model_dtype.unwrap_or(ScaleDtype::F32),
            },
        })
    }

    /// Byte length of the levels section a tensor of `params` stores.
    pub fn levels_len(params: &CodecParams) -> usize {
        match params.grid {
            Grid::Symmetric | Grid::Asymmetric => 0,
            Grid::Lloyd | Grid::Kmeans => codebook::levels_section_len(params.grid, params.bits),
            Grid::Ecsq => ecsq::LEVELS_LEN,
            Grid::Nvfp4 => TENSOR_SCALE_LEN,
            _ => 0,
        }
    }

    /// Appends the levels section (empty unless the quantizer stores one).
    pub fn write_levels(&self, payload: &mut Vec<u8>) {
        match self {
            GroupQuantizer::Uniform(_) => {}
            GroupQuantizer::Engine {
                grid, tensor_scale, ..
            } => {
                if *grid == Grid::Nvfp4 {
                    payload.extend_from_slice(&tensor_scale.to_le_bytes());
                }
            }
            GroupQuantizer::Codebook { grid, codebook, .. } => {
                codebook::write_levels(*grid, codebook, payload)
            }
            GroupQuantizer::Ecsq { step, .. } => ecsq::write_levels(*step, payload),
        }
    }

    /// The coder of an entropy-coded codes section, whose length depends
    /// on the values (and is stored in the layout) rather than on the shape
    /// alone; `None` for fixed-width codes.
    pub fn entropy_coder(&self) -> Option<EntropyCoder> {
        match self {
            GroupQuantizer::Ecsq { coder, .. } => Some(*coder),
            _ => None,
        }
    }

    /// The codes section of all kept values, group by group: packed
    /// fixed-width codes, or the range-coded stream.
    pub fn code_section(
        &mut self,
        group_params: &GroupParams,
        grouped: &[f32],
        kept: Option<&[bool]>,
        geometry: &GroupGeometry,
    ) -> Vec<u8> {
        match self {
            GroupQuantizer::Ecsq { .. } => self.ecsq_coded(group_params, grouped, geometry).section,
            _ => self.with_mapping(group_params, |mapping| {
                let codes = quantizer::quantize(grouped, kept, geometry, mapping);
                bitpack::packed(&codes, self.code_bits())
            }),
        }
    }

    /// [`GroupQuantizer::code_section`], with every value's reconstruction
    /// in group order written into `out` (dropped values 0), as
    /// [`GroupQuantizer::dequantize_section`] makes it from the section.
    pub fn code_section_reconstructed(
        &mut self,
        group_params: &GroupParams,
        grouped: &[f32],
        kept: Option<&[bool]>,
        geometry: &GroupGeometry,
        out: &mut [f32],
    ) -> Result<Vec<u8>, CodecError> {
        if let GroupQuantizer::Ecsq { step, .. } = *self {
            let coded = self.ecsq_coded(group_params, grouped, geometry);
            ecsq::reconstruct(group_params, step, &coded.codes, geometry, out)?;
            return Ok(coded.section);
        }
        Ok(self.with_mapping(group_params, |mapping| {
            let codes = quantizer::quantize_reconstructed(grouped, kept, geometry, mapping, out);
            bitpack::packed(&codes, self.code_bits())
        }))
    }

    /// The codes and section the step search made, moved out once (coded
    /// afresh for a quantizer that was not chosen).
    fn ecsq_coded(
        &mut self,
        group_params: &GroupParams,
        grouped: &[f32],
        geometry: &GroupGeometry,
    ) -> ecsq::Coded {
        let GroupQuantizer::Ecsq { step, coded, .. } = self else {
            unreachable!("ecsq_coded of an ecsq quantizer only")
        };
        coded
            .take()
            .unwrap_or_else(|| ecsq::encode_codes(group_params, *step, grouped, geometry))
    }

    /// Reconstructs all values in group order from the codes section, which
    /// holds `code_count` codes.
    pub fn dequantize_section(
        &self,
        group_params: &GroupParams,
        code_bytes: &[u8],
        code_count: usize,
        kept: Option<&[bool]>,
        geometry: &GroupGeometry,
        out: &mut [f32],
    ) -> Result<(), CodecError> {
        if let GroupQuantizer::Ecsq { step, coder, .. } = self {
            return ecsq::decode_codes(*coder, group_params, *step, code_bytes, geometry, out);
        }
        let mut codes = vec![0u8; code_count];
        bitpack::unpack(code_bytes, self.code_bits(), &mut codes);
        self.with_mapping(group_params, |mapping| {
            quantizer::dequantize(&codes, kept, geometry, mapping, out)
        });
        Ok(())
    }

    /// Width of a fixed-width code.
    fn code_bits(&self) -> u8 {
        match self {
            GroupQuantizer::Uniform(range) => range.bits,
            GroupQuantizer::Codebook { bits, .. } => *bits,
            GroupQuantizer::Engine { grid, .. } => grid.spec().bits[0],
            GroupQuantizer::Ecsq { .. } => unreachable!("ecsq codes are not fixed-width"),
        }
    }

    /// Runs `body` with the fixed-width quantizer's code <-> value mapping.
    fn with_mapping<R>(
        &self,
        group_params: &GroupParams,
        body: impl FnOnce(&dyn GroupMapping) -> R,
    ) -> R {
        match self {
            GroupQuantizer::Uniform(range) => body(&quantizer::Uniform {
                range: *range,
                params: group_params,
            }),
            GroupQuantizer::Codebook { codebook, .. } => body(&codebook::Scaled {
                codebook,
                scales: &group_params.scales,
            }),
            GroupQuantizer::Engine {
                grid,
                tensor_scale,
                model_dtype,
            } => body(&EngineMapping {
                grid: *grid,
                tensor_scale: *tensor_scale,
                model_dtype: *model_dtype,
                params: group_params,
            }),
            GroupQuantizer::Ecsq { .. } => unreachable!("ecsq codes are not fixed-width"),
        }
    }
}
