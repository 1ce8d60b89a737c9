"""Read kv-compress packed files with numpy alone.

    import kvformat
    tensors = kvformat.load_packed("kv_cache.int4.safetensors")  # {name: np.ndarray}
    info = kvformat.manifest("kv_cache.int4.safetensors")        # codec, sizes, metrics per tensor

A pure-numpy implementation of docs/format.md's reader rules, written from
that page and not from the Rust code: the same checks in the same order (the
container, the manifest's checksum, every payload's CRC-32, LZ4, the codec)
and the same reconstruction as `kv-compress -decompress`, bit for bit. The
Rust tests hold the two to that.
"""

import json
import zlib

import numpy as np

from . import lz4, safetensors_file
from .codec import PayloadError, decode
from .lz4 import Lz4Error
from .safetensors_file import SafetensorsError

__all__ = ["load_packed", "manifest", "decode", "PackedFileError"]

# The versions this reads; a file has "2" only if a tensor is rANS coded.
FORMAT_VERSIONS = ("1", "2")
MANIFEST_KEY = "kvformat.manifest"
FORMAT_VERSION_KEY = "kvformat.format_version"
MANIFEST_CRC_KEY = "kvformat.manifest_crc32"
TORCH_NAMES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
# A codec payload holds at most 8 bytes per value plus 64 KiB (docs/format.md, reader rule 4).
MAX_RAW_BYTES_PER_VALUE = 8
MAX_RAW_OVERHEAD_BYTES = 1 << 16


class PackedFileError(ValueError):
    """A file that is not a valid kv-compress packed file; the message names
    the file, the tensor where there is one, and the problem."""


def _open(path):
    """Reader rules 1 to 4: the validated manifest and the stored tensors."""
    try:
        metadata, tensors = safetensors_file.read(path)
    except SafetensorsError as error:
        raise PackedFileError(str(error)) from None
    text = metadata.get(MANIFEST_KEY)
    if text is None:
        raise PackedFileError(f"{path}: not a kv-compress packed file (no {MANIFEST_KEY} in __metadata__)")
    if metadata.get(FORMAT_VERSION_KEY) not in FORMAT_VERSIONS:
        raise PackedFileError(f"{path}: unsupported {FORMAT_VERSION_KEY} {metadata.get(FORMAT_VERSION_KEY)!r} (this reads {' and '.join(map(repr, FORMAT_VERSIONS))}): a newer kv-compress wrote it; read it with the kvformat of that version")
    crc = "%08x" % zlib.crc32(text.encode("utf-8"))
    if metadata.get(MANIFEST_CRC_KEY) != crc:
        raise PackedFileError(f"{path}: manifest checksum mismatch (stored {metadata.get(MANIFEST_CRC_KEY)!r}, manifest has {crc}): the file is corrupted")
    try:
        parsed = json.loads(text)
        entries, input_metadata = parsed["tensors"], parsed["input_metadata"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise PackedFileError(f"{path}: manifest is not valid: {error}") from None
    expected = dict(input_metadata)
    if entries:
        first = entries[min(entries)]
        expected.update(
            compression=f"int{first['codec']['bits']}",
            group_size=str(first["codec"]["group_size"]),
            original_dtype=TORCH_NAMES.get(first["dtype"], first["dtype"]),
        )
    rans = any(entry.get("layout", {}).get("coder") == "rans" for entry in entries.values() if isinstance(entry, dict))
    expected.update({FORMAT_VERSION_KEY: FORMAT_VERSIONS[rans], MANIFEST_KEY: text, MANIFEST_CRC_KEY: crc})
    if expected != metadata:
        raise PackedFileError(f"{path}: __metadata__ does not match the manifest (a carried key was altered): the file is corrupted")
    if sorted(tensors) != sorted(entries):
        extra = sorted(set(tensors) ^ set(entries))
        raise PackedFileError(f"{path}: tensor {extra[0]!r}: in the file or the manifest but not both")
    for name, entry in entries.items():
        dtype, shape, _ = tensors[name]
        problem = _implausible(entry) if (dtype, shape) == ("U8", [entry["stored_len"]]) else (
            f"stored as {dtype} {shape}, the manifest says U8 [{entry['stored_len']}]"
        )
        if problem:
            raise PackedFileError(f"{path}: tensor {name!r}: {problem}")
    return parsed, {name: stored for name, (_, _, stored) in tensors.items()}


def _implausible(entry):
    if entry["dtype"] not in TORCH_NAMES:
        return f"dtype {entry['dtype']!r} is not f32, f16 or bf16"
    values = int(np.prod(entry["shape"], dtype=np.int64)) if entry["shape"] else 1
    if entry["raw_len"] > values * MAX_RAW_BYTES_PER_VALUE + MAX_RAW_OVERHEAD_BYTES:
        return f"raw_len {entry['raw_len']} is implausible for {values} values"
    if not entry["lz4"] and entry["raw_len"] != entry["stored_len"]:
        return f"uncompressed payload with raw_len {entry['raw_len']} != stored_len {entry['stored_len']}"
    return None


def manifest(path):
    """The packed file's manifest, after checking it (reader rules 1 to 4):
    {"tensors": {name: {"dtype", "shape", "codec", "layout", "lz4", "raw_len",
    "stored_len", "crc32", "metrics"}}, "input_metadata": {...}}."""
    return _open(path)[0]


def to_dtype(values, dtype):
    """The f32 reconstruction in the input dtype, rounded to nearest even and
    saturating at the dtype's largest finite value (reader rule 6). numpy has
    no bfloat16: bf16 tensors come back as float32 holding exactly the bf16
    values (each bf16 is a float32 with the low 16 bits zero)."""
    if dtype == "f32":
        return values
    if dtype == "f16":
        largest = np.float32(np.finfo(np.float16).max)
        return np.clip(values, -largest, largest).astype(np.float16)
    bits = values.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint32)
    overflowed = (rounded & 0x7FFF) == 0x7F80
    rounded = np.where(overflowed, (rounded & 0x8000) | 0x7F7F, rounded)
    return (rounded << 16).astype(np.uint32).view(np.float32)


def load_packed(path):
    """Every tensor of a kv-compress packed file, decoded: {name: array} in
    the input's shape and dtype (float32, float16; bfloat16 as float32), equal
    bit for bit to what `kv-compress -decompress` writes. Raises
    PackedFileError naming the file, tensor and problem."""
    parsed, stored = _open(path)
    tensors = {}
    for name in sorted(parsed["tensors"]):
        entry = parsed["tensors"][name]
        data = stored[name]
        if zlib.crc32(data) != entry["crc32"]:
            raise PackedFileError(f"{path}: tensor {name!r}: checksum mismatch: the file is corrupted")
        try:
            payload = lz4.decompress_block(data, entry["raw_len"]) if entry["lz4"] else data
            values = decode(payload, entry["shape"], entry["codec"], entry["layout"])
        except (Lz4Error, PayloadError, KeyError, TypeError) as error:
            raise PackedFileError(f"{path}: tensor {name!r}: {error}") from None
        tensors[name] = to_dtype(values, entry["dtype"]).reshape(entry["shape"])
    return tensors
