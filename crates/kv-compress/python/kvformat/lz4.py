"""The LZ4 block format (no frame, no size prefix), decompression only:
what docs/format.md's "Stored bytes and LZ4" needs, in pure Python."""


class Lz4Error(ValueError):
    """A block that is malformed or does not decompress to the expected size."""


def decompress_block(block, raw_len):
    """Decompresses one LZ4 block that must yield exactly `raw_len` bytes."""
    src = memoryview(bytes(block))
    out = bytearray()
    at, end = 0, len(src)
    while at < end:
        token = src[at]
        at += 1
        literals = token >> 4
        if literals == 15:
            while True:
                if at >= end:
                    raise Lz4Error("block ends inside a literal length")
                extra = src[at]
                at += 1
                literals += extra
                if extra != 255:
                    break
        if at + literals > end:
            raise Lz4Error("literals run past the end of the block")
        out += src[at : at + literals]
        at += literals
        if len(out) > raw_len:
            raise Lz4Error(f"block decompresses to more than {raw_len} bytes")
        if at == end:
            break  # the last sequence has literals only
        if at + 2 > end:
            raise Lz4Error("block ends inside a match offset")
        offset = src[at] | (src[at + 1] << 8)
        at += 2
        if offset == 0 or offset > len(out):
            raise Lz4Error(f"match offset {offset} outside the {len(out)} bytes decoded so far")
        length = (token & 15) + 4
        if token & 15 == 15:
            while True:
                if at >= end:
                    raise Lz4Error("block ends inside a match length")
                extra = src[at]
                at += 1
                length += extra
                if extra != 255:
                    break
        if len(out) + length > raw_len:
            raise Lz4Error(f"block decompresses to more than {raw_len} bytes")
        start = len(out) - offset
        if length <= offset:
            out += out[start : start + length]
        else:  # an overlapping match repeats the last `offset` bytes
            pattern = bytes(out[start:])
            repeats = -(-length // offset)
            out += (pattern * repeats)[:length]
    if len(out) != raw_len:
        raise Lz4Error(f"block decompresses to {len(out)} bytes, raw_len is {raw_len}")
    return bytes(out)
