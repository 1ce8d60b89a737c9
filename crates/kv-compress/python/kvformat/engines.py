"""Decoding of the engine formats (docs/format.md, "Engine formats"): the
KV-cache types that inference engines ship, stored as those engines store
them, with no LZ4 stage.

- llama.cpp `q8_0`, `q4_0`, `q4_1`, `q5_0`, `q5_1`, `iq4_nl`: blocks of 32
  values along head_dim (per-token groups of 32); sections: the f16 `d` of
  every block, then (`_1` types) the f16 `m` of every block, then the
  engine's codes bit-packed at 8, 4 or 5 bits. Values: q8_0 `int8(q) * d`;
  q4_0 `(q - 8) * d`; q5_0 `(q - 16) * d`; q4_1 and q5_1 `q * d + m`;
  iq4_nl `d * IQ4_NL_LEVELS[q]`, in f32.
- `llama_rotation` ("key" or "value", llama.cpp's attention rotation, PR
  #21038): the llama.cpp values above are stored rotated; the tensor is
  rotated back by the same orthonormal Walsh-Hadamard transform over blocks
  along head_dim (key: the largest power of two >= 64 dividing head_dim;
  value: 64; none when head_dim is not a multiple of 64), in ggml's order:
  each value times `1/sqrtf(block)`, then the butterflies.
- vLLM/SGLang `fp8-e4m3` (float8 e4m3fn) and `fp8-e5m2`: the f32 scale of
  every group, then one float8 byte per value. Values: `float8(b) * scale`.
- TensorRT-LLM `nvfp4`: blocks of 16 along head_dim; the e4m3 byte of every
  block's scale, the f32 `k_scale` (4 bytes), then 4-bit e2m1 codes. Values:
  `e2m1(q) * scale * (1 / (1 / k_scale))`, in f32.
- transformers `quanto-int4` / `quanto-int2` (QuantizedCache, quanto
  backend): flat groups of 64; the scale of every group, then its shift
  (`-min`), both in the model's dtype (`model_dtype`: f16, bf16 or f32),
  then the codes at 4 or 2 bits. Values: `scale * q - shift`, each op
  rounded to the model's dtype.
- TensorRT-LLM `int8-trt`: the f32 scale of every group, then one int8 byte
  per value. Values: `int8(q) * scale`.
- SGLang `fp4-mx16` (`fp4_mx_block16`): blocks of 16; the E8M0 byte of every
  block's power-of-two scale, then 4-bit e2m1 codes. Values: `e2m1(q) * scale`.
"""

import math

import numpy as np

LLAMA_GRIDS = {"q8_0": 8, "q4_0": 4, "q4_1": 4, "q5_0": 5, "q5_1": 5, "iq4_nl": 4}
# ggml's kvalues_iq4nl.
IQ4_NL_LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)
FP8_GRIDS = {"fp8-e4m3": (3, 7, False), "fp8-e5m2": (2, 15, True)}
# TensorRT-LLM's int8 cache: one f32 scale per group, like the fp8 grids.
INT8_GRIDS = {"int8-trt"}
# transformers' quanto cache grids and their bits.
QUANTO_GRIDS = {"quanto-int4": 4, "quanto-int2": 2}
# The fp4 grids and their block-scale dtype.
FP4_GRIDS = {"nvfp4": "e4m3", "fp4-mx16": "e8m0"}
ENGINE_GRIDS = set(LLAMA_GRIDS) | set(FP8_GRIDS) | set(FP4_GRIDS) | set(QUANTO_GRIDS) | INT8_GRIDS
# The OCP MX spec's e2m1 values by code (bit 3 the sign).
E2M1_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)


def float8_table(mantissa_bits, bias, ieee_specials):
    """The f32 value of each of the 256 float8 bytes, from the bit layout."""
    table = np.zeros(256, dtype=np.float32)
    for byte in range(256):
        sign = -1.0 if byte & 0x80 else 1.0
        exp = (byte & 0x7F) >> mantissa_bits
        man = byte & ((1 << mantissa_bits) - 1)
        if ieee_specials and exp == (0x7F >> mantissa_bits):
            magnitude = math.inf if man == 0 else math.nan
        elif not ieee_specials and byte & 0x7F == 0x7F:
            magnitude = math.nan
        elif exp == 0:
            magnitude = man * 2.0 ** (1 - bias - mantissa_bits)
        else:
            magnitude = ((1 << mantissa_bits) + man) * 2.0 ** (exp - bias - mantissa_bits)
        table[byte] = sign * magnitude
    return table


def llama_rotation_block(rotation, head_dim):
    """The block of llama.cpp's rotation for this tensor, or None."""
    if rotation is None or head_dim == 0 or head_dim % 64:
        return None
    return head_dim & -head_dim if rotation == "key" else 64


def model_rounded(x, dtype):
    """x (float32) rounded to the model's dtype, as a torch op stores its f32 result."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == "f16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "bf16":
        bits = x.view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return np.where(np.isnan(x), x, bits.astype(np.uint32).view(np.float32))
    return x


def scale_values(raw, scale_dtype, require):
    """The stored scales as float32: f16/f32 little-endian, or one byte each
    (e4m3: float8 e4m3fn; e8m0: the power of two 2^(byte - 127), 255 is NaN)."""
    if scale_dtype in ("f16", "f32"):
        return np.frombuffer(raw, dtype="<f2" if scale_dtype == "f16" else "<f4").astype(np.float32)
    if scale_dtype == "bf16":
        return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    codes = np.frombuffer(raw, dtype=np.uint8)
    if scale_dtype == "e4m3":
        return float8_table(3, 7, False)[codes]
    require(bool(np.all(codes != 255)), "an e8m0 scale is NaN")
    return np.ldexp(np.float32(1.0), codes.astype(np.int32) - 127).astype(np.float32)


def decode(payload, shape, params, layout, view, unpack_codes, require, walsh_hadamard):
    """One engine-format tensor's values in row-major order (float32)."""
    grid = params["grid"]
    require(params["rotation_seed"] is None and view.n_q == view.heads * view.seq * view.head_dim, f"the {grid} grid has no rotation or kept tokens")
    require(params.get("sparsity", 0) == 0 and params.get("outliers", 0) == 0, f"the {grid} grid has no sparsity or outliers")
    llama = grid in LLAMA_GRIDS
    rotation = params.get("llama_rotation")
    require(rotation in (None, "key", "value") and (rotation is None or llama), f"the {grid} grid has no llama.cpp rotation {rotation!r}")
    bits = LLAMA_GRIDS[grid] if llama else QUANTO_GRIDS.get(grid, 4 if grid in FP4_GRIDS else 8)
    model_dtype = params.get("model_dtype") or "f32"
    require(model_dtype in ("f32", "f16", "bf16") and (grid in QUANTO_GRIDS or "model_dtype" not in params), f"the {grid} grid has no model dtype {model_dtype!r}")
    require(params["bits"] == bits, f"the {grid} grid takes {bits} bits")
    if llama or grid in FP4_GRIDS:
        block = 32 if llama else 16
        require(params["axis"] == "token" and params["group_size"] == block and view.head_dim % block == 0, f"the {grid} grid is blocks of {block} along head_dim")
        run_len = view.head_dim
        scale_dtype = "f16" if llama else FP4_GRIDS[grid]
    elif grid in QUANTO_GRIDS:
        require(params["axis"] == "flat" and params["group_size"] == 64 and view.n_q % 64 == 0, f"the {grid} grid is flat groups of 64")
        run_len = view.n_q
        scale_dtype = model_dtype
    else:
        require(params["axis"] in ("flat", "token"), f"the {grid} grid groups per tensor or per token")
        run_len = view.n_q if params["axis"] == "flat" else view.head_dim
        scale_dtype = "f32"
    require(layout["scale_dtype"] == scale_dtype, f"the {grid} grid stores {scale_dtype} scales")
    width = {"f16": 2, "bf16": 2, "f32": 4}.get(scale_dtype, 1)
    group_size = params["group_size"]
    groups_per_run = math.ceil(run_len / group_size) if run_len else 0
    n_groups = (view.n_q // run_len) * groups_per_run if run_len else 0
    with_min = grid in ("q4_1", "q5_1") or grid in QUANTO_GRIDS
    levels = 4 if grid == "nvfp4" else 0
    sizes = [n_groups * width, n_groups * width if with_min else 0, levels, math.ceil(view.n_q * bits / 8)]
    require(len(payload) == sum(sizes), f"payload is {len(payload)} bytes, the {grid} grid needs {sum(sizes)}")
    offsets = np.cumsum([0] + sizes)
    scales = scale_values(payload[: offsets[1]], scale_dtype, require)
    mins = scale_values(payload[offsets[1] : offsets[2]], scale_dtype, require)
    require(bool(np.all(np.isfinite(scales)) and np.all(np.isfinite(mins))), "a scale or minimum is not finite")
    codes = unpack_codes(payload[offsets[3] :], view.n_q, bits).astype(np.uint8)
    position = np.arange(view.n_q)
    groups = (position // run_len) * groups_per_run + (position % run_len) // group_size if run_len else position
    d = scales[groups]
    if grid == "q8_0":
        values = codes.view(np.int8).astype(np.float32) * d
    elif grid == "q4_0":
        values = d * (codes.astype(np.int8) - np.int8(8)).astype(np.float32)
    elif grid == "q5_0":
        values = d * (codes.astype(np.int8) - np.int8(16)).astype(np.float32)
    elif grid in QUANTO_GRIDS:
        # scale * q - shift, each op rounded to the model's dtype; the offsets are the shifts.
        values = model_rounded(model_rounded(d * codes.astype(np.float32), model_dtype) - mins[groups], model_dtype)
    elif with_min:
        values = d * codes.astype(np.float32) + mins[groups]
    elif grid == "iq4_nl":
        values = d * IQ4_NL_LEVELS[codes & 0x0F]
    elif grid == "nvfp4":
        k_scale = np.frombuffer(payload[offsets[2] : offsets[3]], dtype="<f4")[0]
        require(bool(np.isfinite(k_scale) and k_scale >= np.finfo(np.float32).tiny), "nvfp4's tensor scale is not a positive normal f32")
        inverse_g = np.float32(1.0) / (np.float32(1.0) / k_scale)
        values = (E2M1_VALUES[codes & 0x0F] * d) * inverse_g
    elif grid == "fp4-mx16":
        values = E2M1_VALUES[codes & 0x0F] * d
    elif grid in INT8_GRIDS:
        require(bool(np.all(scales >= np.finfo(np.float32).tiny)), "an int8 scale is not a positive normal f32")
        values = codes.view(np.int8).astype(np.float32) * d
    else:
        require(bool(np.all(scales >= np.finfo(np.float32).tiny)), "an fp8 scale is not a positive normal f32")
        values = float8_table(*FP8_GRIDS[grid])[codes] * d
    block = llama_rotation_block(rotation, view.head_dim)
    if block is not None:
        scale = np.float32(1.0) / np.sqrt(np.float32(block))
        values = walsh_hadamard(values.astype(np.float32).reshape(-1, block) * scale).reshape(-1)
    return values.astype(np.float32)
