"""Writes testdata/engines/engines.safetensors: inputs and the reference
outputs of the inference engines' KV-cache formats, from independent
implementations, for crates/kvformat/tests/engine_fixtures.rs to check
kv-compress's engine grids against bit for bit.

- llama.cpp q8_0, q4_0, q4_1, q5_0, q5_1: gguf-py's gguf.quants.quantize and
  dequantize (numpy ports of ggml's quantize_row_*_ref), blocks of 32 along
  head_dim. Stored per type: d (and m) as f16 bits, the codes (one u8 per
  value, the engine's: q8_0's int8 byte, q4_0's 0..15, ...) and the values.
- llama.cpp iq4_nl: gguf-py has no IQ4_NL quantizer (only dequantize), so
  `iq4_nl_reference` below is a numpy port of ggml-quants.c's
  quantize_row_iq4_nl_ref (quantize_row_iq4_nl_impl with ntry = -1, no
  importance weights), f32 scalar arithmetic in ggml's order; its values
  are checked here against gguf-py's dequantize of the packed blocks.
- llama.cpp's attention rotation (PR #21038, on by default for quantized
  caches): `llama_hadamard` below, a numpy port of ggml's
  ggml_compute_forward_fwht_f32 (scale by 1/sqrtf(n) first, then the
  butterflies for h = 1, 2, 4, ...), over blocks along head_dim: keys in
  the largest power of two >= 64 dividing head_dim, values in 64s
  (llama_kv_cache::build_input_{k,v}_rot). `rot_input` has head_dim 128 so
  the two rules differ; stored: the blocks of the rotated input, and the
  values rotated back (what kv-compress -decompress returns).
- SGLang fp4_mx_block16 (old fp4_e2m1): a numpy port of
  FP4MXBlock16KVQuantizeUtil.batched_quantize (python/sglang/srt/layers/
  quantization/kvfp4_tensor.py @ 0dae407b; its torch.compile'd f32 math:
  exponent ceil(log2(max(amax/6, 1e-10))), magnitude = #bounds <= |x/2^e|,
  sign bit from x < 0), and its dequantize.
- TensorRT-LLM NVFP4: a port of quantizeAndWriteFP4KVCache /
  cvt_warp_fp16_to_fp4 (TensorRT-LLM @ 03cff08f, read, not run: the
  kernel needs Blackwell), with the e4m3 block scale cast by torch and the
  e2m1 rounding picked among the OCP MX spec's e2m1 values (v1.0 §5.3.3)
  by distance, ties to the even encoding; k_scale 1 (unit) or ModelOpt's
  amax / (6 * 448) (calibrated).
- transformers QuantizedCache, quanto backend (nbits 4 and 2, axis 0,
  q_group_size 64): optimum-quanto's own MaxOptimizer and quantize_weight,
  the calls transformers' QuantoQuantizedLayer._quantize makes, on the
  input cast to float32, float16 and bfloat16; stored: scale and shift
  (as f32), the codes and qtensor.dequantize().
- TensorRT-LLM int8 (TensorRT-engine flow): torch's round-half-even of
  x * (1/scale), clamped to [-128, 127] as cvt.rni.sat.s8.f32 does, with
  scale = amax / 127 per tensor; values q * scale.
- vLLM fp8 e4m3/e5m2: torch's casts after vLLM's saturation,
  (x / scale).clamp(-max, max).to(torch.float8_*), values fp8.float() * scale,
  for scales unit (1.0), calibrated (amax / max per tensor) and dynamic (per
  token and head); plus a table of single casts (ties, subnormals, overflow,
  infinities, NaN).

The versions of torch, numpy and gguf are in the file's metadata. CI does
not need torch: the file is committed. Run (any venv with torch, numpy,
gguf and safetensors):  python xtask/python/engine_fixtures.py
"""

import importlib.metadata as metadata
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf.quants import dequantize, quantize
from safetensors.numpy import save_file

OUT = Path(__file__).resolve().parents[2] / "testdata" / "engines" / "engines.safetensors"
SHAPE = (1, 2, 8, 64)  # [batch, kv_heads, seq, head_dim]
BLOCK = 32
FP8 = {"e4m3": (torch.float8_e4m3fn, 448.0), "e5m2": (torch.float8_e5m2, 57344.0)}


def cache_values() -> np.ndarray:
    rng = np.random.default_rng(19)
    x = (rng.standard_normal(SHAPE) * 2.0).astype(np.float32)
    rows = x.reshape(-1, SHAPE[-1])
    rows[0, :32] = 0.0  # an all-zero block
    rows[1, :32] = np.arange(-16, 16, dtype=np.float32) * 0.5  # exact halves: ties
    rows[2, 32:] = np.float32(1e-6) * rng.standard_normal(32).astype(np.float32)  # tiny
    rows[3, 5] = 300.0  # an outlier: saturates fp8 e4m3 at unit scale...
    rows[4, 7] = -1000.0  # ...on both sides
    rows[5, :32] = 7.0  # a constant block
    rows[6, 0] = -8.0  # the value of largest magnitude is negative
    rows[7, :3] = [127.0, 4.5, -30.0]  # iq4_nl: 1/d0 = -1, so -4.5 ties levels -10 and 1
    # fp4: amax 6 makes a unit scale, so the e2m1 ties are exact; amax 12
    # and 3 sit exactly on SGLang's power-of-two bounds (2 and 1/2).
    rows[8, :16] = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -2.5, -5.0, -0.1, 0.0, -0.0]
    rows[8, 16] = 12.0
    rows[8, 32] = -3.0
    return x


def ggml_fields(kind: str, blocks: np.ndarray) -> dict:
    """d, m and the codes of gguf-py's packed blocks, one row per block."""
    n = blocks.shape[0]
    d = blocks[:, 0:2].copy().view(np.uint16).reshape(n)
    out = {"d": d}
    rest = blocks[:, 2:]
    if kind in ("q4_1", "q5_1"):
        out["m"] = rest[:, 0:2].copy().view(np.uint16).reshape(n)
        rest = rest[:, 2:]
    if kind == "q8_0":
        codes = rest.copy()
    else:
        qh = None
        if kind in ("q5_0", "q5_1"):
            qh = rest[:, 0:4].copy().view(np.uint32).reshape(n, 1)
            rest = rest[:, 4:]
        low = np.concatenate([rest & 0x0F, rest >> 4], axis=1)
        codes = low
        if qh is not None:
            high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
            codes = low | (high << 4)
    out["codes"] = codes.reshape(-1).astype(np.uint8)
    return out


IQ4_NL_LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)


def best_index_int8(x: np.float32) -> int:
    """ggml's best_index_int8 over kvalues_iq4nl, in f32."""
    val = IQ4_NL_LEVELS.astype(np.float32)
    if x <= val[0]:
        return 0
    if x >= val[15]:
        return 15
    ml, mu = 0, 15
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < val[mav]:
            mu = mav
        else:
            ml = mav
    return mu - 1 if x - val[mu - 1] < val[mu] - x else mu


def iq4_nl_reference(rows: np.ndarray) -> np.ndarray:
    """Packed block_iq4_nl bytes (f16 d, then 16 bytes of nibbles: q[j] | q[j+16] << 4)
    per 32-value row, as quantize_row_iq4_nl_ref writes them. A block below
    GROUP_MAX_EPS gets d = 0 and zero nibbles (ggml's memset; ggml itself
    then copies the previous block's stale indices, which decode to 0 too)."""
    f32 = np.float32
    out = np.zeros((rows.shape[0], 18), dtype=np.uint8)
    for b, xb in enumerate(rows.astype(np.float32)):
        amax, xmax = f32(0), f32(0)
        for x in xb:
            if abs(x) > amax:
                amax, xmax = abs(x), x
        L = np.zeros(32, dtype=np.uint8)
        d = f32(0)
        if amax >= f32(1e-15):
            d = xmax / f32(IQ4_NL_LEVELS[0])
            inv = f32(1) / d
            sumqx, sumq2 = f32(0), f32(0)
            for j, x in enumerate(xb):
                L[j] = best_index_int8(inv * x)
                q = f32(IQ4_NL_LEVELS[L[j]])
                w = x * x
                sumqx = f32(sumqx + w * q * x)
                sumq2 = f32(sumq2 + w * q * q)
            d = sumqx / sumq2
        out[b, 0:2] = np.array([d], dtype=np.float16).view(np.uint8)
        out[b, 2:] = L[:16] | (L[16:] << 4)
    return out


ROT_SHAPE = (1, 2, 4, 128)


def llama_hadamard(x: np.ndarray, block: int) -> np.ndarray:
    """ggml_compute_forward_fwht_f32 over consecutive runs of `block` values, in f32."""
    y = x.astype(np.float32).reshape(-1, block) * (np.float32(1.0) / np.sqrt(np.float32(block)))
    h = 1
    while h < block:
        y = y.reshape(-1, block // (2 * h), 2, h)
        u, v = y[:, :, 0, :].copy(), y[:, :, 1, :].copy()
        y[:, :, 0, :], y[:, :, 1, :] = u + v, u - v
        h *= 2
    return y.reshape(x.shape)


def rotation_blocks(head_dim: int) -> dict:
    """Block of each kind: K the largest power of two >= 64 dividing head_dim, V 64."""
    return {"key": head_dim & -head_dim, "value": 64}


def ggml_quantize(kind: str, rows: np.ndarray) -> np.ndarray:
    if kind == "iq4_nl":
        return iq4_nl_reference(rows)
    return quantize(rows, getattr(gguf.GGMLQuantizationType, kind.upper()))


E2M1_GRID = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float32)
E2M1_VALUES = np.concatenate([E2M1_GRID, -E2M1_GRID])
FP4_BLOCK = 16


def sglang_fp4(x: np.ndarray) -> dict:
    """SGLang's batched_quantize and dequantize, per block of 16 along head_dim."""
    blk = x.reshape(-1, FP4_BLOCK).astype(np.float32)
    amax = np.abs(blk).max(-1, keepdims=True)
    e = np.ceil(np.log2(np.maximum(amax / np.float32(6.0), np.float32(1e-10)))).astype(np.float32)
    scaled = blk / np.exp2(e)
    sign = (scaled < 0).astype(np.uint8) << 3
    bounds = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=np.float32)
    codes = sign + (np.abs(scaled)[..., None] >= bounds).sum(-1).astype(np.uint8)
    values = E2M1_VALUES[codes] * np.exp2(e)
    return {"scale": (e + 127).reshape(-1).astype(np.uint8), "codes": codes.reshape(-1), "values": values.reshape(-1)}


def e2m1_rne(v: np.ndarray) -> np.ndarray:
    """The e2m1 code nearest v (saturated at 6), ties to the even encoding; sign only off zero."""
    a = np.minimum(np.abs(v), np.float32(6.0))
    d = np.abs(a[..., None] - E2M1_GRID)
    nearest = d == d.min(-1, keepdims=True)
    even = nearest & (np.arange(8) % 2 == 0)
    idx = np.where(nearest.sum(-1) > 1, np.argmax(even, -1), np.argmin(d, -1)).astype(np.uint8)
    return idx | (((v < 0) & (idx > 0)).astype(np.uint8) << 3)


def nvfp4(x: np.ndarray, unit: bool) -> dict:
    """TensorRT-LLM's NVFP4 cache: g = 1/k_scale, e4m3 block scales, e2m1 codes."""
    f32 = np.float32
    k_scale = f32(1.0) if unit else f32(np.abs(x).max()) / f32(6.0 * 448.0)
    g = f32(1.0) / k_scale
    inv_g = f32(1.0) / g
    blk = x.reshape(-1, FP4_BLOCK).astype(np.float32)
    sf = g * (np.abs(blk).max(-1, keepdims=True) * (f32(1.0) / f32(6.0)))
    sf8 = torch.from_numpy(sf).to(torch.float8_e4m3fn)
    sf32 = sf8.to(torch.float32).numpy()
    with np.errstate(divide="ignore"):
        out_scale = np.where(sf32 != 0, f32(1.0) / (sf32 * inv_g), f32(0.0)).astype(np.float32)
    codes = e2m1_rne(blk * out_scale)
    values = (E2M1_VALUES[codes] * sf32) * inv_g
    return {
        "k_scale": np.array([k_scale], dtype=np.float32),
        "scale": sf8.view(torch.uint8).numpy().reshape(-1),
        "codes": codes.reshape(-1),
        "values": values.reshape(-1).astype(np.float32),
    }


QUANTO_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def quanto_case(x: np.ndarray, nbits: int, dtype: torch.dtype) -> dict:
    """What transformers' QuantoQuantizedLayer stores for one K or V tensor."""
    from optimum.quanto import MaxOptimizer, qint2, qint4, quantize_weight

    qtype = qint4 if nbits == 4 else qint2
    tensor = torch.from_numpy(x).to(dtype).contiguous()
    scale, zeropoint = MaxOptimizer()(tensor, qtype, 0, 64)
    qtensor = quantize_weight(tensor, qtype, 0, scale, zeropoint, 64)
    return {
        "input": tensor.float().numpy().reshape(-1),
        "scale": qtensor._scale.float().numpy().reshape(-1),
        "shift": qtensor._shift.float().numpy().reshape(-1),
        "codes": qtensor._data.unpack().numpy().astype(np.uint8).reshape(-1),
        "values": qtensor.dequantize().float().numpy().reshape(-1),
    }


def fp8_case(x: torch.Tensor, fmt: str, mode: str) -> dict:
    dtype, top = FP8[fmt]
    if mode == "unit":
        scale = torch.ones((1, 1), dtype=torch.float32)
    else:
        groups = x.reshape(1, -1) if mode == "calibrated" else x.reshape(-1, SHAPE[-1])
        scale = groups.abs().amax(dim=1, keepdim=True) / top
        scale = torch.where(scale < torch.finfo(torch.float32).tiny, torch.ones_like(scale), scale)
    groups = x.reshape(scale.shape[0], -1)
    fp8 = (groups / scale).clamp(-top, top).to(dtype)
    values = fp8.to(torch.float32) * scale
    return {
        "scale": scale.reshape(-1).numpy(),
        "codes": fp8.view(torch.uint8).reshape(-1).numpy(),
        "values": values.reshape(-1).numpy(),
    }


def cast_table() -> dict:
    specials = [0.0, -0.0, 1.0625, 1.1875, 2.0**-10, 2.0**-9, 3 * 2.0**-10, 2.0**-17, 2.0**-16,
                448.0, 449.0, 464.0, 480.0, -1e9, 57344.0, 61440.0, 1e30,
                float("inf"), float("-inf"), float("nan"), -float("nan")]
    rng = np.random.default_rng(7)
    wide = (rng.standard_normal(2000) * np.exp2(rng.integers(-20, 18, 2000))).astype(np.float32)
    x = torch.from_numpy(np.concatenate([np.array(specials, dtype=np.float32), wide]))
    out = {"cast.input": x.numpy()}
    for fmt, (dtype, top) in FP8.items():
        out[f"cast.{fmt}"] = x.clamp(-top, top).to(dtype).view(torch.uint8).numpy()
    return out


def main() -> None:
    x = cache_values()
    tensors = {"input": x}
    rows = x.reshape(-1, BLOCK)
    for kind in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"):
        qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
        packed = ggml_quantize(kind, rows)
        fields = ggml_fields(kind, packed.reshape(rows.shape[0], -1))
        for name, value in fields.items():
            tensors[f"{kind}.{name}"] = value
        tensors[f"{kind}.values"] = dequantize(packed, qtype).reshape(-1).astype(np.float32)
    rot_x = (np.random.default_rng(21).standard_normal(ROT_SHAPE) * 1.5).astype(np.float32)
    rot_x[0, 0, 0, 100] = 40.0  # an outlier channel, which the rotation spreads
    tensors["rot_input"] = rot_x
    for tensor_kind, block in rotation_blocks(ROT_SHAPE[-1]).items():
        rotated = llama_hadamard(rot_x, block)
        for kind in ("q8_0", "q4_0", "iq4_nl"):
            qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
            packed = ggml_quantize(kind, rotated.reshape(-1, BLOCK))
            name = f"rot.{kind}.{tensor_kind}"
            for field, value in ggml_fields(kind, packed.reshape(-1, packed.shape[-1])).items():
                tensors[f"{name}.{field}"] = value
            stored = dequantize(packed, qtype).reshape(ROT_SHAPE).astype(np.float32)
            tensors[f"{name}.values"] = llama_hadamard(stored, block).reshape(-1)
    for name, value in sglang_fp4(x).items():
        tensors[f"sglang_fp4.{name}"] = value
    for mode in ("unit", "calibrated"):
        for name, value in nvfp4(x, mode == "unit").items():
            tensors[f"nvfp4.{mode}.{name}"] = value
    for nbits in (4, 2):
        for dtype_name, dtype in QUANTO_DTYPES.items():
            for name, value in quanto_case(x, nbits, dtype).items():
                tensors[f"quanto_int{nbits}.{dtype_name}.{name}"] = value
    xt = torch.from_numpy(x)
    int8_scale = xt.abs().max() / 127.0
    int8_codes = torch.clamp(torch.round(xt * (1.0 / int8_scale)), -128, 127).to(torch.int8)
    tensors["int8_trt.scale"] = int8_scale.reshape(1).numpy()
    tensors["int8_trt.codes"] = int8_codes.view(torch.uint8).reshape(-1).numpy()
    tensors["int8_trt.values"] = (int8_codes.float() * int8_scale).reshape(-1).numpy()
    for fmt in FP8:
        for mode in ("unit", "calibrated", "dynamic"):
            for name, value in fp8_case(xt, fmt, mode).items():
                tensors[f"fp8_{fmt}.{mode}.{name}"] = value
    tensors.update(cast_table())
    versions = {p: metadata.version(p) for p in ("torch", "numpy", "gguf", "optimum-quanto")}
    meta = {f"{p}_version": v for p, v in versions.items()}
    meta["made_by"] = "xtask/python/engine_fixtures.py"
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(OUT), metadata=meta)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes): {versions}")


if __name__ == "__main__":
    main()
