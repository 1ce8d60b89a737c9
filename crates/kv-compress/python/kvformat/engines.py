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
"""

import math

import numpy as np

LLAMA_GRIDS = {"q8_0": 8, "q4_0": 4, "q4_1": 4, "q5_0": 5, "q5_1": 5, "iq4_nl": 4}
# ggml's kvalues_iq4nl.
IQ4_NL_LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)
FP8_GRIDS = {"fp8-e4m3": (3, 7, False), "fp8-e5m2": (2, 15, True)}
ENGINE_GRIDS = set(LLAMA_GRIDS) | set(FP8_GRIDS)


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


def decode(payload, shape, params, layout, view, unpack_codes, require, walsh_hadamard):
    """One engine-format tensor's values in row-major order (float32)."""
    grid = params["grid"]
    require(params["rotation_seed"] is None and view.n_q == view.heads * view.seq * view.head_dim, f"the {grid} grid has no rotation or kept tokens")
    require(params.get("sparsity", 0) == 0 and params.get("outliers", 0) == 0, f"the {grid} grid has no sparsity or outliers")
    llama = grid in LLAMA_GRIDS
    rotation = params.get("llama_rotation")
    require(rotation in (None, "key", "value") and (rotation is None or llama), f"the {grid} grid has no llama.cpp rotation {rotation!r}")
    bits = LLAMA_GRIDS[grid] if llama else 8
    require(params["bits"] == bits, f"the {grid} grid takes {bits} bits")
    if llama:
        require(params["axis"] == "token" and params["group_size"] == 32 and view.head_dim % 32 == 0, f"the {grid} grid is blocks of 32 along head_dim")
        run_len, width, dtype = view.head_dim, 2, "<f2"
        require(layout["scale_dtype"] == "f16", f"the {grid} grid stores f16 scales")
    else:
        require(params["axis"] in ("flat", "token"), f"the {grid} grid groups per tensor or per token")
        run_len = view.n_q if params["axis"] == "flat" else view.head_dim
        width, dtype = 4, "<f4"
        require(layout["scale_dtype"] == "f32", f"the {grid} grid stores f32 scales")
    group_size = params["group_size"]
    groups_per_run = math.ceil(run_len / group_size) if run_len else 0
    n_groups = (view.n_q // run_len) * groups_per_run if run_len else 0
    with_min = grid in ("q4_1", "q5_1")
    sizes = [n_groups * width, n_groups * width if with_min else 0, math.ceil(view.n_q * bits / 8)]
    require(len(payload) == sum(sizes), f"payload is {len(payload)} bytes, the {grid} grid needs {sum(sizes)}")
    scales = np.frombuffer(payload[: sizes[0]], dtype=dtype).astype(np.float32)
    mins = np.frombuffer(payload[sizes[0] : sizes[0] + sizes[1]], dtype=dtype).astype(np.float32)
    require(bool(np.all(np.isfinite(scales)) and np.all(np.isfinite(mins))), "a scale or minimum is not finite")
    codes = unpack_codes(payload[sizes[0] + sizes[1] :], view.n_q, bits).astype(np.uint8)
    position = np.arange(view.n_q)
    groups = (position // run_len) * groups_per_run + (position % run_len) // group_size if run_len else position
    d = scales[groups]
    if grid == "q8_0":
        values = codes.view(np.int8).astype(np.float32) * d
    elif grid == "q4_0":
        values = d * (codes.astype(np.int8) - np.int8(8)).astype(np.float32)
    elif grid == "q5_0":
        values = d * (codes.astype(np.int8) - np.int8(16)).astype(np.float32)
    elif with_min:
        values = d * codes.astype(np.float32) + mins[groups]
    elif grid == "iq4_nl":
        values = d * IQ4_NL_LEVELS[codes & 0x0F]
    else:
        require(layout["scale_dtype"] == "f32" and bool(np.all(scales >= np.finfo(np.float32).tiny)), "an fp8 scale is not a positive normal f32")
        values = float8_table(*FP8_GRIDS[grid])[codes] * d
    block = llama_rotation_block(rotation, view.head_dim)
    if block is not None:
        scale = np.float32(1.0) / np.sqrt(np.float32(block))
        values = walsh_hadamard(values.astype(np.float32).reshape(-1, block) * scale).reshape(-1)
    return values.astype(np.float32)
