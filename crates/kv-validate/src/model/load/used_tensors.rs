//! A checkpoint tensor the model does not read is an error, not silence: it
//! means the checkpoint describes math the decoder would leave out (a bias, a
//! norm, a RoPE table). Every loader builds the model through
//! [`load_every_tensor`], which records the names the model asks for.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use super::LoadError;
use crate::model::{Llama, LlamaConfig};

/// Buffers older `transformers` saved beside the weights: the plain RoPE
/// frequencies it recomputes from the config whatever the file says.
const RECOMPUTED_BUFFER: &str = ".rotary_emb.inv_freq";

/// A backend that remembers which tensors were read.
struct Recording<'a> {
    inner: Box<dyn SimpleBackend + 'a>,
    used: Arc<Mutex<BTreeSet<String>>>,
}

impl Recording<'_> {
    fn record(&self, name: &str) {
        if let Ok(mut used) = self.used.lock() {
            used.insert(name.to_string());
        }
    }
}

impl SimpleBackend for Recording<'_> {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.record(name);
        self.inner.get(shape, name, init, dtype, device)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.record(name);
        self.inner.get_unchecked(name, dtype, device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// Builds the model from `backend`, whose tensors are `names`, and refuses
/// the checkpoint if the model left one of them unread.
pub(super) fn load_every_tensor<'a>(
    backend: Box<dyn SimpleBackend + 'a>,
    names: impl IntoIterator<Item = String>,
    config: &LlamaConfig,
    dtype: DType,
    device: &Device,
    path: &Path,
) -> Result<Llama, LoadError> {
    let used = Arc::new(Mutex::new(BTreeSet::new()));
    let recording = Recording {
        inner: backend,
        used: Arc::clone(&used),
    };
    let vb = VarBuilder::from_backend(Box::new(recording), dtype, device.clone());
    let model = Llama::load(vb, config).map_err(|source| LoadError::Weights {
        path: path.to_path_buf(),
        source,
    })?;
    let used = used.lock().map(|used| used.clone()).unwrap_or_default();
    let mut unused: Vec<String> = names
        .into_iter()
        .filter(|name| !used.contains(name) && !name.ends_with(RECOMPUTED_BUFFER))
        .collect();
    unused.sort();
    match unused.first() {
        None => Ok(model),
        Some(tensor) => Err(LoadError::UnusedTensor {
            path: path.to_path_buf(),
            tensor: tensor.clone(),
            more: unused.len() - 1,
            model_type: config.architecture.family.model_type(),
        }),
    }
}
