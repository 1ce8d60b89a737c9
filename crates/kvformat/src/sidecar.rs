//! The `.metadata.json` sidecar the Python `load_kv_cache()` expects beside
//! every cache (CONTRACT §1): `kv_cache.safetensors` -> `kv_cache.metadata.json`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::dtype::CacheDtype;
use crate::error::{Error, Result};
use crate::preset::{layer_index, tensor_name, TensorKind};
use crate::tensor_file::TensorFile;

/// Largest sidecar we read: it is six small fields, anything bigger is hostile.
const MAX_SIDECAR_BYTES: u64 = 1 << 20;

/// Shape and origin of a KV cache, as the original Python scripts write it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sidecar {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    /// Positions of the longest layer: the context's, unless every layer
    /// slides. A sliding-window layer may hold fewer, its last ones, as an
    /// engine keeps them (Mistral, Gemma): its key and value are
    /// `[batch, heads, s, head_dim]` with `s <= seq_len`, the same `s` for both.
    pub seq_len: usize,
    pub head_dim: usize,
    /// Torch spelling: `float32`, `float16` or `bfloat16`.
    pub dtype: String,
    pub model_name: String,
}

/// The sidecar path of a cache: its suffix replaced by `.metadata.json`.
pub fn sidecar_path(cache: &Path) -> PathBuf {
    cache.with_extension("metadata.json")
}

impl Sidecar {
    pub fn read(path: &Path) -> Result<Self> {
        let error = |problem: String| Error::Sidecar {
            path: path.into(),
            problem,
        };
        // The length a file claims is no bound (a device says 0): at most the
        // cap is read, from a regular file only.
        let Some(text) = crate::input::read_capped(path, MAX_SIDECAR_BYTES)? else {
            return Err(error(format!(
                "more than {MAX_SIDECAR_BYTES} bytes is too large for a sidecar"
            )));
        };
        let sidecar: Sidecar = serde_json::from_slice(&text).map_err(|e| error(e.to_string()))?;
        if CacheDtype::from_torch_name(&sidecar.dtype).is_none() {
            return Err(error(format!(
                "dtype {:?} is not float32, float16 or bfloat16",
                sidecar.dtype
            )));
        }
        Ok(sidecar)
    }

    /// Reads the sidecar beside `cache`, `None` when there is none.
    pub fn read_beside(cache: &Path) -> Result<Option<Self>> {
        let path = sidecar_path(cache);
        if path.exists() {
            Sidecar::read(&path).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Writes it (2-space indented JSON) atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        crate::atomic::commit(vec![self.stage(path)?])
    }

    /// The file's bytes: pretty JSON, newline at the end.
    pub fn to_json(&self) -> Vec<u8> {
        let mut json = serde_json::to_vec_pretty(self).expect("sidecar serializes");
        json.push(b'\n');
        json
    }

    /// [`Self::write`] up to the commit: the caller commits it with its cache.
    pub fn stage(&self, path: &Path) -> Result<crate::atomic::Staged> {
        let json = self.to_json();
        crate::atomic::stage(path, |w| {
            std::io::Write::write_all(w, &json).map_err(crate::atomic::write_error(path))
        })
    }

    /// Derives the sidecar of a cache from its tensors: `layer_{i}_key` /
    /// `layer_{i}_value` of shape `[batch, heads, seq, head_dim]`. `None` when
    /// the file does not follow that layout.
    pub fn infer(tensors: &[(String, CacheDtype, Vec<usize>)], model_name: &str) -> Option<Self> {
        let (_, dtype, shape) = tensors
            .iter()
            .find(|(name, _, _)| *name == tensor_name(0, TensorKind::Key))?;
        let [_, heads, _, head_dim] = shape[..] else {
            return None;
        };
        // The context's length: the longest layer (a first layer that slides holds fewer).
        let seq = tensors
            .iter()
            .filter(|(name, _, _)| layer_index(name).is_some())
            .filter_map(|(_, _, shape)| match shape[..] {
                [_, _, seq, _] => Some(seq),
                _ => None,
            })
            .max()?;
        let names: std::collections::HashSet<&str> =
            tensors.iter().map(|(n, _, _)| n.as_str()).collect();
        let num_layers = (0..)
            .take_while(|&i| names.contains(tensor_name(i, TensorKind::Key).as_str()))
            .count();
        let sidecar = Sidecar {
            num_layers,
            num_kv_heads: heads,
            seq_len: seq,
            head_dim,
            dtype: dtype.torch_name().to_string(),
            model_name: model_name.to_string(),
        };
        sidecar.check(tensors).is_ok().then_some(sidecar)
    }

    /// The first disagreement between this sidecar and the tensors, as text,
    /// both ways: every layer it describes is there with its shape and dtype,
    /// and no `layer_{i}_key`/`_value` lies beyond its `num_layers`.
    /// Looks names up in a map: a scan per layer made 16384-tensor files take seconds.
    fn check(
        &self,
        tensors: &[(String, CacheDtype, Vec<usize>)],
    ) -> std::result::Result<(), String> {
        if let Some((name, _, _)) = tensors
            .iter()
            .find(|(name, _, _)| layer_index(name).is_some_and(|i| i >= self.num_layers))
        {
            return Err(format!(
                "{name:?} is beyond the sidecar's num_layers = {}",
                self.num_layers
            ));
        }
        let by_name: std::collections::HashMap<&str, (&CacheDtype, &Vec<usize>)> = tensors
            .iter()
            .map(|(n, dtype, shape)| (n.as_str(), (dtype, shape)))
            .collect();
        let mut longest = 0;
        for layer in 0..self.num_layers {
            let mut layer_positions = None;
            for kind in TensorKind::BOTH {
                let name = tensor_name(layer, kind);
                let Some((dtype, shape)) = by_name.get(name.as_str()) else {
                    return Err(format!(
                        "{name:?} is missing (num_layers = {})",
                        self.num_layers
                    ));
                };
                let fits = matches!(shape[..], [_, h, s, d] if h == self.num_kv_heads && s <= self.seq_len && d == self.head_dim);
                if !fits {
                    return Err(format!(
                        "{name:?} has shape {shape:?}, sidecar says [batch, {}, {}, {}] \
                         (a sliding-window layer may hold fewer positions, never more)",
                        self.num_kv_heads, self.seq_len, self.head_dim
                    ));
                }
                longest = longest.max(shape[2]);
                match layer_positions {
                    None => layer_positions = Some(shape[2]),
                    Some(key_positions) if key_positions != shape[2] => {
                        return Err(format!(
                            "{name:?} holds {} positions, its layer's key {key_positions}",
                            shape[2]
                        ))
                    }
                    Some(_) => {}
                }
                if dtype.torch_name() != self.dtype {
                    return Err(format!(
                        "{name:?} is {}, sidecar says {}",
                        dtype.torch_name(),
                        self.dtype
                    ));
                }
            }
        }
        if self.num_layers > 0 && longest != self.seq_len {
            return Err(format!(
                "no layer holds the sidecar's seq_len = {} positions (the longest holds {longest})",
                self.seq_len
            ));
        }
        Ok(())
    }
}

/// Fails when the sidecar disagrees with the cache file it describes
/// (missing or extra layers, other shape or dtype), naming the first disagreement.
pub fn validate_against_sidecar(
    cache: &TensorFile,
    sidecar: &Sidecar,
    sidecar_path: &Path,
) -> Result<()> {
    validate_tensors_against_sidecar(&cache_tensors(cache), cache.path(), sidecar, sidecar_path)
}

/// `(name, dtype, shape)` of the file's tensors of a cache dtype.
fn cache_tensors(cache: &TensorFile) -> Vec<(String, CacheDtype, Vec<usize>)> {
    cache
        .tensors()
        .iter()
        .filter_map(|t| {
            Some((
                t.name.clone(),
                CacheDtype::from_safetensors(t.dtype)?,
                t.shape.clone(),
            ))
        })
        .collect()
}

/// [`validate_against_sidecar`] for tensors described rather than opened
/// (`(name, dtype, shape)`), e.g. the cache `-decompress` is about to restore.
pub fn validate_tensors_against_sidecar(
    tensors: &[(String, CacheDtype, Vec<usize>)],
    cache_path: &Path,
    sidecar: &Sidecar,
    sidecar_path: &Path,
) -> Result<()> {
    sidecar.check(tensors).map_err(|problem| Error::Sidecar {
        path: sidecar_path.into(),
        problem: format!("disagrees with {}: {problem}", cache_path.display()),
    })
}

/// Fails unless the file at `path`, if any, may be replaced or removed as
/// the old sidecar of `output` (a run writes `output`'s sidecar there, or
/// removes the old one when it has none, so the pair left is all from the
/// run): it must parse as a sidecar and describe the cache or packed file
/// now at `output`. Anything else there is the user's file: the run is
/// refused, saying why.
pub fn ensure_old_sidecar_replaceable(path: &Path, output: &Path) -> Result<()> {
    if !std::fs::symlink_metadata(path).is_ok_and(|meta| meta.is_file()) {
        return Ok(()); // Nothing a removal would touch.
    }
    let refuse = |reason: String| Error::ForeignSidecar {
        path: path.into(),
        output: output.into(),
        reason,
    };
    let sidecar = Sidecar::read(path)
        .map_err(|error| refuse(format!("is not a kv-compress sidecar ({error})")))?;
    let tensors = described_tensors(output).map_err(|error| {
        refuse(format!(
            "is a sidecar, but of no cache at {} ({error})",
            output.display()
        ))
    })?;
    sidecar.check(&tensors).map_err(|problem| {
        refuse(format!(
            "is a sidecar, but not of the file at {}: {problem}",
            output.display()
        ))
    })
}

/// The tensors of the cache `path` holds, or restores to when packed.
fn described_tensors(path: &Path) -> Result<Vec<(String, CacheDtype, Vec<usize>)>> {
    match crate::packed::PackedFile::open(path) {
        Ok(packed) => Ok(packed
            .manifest()
            .tensors
            .iter()
            .map(|(name, t)| (name.clone(), t.dtype, t.shape.clone()))
            .collect()),
        Err(Error::NotPacked { .. }) => Ok(cache_tensors(&TensorFile::open(path)?)),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sidecar_path_replaces_the_suffix() {
        assert_eq!(
            sidecar_path(Path::new("/a/kv_cache.safetensors")),
            PathBuf::from("/a/kv_cache.metadata.json")
        );
    }

    /// Gemma's first layer slides: it holds the window's 15 positions while
    /// the global layer holds all 40. The sidecar gives the context's 40; a
    /// layer longer than that, or a value of another length than its key, is refused.
    #[test]
    fn a_sliding_layer_may_hold_fewer_positions_than_the_context() {
        let cache = |sliding: usize, value: usize, global: usize| -> Vec<_> {
            [
                ("layer_0_key", sliding),
                ("layer_0_value", value),
                ("layer_1_key", global),
                ("layer_1_value", global),
            ]
            .iter()
            .map(|(n, seq)| (n.to_string(), CacheDtype::F32, vec![1, 2, *seq, 16]))
            .collect()
        };
        let sidecar = Sidecar::infer(&cache(15, 15, 40), "gemma").unwrap();
        assert_eq!((sidecar.num_layers, sidecar.seq_len), (2, 40));
        assert!(sidecar.check(&cache(15, 15, 40)).is_ok());
        assert!(sidecar.check(&cache(40, 40, 40)).is_ok());
        let longer = sidecar.check(&cache(41, 41, 40)).unwrap_err();
        assert!(
            longer.contains("layer_0_key") && longer.contains("never more"),
            "{longer}"
        );
        let mismatched = sidecar.check(&cache(15, 14, 40)).unwrap_err();
        assert!(
            mismatched.contains("\"layer_0_value\" holds 14 positions, its layer's key 15"),
            "{mismatched}"
        );
        assert_eq!(Sidecar::infer(&cache(15, 14, 40), "gemma"), None);
    }

    #[test]
    fn infer_and_check_agree_on_a_two_layer_cache() {
        let shape = vec![1, 4, 16, 64];
        let tensors: Vec<_> = [
            "layer_0_key",
            "layer_0_value",
            "layer_1_key",
            "layer_1_value",
        ]
        .iter()
        .map(|n| (n.to_string(), CacheDtype::F16, shape.clone()))
        .collect();
        let sidecar = Sidecar::infer(&tensors, "m").unwrap();
        assert_eq!(
            sidecar,
            Sidecar {
                num_layers: 2,
                num_kv_heads: 4,
                seq_len: 16,
                head_dim: 64,
                dtype: "float16".into(),
                model_name: "m".into()
            }
        );
        let wrong = Sidecar {
            seq_len: 17,
            ..sidecar.clone()
        };
        assert!(wrong.check(&tensors).unwrap_err().contains(
            "no layer holds the sidecar's seq_len = 17 positions (the longest holds 16)"
        ));
        // The check is two-way: a sidecar describing fewer layers than the file holds is wrong too.
        for num_layers in [0, 1] {
            let fewer = Sidecar {
                num_layers,
                ..sidecar.clone()
            };
            let problem = fewer.check(&tensors).unwrap_err();
            assert!(
                problem.contains(&format!(
                    "\"layer_{num_layers}_key\" is beyond the sidecar's num_layers = {num_layers}"
                )),
                "{problem}"
            );
        }
    }
}
