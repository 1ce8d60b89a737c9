"""Checks kv-compress codec payloads against the independent numpy decoder,
`kvformat.codec.decode` (the Python reader shipped in the kv-compress wheel,
crates/kv-compress/python/kvformat), written from the `## Codecs` section of
docs/format.md, not from the Rust code. The Rust test
crates/kvformat/tests/codec_python.rs writes, for a set of tensors, the
payload, the parameters, the input and the Rust decode() output into a
directory and runs:

    PYTHONPATH=crates/kv-compress/python python3 tests/python/test_codecs.py DIR

Every payload is decoded here and must equal the Rust reconstruction bit for
bit; for ADR-002 cases the payload is also re-encoded here and must equal
the Rust payload byte for byte. Exit status 0 only if every case passes.
"""

import json
import math
import pathlib
import sys

import numpy as np

# PYTHONPATH picks which kvformat: the source tree's or an installed wheel's.
from kvformat.codec import GAUSSIAN_LEVELS, decode

ZERO_GROUP_SCALE = np.float32(2.0**-14)


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
