"""Drives kv-compress exactly as the original Python bridge did (subprocess,
Go-style flags, JSON on stdout) and checks every output with Python
safetensors and an independent numpy implementation of ADR-002
(CONTRACT section 4 and docs/format.md), not a port of the Rust code.

Run: KV_COMPRESS_BIN=target/release/kv-compress python3 tests/python/test_kv_compress.py
(or under pytest). The Rust test crates/kv-compress/tests/python_bridge.rs runs it.
"""

import json
import os
import struct
import subprocess
import sys
import tempfile
import zlib

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

BIN = os.environ.get("KV_COMPRESS_BIN", "kv-compress")
SHAPE = (1, 4, 48, 64)
LAYERS = 2
# Smallest positive normal FP16: the scale a group of zeros gets (docs/format.md).
ZERO_GROUP_SCALE = np.float32(2.0**-14)


def run(*args):
    """The bridge's call: returns (exit code, parsed JSON or None, stderr)."""
    proc = subprocess.run([BIN, *args], capture_output=True, text=True)
    report = json.loads(proc.stdout) if proc.returncode == 0 else None
    if report is not None:
        assert proc.stdout.endswith("}\n") and proc.stdout.count("\n{") == 0, proc.stdout
    return proc.returncode, report, proc.stderr


def make_cache(path, dtype, seed=0):
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(LAYERS):
        for kind in ("key", "value"):
            values = rng.standard_normal(SHAPE).astype(np.float32)
            values[0, 0, 0, :] = 0.0  # one all-zero group
            tensors[f"layer_{layer}_{kind}"] = values.astype(dtype)
    save_file(tensors, path, metadata={"model_name": "numpy-test"})
    return tensors


def write_go_style(path, tensors):
    """The original Go writer: names sorted, no header padding."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        data = np.ascontiguousarray(tensors[name]).tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    if (8 + len(text)) % 4 == 0:  # make sure the data really is unaligned
        text = b" " + text
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def adr002(values, group_size=64):
    """ADR-002 on the row-major flattening: returns (reconstruction f32, payload bytes)."""
    flat = values.astype(np.float32).ravel()
    n = flat.size
    groups = -(-n // group_size)
    padded = np.zeros(groups * group_size, dtype=np.float32)
    padded[:n] = flat
    padded = padded.reshape(groups, group_size)
    scale = (np.abs(padded).max(axis=1) / np.float32(7)).astype(np.float32)
    scale16 = scale.astype(np.float16)
    assert np.all((scale == 0) | (np.abs(scale16) >= np.float16(2.0**-14))), "test data needs FP16 scales"
    stored16 = np.where(scale == 0, np.float16(ZERO_GROUP_SCALE), scale16)
    stored = stored16.astype(np.float32)
    t = (padded / stored[:, None]).astype(np.float32).astype(np.float64)
    q = np.clip(np.sign(t) * np.floor(np.abs(t) + 0.5), -8, 7)
    recon = (q.astype(np.float32) * stored[:, None]).astype(np.float32).ravel()[:n].reshape(values.shape)
    codes = (q.ravel()[:n] + 8).astype(np.uint8)
    if codes.size % 2:
        codes = np.append(codes, np.uint8(0))
    packed = (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)
    payload = stored16.astype("<f2").tobytes() + packed.tobytes()
    return recon, payload


def metrics(original, recon):
    o, r = original.astype(np.float64).ravel(), recon.astype(np.float64).ravel()
    mse = np.mean((o - r) ** 2)
    return {
        "rmse": np.sqrt(mse),
        "snr_db": 10 * np.log10(np.var(o) / mse),
        "cosine": o @ r / (np.linalg.norm(o) * np.linalg.norm(r)),
        "max_error": np.max(np.abs(o - r)),
    }


def check_report_types(report):
    for key in ("compression_ratio", "rmse", "snr_db", "cosine_similarity", "max_error", "processing_time_ms", "bits_per_value"):
        assert isinstance(report[key], float) and np.isfinite(report[key]), (key, report[key])
    for key in ("original_size_bytes", "compressed_size_bytes"):
        assert isinstance(report[key], int), key
    assert report["quality_level"] in ("EXCELLENT", "GOOD", "ACCEPTABLE", "POOR")
    assert isinstance(report["quality_passed"], bool)
    assert isinstance(report["violations"], list) and all(isinstance(v, str) for v in report["violations"])
    assert report["quality_passed"] == (report["violations"] == [])


def test_help_probe():
    proc = subprocess.run([BIN, "-h"], capture_output=True, text=True)
    assert proc.returncode == 0 and "-input" in proc.stderr and proc.stdout == ""


def test_compress_decompress_reconstruct_against_numpy():
    for dtype, ratio in ((np.float16, 64 / 17), (np.float32, 128 / 17)):
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "kv_cache.safetensors")
            packed = os.path.join(tmp, "kv_cache.int4.safetensors")
            restored = os.path.join(tmp, "restored.safetensors")
            rebuilt = os.path.join(tmp, "rebuilt.safetensors")
            tensors = make_cache(src, dtype)
            code, report, err = run("-input", src, "-output", packed, "-group-size", "64", "-sparsity", "0.0")
            assert code == 0, err
            check_report_types(report)
            assert abs(report["compression_ratio"] - ratio) < 1e-9, report
            expected = {name: adr002(values) for name, values in tensors.items()}
            assert report["compressed_size_bytes"] == sum(len(p) for _, p in expected.values())

            # The packed file loads with Python safetensors: one U8 tensor per input tensor.
            stored = load_file(packed)
            assert sorted(stored) == sorted(tensors)
            with safe_open(packed, "np") as f:
                meta = f.metadata()
            assert meta["compression"] == "int4" and meta["group_size"] == "64"
            assert meta["original_dtype"] == np.dtype(dtype).name and meta["model_name"] == "numpy-test"
            assert meta["kvformat.format_version"] == "1"
            manifest_text = meta["kvformat.manifest"]
            assert meta["kvformat.manifest_crc32"] == "%08x" % zlib.crc32(manifest_text.encode())
            manifest = json.loads(manifest_text)
            assert manifest["input_metadata"] == {"model_name": "numpy-test"}
            for name, data in stored.items():
                entry = manifest["tensors"][name]
                assert data.dtype == np.uint8 and data.shape == (entry["stored_len"],)
                assert zlib.crc32(data.tobytes()) == entry["crc32"]
                assert entry["shape"] == list(SHAPE) and entry["lz4"] is False
                assert data.tobytes() == expected[name][1], f"{name}: payload differs from numpy ADR-002"

            # Metrics equal numpy's on the numpy reconstruction.
            per_tensor = [metrics(tensors[n].astype(np.float32), expected[n][0]) for n in sorted(tensors)]
            for json_key, key in (("rmse", "rmse"), ("snr_db", "snr_db"), ("cosine_similarity", "cosine")):
                mean = np.mean([m[key] for m in per_tensor])
                assert abs(report[json_key] - mean) <= 1e-9 * max(1.0, abs(mean)), (json_key, report[json_key], mean)
            assert report["max_error"] == max(m["max_error"] for m in per_tensor)

            code, back, err = run("-decompress", "-input", packed, "-output", restored)
            assert code == 0, err
            check_report_types(back)
            assert back["compressed_size_bytes"] == report["compressed_size_bytes"]
            code, _, err = run("-input", src, "-output", rebuilt, "-reconstruct")
            assert code == 0, err
            for path in (restored, rebuilt):
                out = load_file(path)
                assert sorted(out) == sorted(tensors)
                for name, values in tensors.items():
                    assert out[name].dtype == values.dtype and out[name].shape == values.shape
                    want = expected[name][0].astype(dtype)
                    assert np.array_equal(out[name], want), f"{path} {name}"


def test_metrics_only_writes_nothing():
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kv_cache.safetensors")
        make_cache(src, np.float16)
        before = sorted(os.listdir(tmp))
        code, report, err = run("-input", src, "-metrics-only", "-group-size", "64", "-verbose")
        assert code == 0, err
        check_report_types(report)
        assert isinstance(report["tensor_metrics"]["layer_0_key_rmse"], float)
        assert sorted(os.listdir(tmp)) == before


def test_go_style_unpadded_file():
    with tempfile.TemporaryDirectory() as tmp:
        padded = os.path.join(tmp, "padded.safetensors")
        unpadded = os.path.join(tmp, "go.safetensors")
        tensors = make_cache(padded, np.float32, seed=3)
        write_go_style(unpadded, tensors)
        assert load_file(unpadded).keys() == tensors.keys()
        out = os.path.join(tmp, "go.restored.safetensors")
        packed = os.path.join(tmp, "go.int4.safetensors")
        assert run("-input", unpadded, "-output", packed)[0] == 0
        code, _, err = run("-decompress", "-input", packed, "-output", out)
        assert code == 0, err
        restored = load_file(out)
        for name, values in tensors.items():
            assert np.array_equal(restored[name], adr002(values)[0]), name


def test_errors_are_one_line_and_exit_one():
    with tempfile.TemporaryDirectory() as tmp:
        bad = os.path.join(tmp, "bad.safetensors")
        with open(bad, "wb") as f:
            f.write(b"\x05\x00\x00")
        code, _, err = run("-input", bad, "-output", os.path.join(tmp, "o.safetensors"))
        assert code == 1 and err.startswith("Error: ") and "bad.safetensors" in err and err.count("\n") == 1, err
        assert sorted(os.listdir(tmp)) == ["bad.safetensors"]
        code, _, err = run("-input", bad, "-output")
        assert code == 2 and "flag needs an argument: -output" in err


if __name__ == "__main__":
    tests = [(name, fn) for name, fn in sorted(globals().items()) if name.startswith("test_") and callable(fn)]
    for name, fn in tests:
        fn()
        print(f"ok  {name}")
    print(f"{len(tests)} passed")
