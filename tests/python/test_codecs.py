"""Independent numpy decoder for kv-compress codec payloads.

Written from the `## Codecs` section of docs/format.md, not from the Rust
code. The Rust test crates/kvformat/tests/codec_python.rs writes, for a set
of tensors, the payload, the parameters, the input and the Rust decode()
output into a directory and runs:

    python3 tests/python/test_codecs.py DIR

Every payload is decoded here and must equal the Rust reconstruction bit for
bit; for ADR-002 cases the payload is also re-encoded here and must equal
the Rust payload byte for byte. Exit status 0 only if every case passes.
"""

import json
import math
import pathlib
import sys

import numpy as np

MASK64 = (1 << 64) - 1
ZERO_GROUP_SCALE = np.float32(2.0**-14)


def splitmix64(seed):
    state = seed
    while True:
        state = (state + 0x9E3779B97F4A7C15) & MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        yield z ^ (z >> 31)


def rotation_signs(seed, dim):
    generator = splitmix64(seed)
    words = [next(generator) for _ in range(math.ceil(dim / 64))]
    return np.array([-1.0 if (words[j // 64] >> (j % 64)) & 1 else 1.0 for j in range(dim)], dtype=np.float32)


def walsh_hadamard(vectors):
    """Unnormalized fast Walsh-Hadamard transform along the last axis, in float32."""
    v = np.array(vectors, dtype=np.float32)
    dim = v.shape[-1]
    lead = v.shape[:-1]
    h = 1
    while h < dim:
        blocks = v.reshape(lead + (dim // (2 * h), 2, h))
        low = blocks[..., 0, :].copy()
        high = blocks[..., 1, :].copy()
        blocks[..., 0, :] = low + high
        blocks[..., 1, :] = low - high
        v = blocks.reshape(lead + (dim,))
        h *= 2
    return v


def unrotate(rotated, seed):
    dim = rotated.shape[-1]
    r = np.float32(1.0 / math.sqrt(dim))
    return (walsh_hadamard(rotated) * r) * rotation_signs(seed, dim)


def unpack_codes(data, count, bits):
    stream = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    fields = stream[: count * bits].reshape(count, bits).astype(np.int64)
    return (fields << np.arange(bits)).sum(axis=1)


class View:
    """The tensor as heads x seq x head_dim with kept tokens split off."""

    def __init__(self, shape, params):
        if len(shape) == 4:
            b, h, s, d = shape
            self.heads, self.seq, self.head_dim = b * h, s, d
        else:
            self.heads, self.seq, self.head_dim = 1, 1, int(np.prod(shape, dtype=np.int64))
        sink, recent = params["sink_tokens"], params["recent_tokens"]
        if (sink or recent) and sink + recent >= self.seq:
            self.mid_start, self.mid_len = self.seq, 0
        else:
            self.mid_start, self.mid_len = sink, self.seq - sink - recent
        self.kept_tokens = [t for t in range(self.seq) if t < self.mid_start or t >= self.mid_start + self.mid_len]
        self.n_q = self.heads * self.mid_len * self.head_dim

    def group_order(self, axis):
        """Row-major indices of Q listed in group order, and the run length."""
        q = np.arange(self.n_q).reshape(self.heads, self.mid_len, self.head_dim)
        if axis == "channel":
            return q.transpose(0, 2, 1).reshape(-1), self.mid_len
        if axis == "token":
            return q.reshape(-1), self.head_dim
        return q.reshape(-1), self.n_q


OUTLIER_BLOCK = 1 << 16

# docs/format.md, "Codebook grids": the positive Lloyd-Max levels of N(0, 1), as f32.
GAUSSIAN_LEVELS = {
    2: ["0.45278004", "1.5104176"],
    3: ["0.24509418", "0.7560053", "1.3439093", "2.1519456"],
    4: ["0.12839504", "0.3880483", "0.65675914", "0.94234043", "1.2562312", "1.6180464", "2.0690172", "2.7325895"],
}


def gaussian_levels(bits):
    half = np.array([np.float32(level) for level in GAUSSIAN_LEVELS[bits]], dtype=np.float32)
    return np.concatenate([-half[::-1], half])


def check_gaussian_levels():
    """The table is Lloyd's fixed point on the Gaussian density (math.erfc here,
    independent of the Rust test's numerical integration)."""
    density = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi) if math.isfinite(x) else 0.0
    cdf = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))
    for bits, half in GAUSSIAN_LEVELS.items():
        n = 1 << bits
        levels = [(i - (n - 1) / 2) * 4 / n for i in range(n)]
        for _ in range(20000):
            bounds = [-math.inf] + [(a + b) / 2 for a, b in zip(levels, levels[1:])] + [math.inf]
            levels = [(density(a) - density(b)) / (cdf(b) - cdf(a)) for a, b in zip(bounds, bounds[1:])]
        for derived, shipped in zip(levels[n // 2 :], map(float, half)):
            assert abs(derived - shipped) < 2e-6, f"{bits} bits: Lloyd gives {derived}, table has {shipped}"


def decode(payload, shape, params, layout):
    view = View(shape, params)
    bits, group_size = params["bits"], params["group_size"]
    order, run_len = view.group_order(params["axis"])
    groups_per_run = math.ceil(run_len / group_size) if run_len else 0
    n_groups = (view.n_q // run_len) * groups_per_run if run_len else 0
    width, dtype = (2, "<f2") if layout["scale_dtype"] == "f16" else (4, "<f4")
    # Manifests written before the dense form existed have no sparse_form: bitmap.
    form = layout.get("sparse_form", "bitmap")
    assert form in ("bitmap", "dense"), f"unknown sparse_form {form}"
    dropped = math.floor(params["sparsity"] * view.n_q)
    sparse = params["sparsity"] > 0 and form == "bitmap"
    if params["sparsity"] > 0 and form == "dense":
        assert params["grid"] == "symmetric", "dense sparse form on the asymmetric grid"
    n_kept = view.n_q - dropped if sparse else view.n_q
    kept_values = view.heads * len(view.kept_tokens) * view.head_dim
    # Outliers: floor(F * block length) per block of 65536 grouped values.
    fraction = params.get("outliers", 0.0)
    block_lengths = [min(OUTLIER_BLOCK, view.n_q - start) for start in range(0, view.n_q, OUTLIER_BLOCK)]
    per_block = [math.floor(length * fraction) for length in block_lengths]
    n_outliers = sum(per_block)
    asymmetric = params["grid"] == "asymmetric"
    codebook = params["grid"] in ("lloyd", "kmeans")
    assert params["grid"] in ("symmetric", "asymmetric", "lloyd", "kmeans"), params["grid"]
    sizes = [
        n_groups * width,
        n_groups * width if asymmetric else 0,
        2 * (1 << bits) if params["grid"] == "kmeans" else 0,
        2 * kept_values,
        math.ceil(view.n_q / 8) if sparse else 0,
        math.ceil(n_kept * bits / 8),
        4 * n_outliers,
    ]
    assert len(payload) == sum(sizes), f"payload {len(payload)} bytes, expected {sum(sizes)}"
    sections, at = [], 0
    for size in sizes:
        sections.append(payload[at : at + size])
        at += size
    scales = np.frombuffer(sections[0], dtype=dtype).astype(np.float32)
    offsets = np.frombuffer(sections[1], dtype=dtype).astype(np.float32)
    if params["grid"] == "kmeans":
        levels = np.frombuffer(sections[2], dtype="<f2").astype(np.float32)
        assert np.all(np.isfinite(levels)) and np.all(np.diff(levels) >= 0), "bad codebook levels"
    elif codebook:
        levels = gaussian_levels(bits)
    sections.pop(2)
    kept = np.frombuffer(sections[2], dtype="<f2").astype(np.float32)
    if sparse:
        stored = np.unpackbits(np.frombuffer(sections[3], dtype=np.uint8), bitorder="little")[: view.n_q].astype(bool)
    else:
        stored = np.ones(view.n_q, dtype=bool)
    assert stored.sum() == n_kept
    codes = unpack_codes(sections[4], n_kept, bits)
    if params["sparsity"] > 0 and not sparse:
        # Dense form: dropped values hold the code of 0, so at least that many do.
        assert np.count_nonzero(codes == 1 << (bits - 1)) >= dropped, "too few zero codes for the dropped values"

    position = np.arange(view.n_q)
    group_of_position = (position // run_len) * groups_per_run + (position % run_len) // group_size if run_len else position
    stored_positions = np.flatnonzero(stored[order])
    groups = group_of_position[stored_positions]
    if codebook:
        limit = np.finfo(np.float32).max
        with np.errstate(over="ignore"):
            decoded = np.clip(levels[codes] * scales[groups], -limit, limit)
    elif asymmetric:
        wide = codes.astype(np.float64) * scales[groups].astype(np.float64) + offsets[groups].astype(np.float64)
        limit = float(np.finfo(np.float32).max)
        decoded = np.clip(wide, -limit, limit).astype(np.float32)
    else:
        limit = np.finfo(np.float32).max
        with np.errstate(over="ignore"):
            decoded = np.clip((codes - (1 << (bits - 1))).astype(np.float32) * scales[groups], -limit, limit)
    in_group_order = np.zeros(view.n_q, dtype=np.float32)
    in_group_order[stored_positions] = decoded
    if n_outliers:
        offsets = np.frombuffer(sections[5][: 2 * n_outliers], dtype="<u2").astype(np.int64)
        values = np.frombuffer(sections[5][2 * n_outliers :], dtype="<f2").astype(np.float32)
        block_starts = np.repeat(np.arange(len(per_block)) * OUTLIER_BLOCK, per_block)
        assert np.all(np.isfinite(values)), "non-finite outlier value"
        in_group_order[block_starts + offsets] = values
    q = np.zeros(view.n_q, dtype=np.float32)
    q[order] = in_group_order
    q = q.reshape(view.heads, view.mid_len, view.head_dim)
    if params["rotation_seed"] is not None and q.size:
        q = unrotate(q, params["rotation_seed"])
    out = np.zeros((view.heads, view.seq, view.head_dim), dtype=np.float32)
    out[:, view.mid_start : view.mid_start + view.mid_len, :] = q
    if view.kept_tokens:
        out[:, view.kept_tokens, :] = kept.reshape(view.heads, len(view.kept_tokens), view.head_dim)
    return out.reshape(-1)


def round_half_away(t):
    whole = np.trunc(t)
    fraction = t - whole
    return whole + (fraction >= 0.5) - (fraction <= -0.5)


def encode_adr002(values, group_size):
    """ADR-002 as docs/format.md states it: returns (payload, scale_dtype)."""
    n = values.size
    n_groups = math.ceil(n / group_size)
    exact = np.empty(n_groups, dtype=np.float32)
    for g in range(n_groups):
        exact[g] = np.max(np.abs(values[g * group_size : (g + 1) * group_size])) / np.float32(7)
    halves = exact.astype(np.float16)
    fits = np.all((exact == 0) | (np.isfinite(halves) & (np.abs(halves) >= np.float16(2.0**-14))))
    if fits:
        stored, dtype = np.where(exact == 0, ZERO_GROUP_SCALE, halves.astype(np.float32)), "f16"
        scale_bytes = stored.astype("<f2").tobytes()
    else:
        stored = np.where(exact == 0, ZERO_GROUP_SCALE, np.maximum(exact, np.finfo(np.float32).tiny)).astype(np.float32)
        dtype, scale_bytes = "f32", stored.astype("<f4").tobytes()
    per_value = np.repeat(stored, group_size)[:n]
    q = np.clip(round_half_away(values / per_value), -8, 7).astype(np.int64) + 8
    if n % 2:
        q = np.append(q, 0)
    packed = (q[0::2] | (q[1::2] << 4)).astype(np.uint8)
    return scale_bytes + packed.tobytes(), dtype


def main(directory):
    directory = pathlib.Path(directory)
    cases = json.loads((directory / "cases.json").read_text())
    check_gaussian_levels()
    print("ok   Gaussian Lloyd-Max table is Lloyd's fixed point")
    failures = []
    squared_errors = {}
    for case in cases:
        name, shape, params, layout = case["name"], case["shape"], case["params"], case["layout"]
        payload = (directory / f"{name}.payload").read_bytes()
        values = np.fromfile(directory / f"{name}.input", dtype="<f4")
        expected = np.fromfile(directory / f"{name}.decoded", dtype="<f4")
        try:
            decoded = decode(payload, shape, params, layout)
            if not np.array_equal(decoded.view(np.uint32), expected.view(np.uint32)):
                bad = np.flatnonzero(decoded.view(np.uint32) != expected.view(np.uint32))
                raise AssertionError(f"{bad.size} values differ, first at {bad[0]}: {decoded[bad[0]]} vs {expected[bad[0]]}")
            adr002 = (params["bits"], params["grid"], params["axis"]) == (4, "symmetric", "flat") and not (
                params["rotation_seed"] is not None or params["sink_tokens"] or params["recent_tokens"] or params["sparsity"]
            )
            if adr002:
                reencoded, dtype = encode_adr002(values, params["group_size"])
                assert dtype == layout["scale_dtype"], f"scale dtype {dtype} vs {layout['scale_dtype']}"
                assert reencoded == payload, "numpy ADR-002 payload differs from Rust's"
            squared_errors[name] = float(np.sum((decoded.astype(np.float64) - values) ** 2))
            note = " (decoded and re-encoded)" if adr002 else " (decoded)"
            if name.endswith("_fit_mse"):
                # Least-squares params must beat min/max ones on the same values.
                min_max = name.removesuffix("_fit_mse")
                assert squared_errors[name] < squared_errors[min_max], (
                    f"squared error {squared_errors[name]} not below {min_max}'s {squared_errors[min_max]}"
                )
                note = f" (decoded; squared error {squared_errors[name]:.4g} < {min_max}'s {squared_errors[min_max]:.4g})"
            print(f"ok   {name}{note}")
        except AssertionError as error:
            failures.append(name)
            print(f"FAIL {name}: {error}")
    print(f"{len(cases) - len(failures)} of {len(cases)} cases match")
    return 1 if failures or not cases else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: test_codecs.py DIR", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
