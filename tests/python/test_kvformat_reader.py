"""The Python reader `kvformat.load_packed` against `kv-compress -decompress`:
for every method (preset, bit width, grid, axis, rotation, kept tokens,
sparsity in both forms, outliers, least-squares fit, per-layer bits, LZ4)
and every cache dtype, the reader's tensors must equal the decompressed
file's bit for bit; a corrupted file must raise PackedFileError naming it.

Run: KV_COMPRESS_BIN=target/release/kv-compress PYTHONPATH=crates/kv-compress/python \
         python3 tests/python/test_kvformat_reader.py
The Rust test crates/kv-compress/tests/python_reader.rs runs it (and the
wheel test runs it against the installed wheel, with kv-compress from PATH).
"""

import json
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np

import kvformat

BIN = os.environ.get("KV_COMPRESS_BIN", "kv-compress")
SHAPE = (1, 2, 40, 64)
LAYERS = 2

# Flags per method: every codec feature docs/format.md defines at least once.
METHODS = {
    "adr002": [],
    "adr002_g32": ["-group-size", "32"],
    "adr002_g128": ["-group-size", "128"],
    "kivi": ["-method", "kivi"],
    "sym2": ["-bits", "2"],
    "sym3": ["-bits", "3"],
    "sym8": ["-bits", "8"],
    "asym4": ["-grid", "asym"],
    "asym2_fit_mse": ["-bits", "2", "-grid", "asym", "-fit", "mse"],
    "lloyd3_rotate": ["-grid", "lloyd", "-bits", "3", "-rotate"],
    "lloyd4_rotate_seed": ["-grid", "lloyd", "-rotate", "-rotate-seed", "7"],
    "kmeans2": ["-grid", "kmeans", "-bits", "2"],
    "axes_token_channel": ["-key-axis", "token", "-value-axis", "channel", "-group-size", "32"],
    "key4_value2": ["-key-bits", "4", "-value-bits", "2", "-value-group-size", "32"],
    "layer_bits": ["-layer-bits", "k:0=8;*=2/32"],
    "outliers": ["-bits", "2", "-outliers", "0.01"],
    "fit_mse": ["-bits", "3", "-fit", "mse"],
    "sink_recent": ["-sink-tokens", "4", "-recent-tokens", "8"],
    "sparsity_dense": ["-sparsity", "0.1"],
    "sparsity_bitmap": ["-sparsity", "0.6"],
    "ecsq3_channel": ["-method", "kivi", "-grid", "ecsq", "-bits", "3", "-key-group-size", "32", "-value-axis", "channel", "-value-group-size", "32"],
    "ecsq_rate_token": ["-grid", "ecsq", "-rate", "7.5", "-key-axis", "token", "-value-axis", "token", "-group-size", "64", "-sink-tokens", "2"],
}
GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "testdata", "golden")
DTYPES = ("F32", "F16", "BF16")


def to_bytes(values, dtype):
    if dtype == "F32":
        return values.astype("<f4").tobytes()
    if dtype == "F16":
        return values.astype("<f2").tobytes()
    return (values.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()  # truncation is a fine bf16 input


def write_safetensors(path, tensors, metadata):
    """tensors: {name: (dtype, shape, bytes)}; Python's layout (header padded to 8)."""
    header, blobs, offset = {"__metadata__": metadata}, [], 0
    for name in sorted(tensors):
        dtype, shape, data = tensors[name]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def read_as_f32_bits(path):
    """{name: (dtype, shape, uint32 bits of the values widened to f32)}, parsed here by hand."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    out = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        raw = data[8 + n + begin : 8 + n + end]
        if entry["dtype"] == "F32":
            values = np.frombuffer(raw, dtype="<f4")
        elif entry["dtype"] == "F16":
            values = np.frombuffer(raw, dtype="<f2").astype(np.float32)
        else:
            values = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        out[name] = (entry["dtype"], tuple(entry["shape"]), values.view(np.uint32))
    return out


def make_cache(path, dtype, seed):
    """Normal values with outlier key channels, plus a run of zeros LZ4 shrinks."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(LAYERS):
        for kind in ("key", "value"):
            values = rng.standard_normal(SHAPE).astype(np.float32)
            if kind == "key":
                values[..., 3] *= 20.0
            values[:, :, 16:32, :] = 0.0 if layer == 0 else values[:, :, 16:32, :]
            tensors[f"layer_{layer}_{kind}"] = (dtype, SHAPE, to_bytes(values, dtype))
    write_safetensors(path, tensors, {"model_name": "reader-test"})


def run(*args):
    proc = subprocess.run([BIN, *args], capture_output=True, text=True)
    assert proc.returncode == 0, f"kv-compress {' '.join(args)}: {proc.stderr}"
    return json.loads(proc.stdout)


def widened_bits(array):
    return array.astype(np.float32).ravel().view(np.uint32)


def test_reader_matches_decompress_for_every_method_and_dtype():
    lz4_seen = set()
    dtype_name = {"F32": np.float32, "F16": np.float16, "BF16": np.float32}
    with tempfile.TemporaryDirectory() as tmp:
        for d, dtype in enumerate(DTYPES):
            src = os.path.join(tmp, f"kv_{dtype}.safetensors")
            make_cache(src, dtype, seed=d)
            for method, flags in METHODS.items():
                packed = os.path.join(tmp, f"{method}_{dtype}.packed.safetensors")
                restored = os.path.join(tmp, f"{method}_{dtype}.restored.safetensors")
                run("-input", src, "-output", packed, *flags)
                run("-decompress", "-input", packed, "-output", restored)
                expected = read_as_f32_bits(restored)
                got = kvformat.load_packed(packed)
                info = kvformat.manifest(packed)
                assert sorted(got) == sorted(expected), (method, dtype)
                for name, (file_dtype, shape, bits) in expected.items():
                    array = got[name]
                    assert file_dtype == dtype and array.shape == shape, (method, name, array.shape)
                    assert array.dtype == dtype_name[dtype], (method, name, array.dtype)
                    mismatch = np.flatnonzero(widened_bits(array) != bits)
                    assert mismatch.size == 0, f"{method} {dtype} {name}: {mismatch.size} values differ from -decompress"
                    if info["tensors"][name]["lz4"]:
                        lz4_seen.add(method)
                assert info["input_metadata"] == {"model_name": "reader-test"}
                print(f"ok   {method} {dtype}")
    assert lz4_seen, "no method produced an LZ4-compressed payload: the LZ4 decoder went untested"
    print(f"ok   LZ4 payloads decoded for {len(lz4_seen)} methods")


def test_format_1_files_still_read():
    """The range-coded ecsq files of format 1 (testdata/golden/format1_*):
    the reader's tensors equal kv-compress -decompress's."""
    names = [line.split()[0] for line in open(os.path.join(GOLDEN, "format1_cases.txt")) if line.strip() and not line.startswith("#")]
    assert len(names) == 2, names
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            packed = os.path.join(GOLDEN, f"{name}.safetensors")
            restored = os.path.join(tmp, f"{name}.restored.safetensors")
            run("-decompress", "-input", packed, "-output", restored)
            got = kvformat.load_packed(packed)
            for tensor, (_, shape, bits) in read_as_f32_bits(restored).items():
                assert got[tensor].shape == shape, (name, tensor)
                assert np.array_equal(widened_bits(got[tensor]), bits), f"{name} {tensor}: differs from -decompress"
            print(f"ok   {name} (format 1)")


def test_corruption_is_an_error_naming_the_file():
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kv.safetensors")
        packed = os.path.join(tmp, "kv.packed.safetensors")
        make_cache(src, "F16", seed=9)
        run("-input", src, "-output", packed)
        data = bytearray(open(packed, "rb").read())
        cases = {
            "payload byte": (len(data) - 10, "checksum mismatch"),
            "manifest byte": (data.index(b"symmetric") + 1, "checksum mismatch"),
        }
        for what, (at, problem) in cases.items():
            bad = os.path.join(tmp, f"bad_{what.replace(' ', '_')}.safetensors")
            corrupted = bytearray(data)
            corrupted[at] ^= 0x01
            open(bad, "wb").write(bytes(corrupted))
            try:
                kvformat.load_packed(bad)
            except kvformat.PackedFileError as error:
                assert bad in str(error) and problem in str(error), (what, str(error))
            else:
                raise AssertionError(f"a flipped {what} was not detected")
        try:
            kvformat.load_packed(src)
        except kvformat.PackedFileError as error:
            assert "not a kv-compress packed file" in str(error), str(error)
        else:
            raise AssertionError("a plain cache was read as a packed file")
    print("ok   corrupted and plain files are errors")


if __name__ == "__main__":
    print(f"kvformat from {os.path.dirname(kvformat.__file__)}, kv-compress {BIN}")
    tests = [(name, fn) for name, fn in sorted(globals().items()) if name.startswith("test_") and callable(fn)]
    for name, fn in tests:
        fn()
        print(f"ok  {name}")
    print(f"{len(tests)} passed")
    sys.exit(0)
