"""Writes the small deterministic KV cache the golden packed files were made from.

Run once (python3 make_input.py) with numpy and safetensors; the output is
committed, so the test never runs this. Keys get a few large channels (the
outlier channels of real post-RoPE keys), values are plain Gaussian.
"""

import json

import numpy as np
from safetensors.numpy import save_file

rng = np.random.default_rng(20261201)
layers, heads, seq, head_dim = 2, 2, 24, 32
tensors = {}
for layer in range(layers):
    channel_scale = np.ones(head_dim, dtype=np.float32)
    channel_scale[[3, 17]] = 8.0
    keys = rng.standard_normal((1, heads, seq, head_dim)).astype(np.float32) * channel_scale
    values = rng.standard_normal((1, heads, seq, head_dim)).astype(np.float32) * 0.5
    tensors[f"layer_{layer}_key"] = keys.astype(np.float16)
    tensors[f"layer_{layer}_value"] = values.astype(np.float16)
save_file(tensors, "kv_cache.safetensors", metadata={"model_name": "golden"})
with open("kv_cache.metadata.json", "w") as f:
    json.dump({"num_layers": layers, "num_kv_heads": heads, "seq_len": seq,
               "head_dim": head_dim, "dtype": "float16", "model_name": "golden"}, f)
