//! The grids and what each supports, one row per grid in [`GRIDS`]: the
//! checks, the payload layout, the sparse forms, the fast path and the
//! command line ask a grid's [`GridSpec`] instead of matching on [`Grid`].
//! Only the seam (`group_quantizer`) and each grid's own quantizer file
//! branch on the grid, for its math. A new grid is a variant, a row here
//! and its quantizer behind the seam.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The code widths every uniform grid supports: 5 and 6 bits give a
/// per-layer allocation steps between 4 and 8 (kv-validate's `allocate`).
pub const SUPPORTED_BITS: [u8; 6] = [2, 3, 4, 5, 6, 8];

/// The widths of the codebook grids: their Gaussian levels are tabled for these.
const CODEBOOK_BITS: [u8; 3] = [2, 3, 4];

/// Quantization grid of a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Grid {
    /// `scale = max|x| / qmax`, codes in `[-2^(b-1), 2^(b-1)-1]` (ADR-002 for b = 4).
    Symmetric,
    /// `scale = (max - min) / (2^b - 1)` plus an offset, codes in `[0, 2^b - 1]`.
    Asymmetric,
    /// Codebook: the Lloyd-Max levels of the unit Gaussian times the group's
    /// RMS (for rotated values; `codebook.rs`). 2, 3 or 4 bits.
    Lloyd,
    /// Codebook: levels fitted to the tensor by k-means, stored in FP16,
    /// times the group's RMS. 2, 3 or 4 bits.
    Kmeans,
    /// Entropy-coded uniform quantization (`ecsq.rs`): one step per tensor,
    /// an offset (the mean) per group, codes range coded; `bits` sets the
    /// step, and the stored bits per value come out near it.
    Ecsq,
}

/// What one grid is and supports.
#[derive(Debug, PartialEq)]
pub struct GridSpec {
    pub grid: Grid,
    /// Its `-grid` spelling.
    pub flag: &'static str,
    /// The code widths it takes.
    pub bits: &'static [u8],
    /// Per-group payload sections: a scale, an offset.
    pub scales: bool,
    pub offsets: bool,
    /// Whether code 0 decodes to exactly 0, so dropped values can be coded
    /// in place (the dense sparse form).
    pub exact_zero: bool,
    /// Whether the codes are entropy coded: the codes section's length is
    /// then stored in the layout (`coded_bytes`), not given by the shape.
    pub entropy_coded: bool,
    /// Whether it takes `sparsity` and `outliers` (values dropped or kept
    /// beside the codes, which a grid that never clips does not need).
    pub sparsity: bool,
    pub outliers: bool,
    /// Whether a `rate` (bits per value) sizes its step.
    pub rate: bool,
    /// Whether the fused one-pass path (`fused.rs`, ADR-002's) applies when
    /// every value is coded.
    pub fused_fast_path: bool,
}

/// Every grid, in the order of [`Grid`]'s variants.
pub const GRIDS: [GridSpec; 5] = [
    GridSpec {
        grid: Grid::Symmetric,
        flag: "sym",
        bits: &SUPPORTED_BITS,
        scales: true,
        offsets: false,
        exact_zero: true,
        entropy_coded: false,
        sparsity: true,
        outliers: true,
        rate: false,
        fused_fast_path: true,
    },
    GridSpec {
        grid: Grid::Asymmetric,
        flag: "asym",
        bits: &SUPPORTED_BITS,
        scales: true,
        offsets: true,
        exact_zero: false,
        entropy_coded: false,
        sparsity: true,
        outliers: true,
        rate: false,
        fused_fast_path: false,
    },
    GridSpec {
        grid: Grid::Lloyd,
        flag: "lloyd",
        bits: &CODEBOOK_BITS,
        scales: true,
        offsets: false,
        exact_zero: false,
        entropy_coded: false,
        sparsity: true,
        outliers: true,
        rate: false,
        fused_fast_path: false,
    },
    GridSpec {
        grid: Grid::Kmeans,
        flag: "kmeans",
        bits: &CODEBOOK_BITS,
        scales: true,
        offsets: false,
        exact_zero: false,
        entropy_coded: false,
        sparsity: true,
        outliers: true,
        rate: false,
        fused_fast_path: false,
    },
    GridSpec {
        grid: Grid::Ecsq,
        flag: "ecsq",
        bits: &SUPPORTED_BITS,
        scales: false,
        offsets: true,
        exact_zero: false,
        entropy_coded: true,
        sparsity: false,
        outliers: false,
        rate: true,
        fused_fast_path: false,
    },
];

impl Grid {
    /// This grid's row of [`GRIDS`].
    pub fn spec(self) -> &'static GridSpec {
        &GRIDS[self as usize]
    }

    /// The grid spelled `flag` on the command line (`sym`, `asym`, ...).
    pub fn from_flag(flag: &str) -> Option<Grid> {
        GRIDS
            .iter()
            .find(|spec| spec.flag == flag)
            .map(|spec| spec.grid)
    }
}

impl fmt::Display for Grid {
    /// Its `-grid` spelling.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.spec().flag)
    }
}

/// `2, 3 or 4`: a list of widths as the messages spell it.
pub fn spoken_list<T: fmt::Display>(items: &[T]) -> String {
    match items.split_last() {
        None => String::new(),
        Some((last, [])) => last.to_string(),
        Some((last, rest)) => {
            let rest: Vec<String> = rest.iter().map(T::to_string).collect();
            format!("{} or {last}", rest.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_sits_at_its_grids_index_and_has_its_own_flag() {
        for (index, spec) in GRIDS.iter().enumerate() {
            assert_eq!(spec.grid as usize, index, "{spec:?}");
            assert_eq!(Grid::from_flag(spec.flag), Some(spec.grid));
            assert_eq!(spec.grid.to_string(), spec.flag);
        }
        assert_eq!(Grid::from_flag("symmetric"), None);
    }

    #[test]
    fn widths_are_spoken_as_the_messages_spell_them() {
        assert_eq!(spoken_list(&CODEBOOK_BITS), "2, 3 or 4");
        assert_eq!(spoken_list(&SUPPORTED_BITS), "2, 3, 4, 5, 6 or 8");
        assert_eq!(spoken_list(&[8]), "8");
    }
}
