//! The one dispatch over group quantizers: which quantizer a tensor's
//! [`Grid`] selects, how it chooses every group's parameters, what it stores
//! in the payload's levels section, and its code <-> value mapping. The
//! encoder and decoder call only this; a new quantizer is a file of its own
//! (like `quantizer` or `codebook`) plus a variant here.

use super::codebook::{self, Codebook};
use super::groups::GroupGeometry;
use super::quantizer::{self, CodeRange};
use super::scales::GroupParams;
use super::{CodecError, CodecParams, Grid};

/// A tensor's group quantizer, with whatever it shares across groups.
pub(crate) enum GroupQuantizer {
    /// The uniform grids (`sym`, `asym`): a scale (and offset) per group.
    Uniform(CodeRange),
    /// The codebook grids (`lloyd`, `kmeans`): levels times a scale per group.
    Codebook { grid: Grid, codebook: Codebook },
}

impl GroupQuantizer {
    /// Fits the quantizer to `grouped` (values in group order, `kept` the
    /// values a sparsity mask keeps): every group's stored parameters, and
    /// for a codebook its levels.
    pub fn choose(
        params: &CodecParams,
        grouped: &[f32],
        kept: Option<&[bool]>,
        geometry: &GroupGeometry,
    ) -> (GroupParams, Self) {
        match params.grid {
            Grid::Symmetric | Grid::Asymmetric => {
                let range = params.code_range();
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
                let grid = params.grid;
                (group_params, GroupQuantizer::Codebook { grid, codebook })
            }
        }
    }

    /// The quantizer a payload was written with, from its levels section.
    pub fn read(params: &CodecParams, level_bytes: &[u8]) -> Result<Self, CodecError> {
        Ok(match params.grid {
            Grid::Symmetric | Grid::Asymmetric => GroupQuantizer::Uniform(params.code_range()),
            Grid::Lloyd | Grid::Kmeans => GroupQuantizer::Codebook {
                grid: params.grid,
                codebook: codebook::read_levels(params.grid, params.bits, level_bytes)?,
            },
        })
    }

    /// Appends the levels section (empty unless the levels were fitted).
    pub fn write_levels(&self, payload: &mut Vec<u8>) {
        if let GroupQuantizer::Codebook { grid, codebook } = self {
            codebook::write_levels(*grid, codebook, payload);
        }
    }

    /// Unsigned codes of all kept values, group by group.
    pub fn quantize(
        &self,
        group_params: &GroupParams,
        grouped: &[f32],
        kept: Option<&[bool]>,
        geometry: &GroupGeometry,
    ) -> Vec<u8> {
        match self {
            GroupQuantizer::Uniform(range) => {
                let mapping = quantizer::Uniform {
                    range: *range,
                    params: group_params,
                };
                quantizer::quantize(grouped, kept, geometry, &mapping)
            }
            GroupQuantizer::Codebook { codebook, .. } => {
                let mapping = codebook::Scaled {
                    codebook,
                    scales: &group_params.scales,
                };
                quantizer::quantize(grouped, kept, geometry, &mapping)
            }
        }
    }

    /// Reconstructs all values in group order from one code per kept value.
    pub fn dequantize(
        &self,
        group_params: &GroupParams,
        codes: &[u8],
        kept: Option<&[bool]>,
        geometry: &GroupGeometry,
        out: &mut [f32],
    ) {
        match self {
            GroupQuantizer::Uniform(range) => {
                let mapping = quantizer::Uniform {
                    range: *range,
                    params: group_params,
                };
                quantizer::dequantize(codes, kept, geometry, &mapping, out);
            }
            GroupQuantizer::Codebook { codebook, .. } => {
                let mapping = codebook::Scaled {
                    codebook,
                    scales: &group_params.scales,
                };
                quantizer::dequantize(codes, kept, geometry, &mapping, out);
            }
        }
    }
}
