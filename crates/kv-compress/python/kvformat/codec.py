"""Decoding one codec payload to float32, written from docs/format.md
("Codecs"), not from the Rust code: the independent reference the Rust tests
check kv-compress's codec against, bit for bit."""

import math

import numpy as np

from . import engines

MASK64 = (1 << 64) - 1

# docs/format.md, "Codebook grids": the positive Lloyd-Max levels of N(0, 1), as f32.
GAUSSIAN_LEVELS = {
    2: ["0.45278004", "1.5104176"],
    3: ["0.24509418", "0.7560053", "1.3439093", "2.1519456"],
    4: ["0.12839504", "0.3880483", "0.65675914", "0.94234043", "1.2562312", "1.6180464", "2.0690172", "2.7325895"],
}

# Outliers are counted per block of this many grouped values.
OUTLIER_BLOCK = 1 << 16


class PayloadError(ValueError):
    """A payload that does not decode: wrong length or invalid contents."""


def _require(condition, problem):
    if not condition:
        raise PayloadError(problem)


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


class RangeDecoder:
    """docs/format.md, "Range-coded codes" (format 1): LZMA's binary range decoder
    without its first byte, over models with Krichevsky-Trofimov counts."""

    def __init__(self, data):
        _require(len(data) >= 4, "entropy-coded codes end early")
        self.data, self.position = data, 4
        self.range, self.code = 0xFFFFFFFF, int.from_bytes(data[:4], "big")

    def bit(self, model):
        zeros, ones = model
        p_zero = min(max(((2 * zeros + 1) << 12) // (2 * (zeros + ones) + 2), 1), 4095)
        bound = (self.range >> 12) * p_zero
        bit = self.code >= bound
        if bit:
            self.code -= bound
            self.range -= bound
            ones += 1
        else:
            self.range = bound
            zeros += 1
        if zeros + ones >= 1024:
            zeros, ones = (zeros + 1) // 2, (ones + 1) // 2
        model[0], model[1] = zeros, ones
        while self.range < 1 << 24:
            _require(self.position < len(self.data), "entropy-coded codes end early")
            self.range = (self.range << 8) & 0xFFFFFFFF
            self.code = ((self.code << 8) | self.data[self.position]) & 0xFFFFFFFF
            self.position += 1
        return bit

    def integer(self, models):
        """One signed code through one group's models (a dict of [zeros, ones])."""
        get = lambda key: models.setdefault(key, [0, 0])
        if not self.bit(get("nonzero")):
            return 0
        negative = self.bit(get("negative"))
        bucket = 0
        while self.bit(get(("bucket", min(bucket, 15)))):
            bucket += 1
            _require(bucket <= 29, "an entropy-coded code is 2^30 or larger")
        magnitude, node = 1, 1
        for depth in range(bucket):
            if depth < 2:
                bit = self.bit(get(("top", min(bucket, 15), node)))
                node = 2 + bit
            else:
                bit = self.bit(get("low"))
            magnitude = (magnitude << 1) | bit
        return -magnitude if negative else magnitude


def range_coded_codes(data, groups):
    """Format 1's codes: one adaptive model per group."""
    decoder = RangeDecoder(data)
    models = {}
    codes = [decoder.integer(models.setdefault(int(group), {})) for group in groups]
    _require(decoder.position == len(data), "entropy-coded codes have trailing bytes")
    return codes


RANS_LANES, RANS_STATE_LOW, RANS_TOKENS = 8, 1 << 16, 64 + 4 * 25


def rans_coded_codes(data, groups, n_groups):
    """docs/format.md, "rANS-coded codes": the tables, the interleaved
    rANS stream of tokens, and the extra bits of the large codes."""
    at = 0

    def take(n):
        nonlocal at
        _require(at + n <= len(data), "rANS-coded codes end early")
        at += n
        return data[at - n : at]

    count = take(1)[0]
    _require(1 <= count <= 32, "an rANS section has 0 or over 32 tables")
    contexts = list(take(n_groups)) if count > 1 else [0] * n_groups
    _require(all(context < count for context in contexts), "a group's rANS table does not exist")
    tables = []
    for _ in range(count):
        length = take(1)[0]
        _require(1 <= length <= RANS_TOKENS, "an rANS table has 0 or over 164 tokens")
        freq = [int(f) for f in np.frombuffer(take(2 * length), dtype="<u2")]
        _require(sum(freq) == 4096, "an rANS table's frequencies do not sum to 4096")
        cum = [sum(freq[:token]) for token in range(length)]
        slot_token = [token for token in range(length) for _ in range(freq[token])]
        tables.append((freq, cum, slot_token))
    stream = take(int.from_bytes(take(8), "little"))
    _require(len(stream) >= 4 * RANS_LANES and len(stream) % 2 == 0, "an rANS stream is not 8 states and whole 16-bit words")
    states = [int.from_bytes(stream[4 * lane : 4 * lane + 4], "little") for lane in range(RANS_LANES)]
    _require(min(states) >= RANS_STATE_LOW, "an rANS state is below 2^16")
    words, word = stream[4 * RANS_LANES :], 0
    extra, bit = data[at:], 0
    codes = []
    for i, group in enumerate(groups):
        freq, cum, slot_token = tables[contexts[group]]
        x = states[i % RANS_LANES]
        slot = x & 4095
        token = slot_token[slot]
        x = freq[token] * (x >> 12) + slot - cum[token]
        if x < RANS_STATE_LOW:
            _require(word + 2 <= len(words), "rANS-coded codes end early")
            x = (x << 16) | words[word] | words[word + 1] << 8
            word += 2
        states[i % RANS_LANES] = x
        if token < 64:
            z = token
        else:
            length = (token - 64) // 4 + 4
            _require(bit + length <= 8 * len(extra), "the extra bits of ecsq codes end early")
            window = int.from_bytes(extra[bit // 8 : bit // 8 + 5], "little")
            z = ((4 | token & 3) << length) | (window >> bit % 8) & ((1 << length) - 1)
            bit += length
        codes.append((z >> 1) ^ -(z & 1))
    _require(word == len(words), "rANS-coded codes have trailing bytes")
    _require(all(state == RANS_STATE_LOW for state in states), "rANS-coded codes do not end in their initial states")
    used = (bit + 7) // 8
    _require(used == len(extra) and (bit % 8 == 0 or extra[used - 1] >> bit % 8 == 0), "the extra bits of ecsq codes have trailing bits")
    return codes


def decode_ecsq(data, step, offsets, groups, n_groups, coder):
    """Values in group order: offset + q * step in float64, rounded to
    float32; the codes range coded (format 1) or rANS coded (format 2)."""
    if coder == "rans":
        codes = rans_coded_codes(data, groups, n_groups)
    else:
        codes = range_coded_codes(data, groups)
    wide = offsets[groups].astype(np.float64) + np.array(codes, dtype=np.float64) * np.float64(step)
    with np.errstate(over="ignore"):
        decoded = wide.astype(np.float32)
    _require(bool(np.all(np.isfinite(decoded))), "an ecsq value overflows f32")
    return decoded


def gaussian_levels(bits):
    half = np.array([np.float32(level) for level in GAUSSIAN_LEVELS[bits]], dtype=np.float32)
    return np.concatenate([-half[::-1], half])


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


def _positive_normal(scales, dtype):
    tiny = np.finfo(np.float16 if dtype == "<f2" else np.float32).tiny
    return bool(np.all(np.isfinite(scales) & (scales >= tiny)))


def decode(payload, shape, params, layout):
    """One tensor's reconstruction, row-major float32, from its payload and
    the manifest's `codec` (params) and `layout` entries."""
    view = View(shape, params)
    if params.get("grid") in engines.ENGINE_GRIDS:
        return engines.decode(payload, shape, params, layout, view, unpack_codes, _require, walsh_hadamard)
    bits, group_size = params["bits"], params["group_size"]
    _require(bits in (2, 3, 4, 5, 6, 8), f"bits {bits} is not 2, 3, 4, 5, 6 or 8")
    _require(params["grid"] in ("symmetric", "asymmetric", "lloyd", "kmeans", "ecsq"), f"unknown grid {params['grid']}")
    _require(params["axis"] in ("flat", "token", "channel"), f"unknown axis {params['axis']}")
    _require(isinstance(group_size, int) and group_size >= 1, f"group_size {group_size} is not a positive integer")
    order, run_len = view.group_order(params["axis"])
    groups_per_run = math.ceil(run_len / group_size) if run_len else 0
    n_groups = (view.n_q // run_len) * groups_per_run if run_len else 0
    _require(layout["scale_dtype"] in ("f16", "f32"), f"unknown scale_dtype {layout['scale_dtype']}")
    width, dtype = (2, "<f2") if layout["scale_dtype"] == "f16" else (4, "<f4")
    # Manifests written before the dense form existed have no sparse_form: bitmap.
    form = layout.get("sparse_form", "bitmap")
    _require(form in ("bitmap", "dense"), f"unknown sparse_form {form}")
    dropped = math.floor(params["sparsity"] * view.n_q)
    sparse = params["sparsity"] > 0 and form == "bitmap"
    if params["sparsity"] > 0 and form == "dense":
        _require(params["grid"] == "symmetric", "dense sparse form on a grid without an exact zero")
    n_kept = view.n_q - dropped if sparse else view.n_q
    kept_values = view.heads * len(view.kept_tokens) * view.head_dim
    # Outliers: floor(F * block length) per block of 65536 grouped values.
    fraction = params.get("outliers", 0.0)
    block_lengths = [min(OUTLIER_BLOCK, view.n_q - start) for start in range(0, view.n_q, OUTLIER_BLOCK)]
    per_block = [math.floor(length * fraction) for length in block_lengths]
    n_outliers = sum(per_block)
    asymmetric = params["grid"] == "asymmetric"
    codebook = params["grid"] in ("lloyd", "kmeans")
    ecsq = params["grid"] == "ecsq"
    _require(not codebook or bits <= 4, f"the {params['grid']} grid has no {bits}-bit codebook")
    _require(not ecsq or (params["sparsity"] == 0 and fraction == 0), "ecsq with sparsity or outliers")
    coded_bytes = layout.get("coded_bytes")
    _require((coded_bytes is not None) == ecsq, "coded_bytes is for the ecsq grid, and only it")
    coder = layout.get("coder", "range" if ecsq else None)
    _require(coder in (("range", "rans") if ecsq else (None,)), f"coder {coder!r} is not one of the ecsq grid's")
    sizes = [
        0 if ecsq else n_groups * width,
        n_groups * width if asymmetric or ecsq else 0,
        2 * (1 << bits) if params["grid"] == "kmeans" else 4 if ecsq else 0,
        2 * kept_values,
        math.ceil(view.n_q / 8) if sparse else 0,
        coded_bytes if ecsq else math.ceil(n_kept * bits / 8),
        4 * n_outliers,
    ]
    _require(len(payload) == sum(sizes), f"payload is {len(payload)} bytes, the codec needs {sum(sizes)}")
    sections, at = [], 0
    for size in sizes:
        sections.append(payload[at : at + size])
        at += size
    scales = np.frombuffer(sections[0], dtype=dtype).astype(np.float32)
    _require(_positive_normal(scales, dtype), "a scale is not a positive normal number")
    offsets = np.frombuffer(sections[1], dtype=dtype).astype(np.float32)
    _require(bool(np.all(np.isfinite(offsets))), "an offset is not finite")
    if params["grid"] == "kmeans":
        levels = np.frombuffer(sections[2], dtype="<f2").astype(np.float32)
        _require(bool(np.all(np.isfinite(levels)) and np.all(np.diff(levels) >= 0)), "codebook levels not finite and ascending")
    elif codebook:
        levels = gaussian_levels(bits)
    elif ecsq:
        step = np.frombuffer(sections[2], dtype="<f4")[0]
        _require(bool(np.isfinite(step) and step >= np.finfo(np.float32).tiny), "the ecsq step is not a positive normal number")
    sections.pop(2)
    kept = np.frombuffer(sections[2], dtype="<f2").astype(np.float32)
    _require(bool(np.all(np.isfinite(kept))), "a kept-token value is not finite")
    if sparse:
        bitmap = np.unpackbits(np.frombuffer(sections[3], dtype=np.uint8), bitorder="little")
        _require(not bitmap[view.n_q :].any(), "bitmap padding bits are not zero")
        stored = bitmap[: view.n_q].astype(bool)
    else:
        stored = np.ones(view.n_q, dtype=bool)
    _require(int(stored.sum()) == n_kept, f"bitmap keeps {int(stored.sum())} values, the sparsity keeps {n_kept}")
    codes = None if ecsq else unpack_codes(sections[4], n_kept, bits)
    if params["sparsity"] > 0 and not sparse:
        # Dense form: dropped values hold the code of 0, so at least that many do.
        _require(np.count_nonzero(codes == 1 << (bits - 1)) >= dropped, "too few zero codes for the dropped values")

    position = np.arange(view.n_q)
    group_of_position = (position // run_len) * groups_per_run + (position % run_len) // group_size if run_len else position
    stored_positions = np.flatnonzero(stored[order])
    groups = group_of_position[stored_positions]
    limit = np.finfo(np.float32).max
    if ecsq:
        decoded = decode_ecsq(sections[4], step, offsets, groups, n_groups, coder)
    elif codebook:
        with np.errstate(over="ignore"):
            decoded = np.clip(levels[codes] * scales[groups], -limit, limit)
    elif asymmetric:
        wide = codes.astype(np.float64) * scales[groups].astype(np.float64) + offsets[groups].astype(np.float64)
        decoded = np.clip(wide, -float(limit), float(limit)).astype(np.float32)
    else:
        with np.errstate(over="ignore"):
            decoded = np.clip((codes - (1 << (bits - 1))).astype(np.float32) * scales[groups], -limit, limit)
    in_group_order = np.zeros(view.n_q, dtype=np.float32)
    in_group_order[stored_positions] = decoded
    if n_outliers:
        outlier_offsets = np.frombuffer(sections[5][: 2 * n_outliers], dtype="<u2").astype(np.int64)
        values = np.frombuffer(sections[5][2 * n_outliers :], dtype="<f2").astype(np.float32)
        _require(bool(np.all(np.isfinite(values))), "an outlier value is not finite")
        bounds = np.cumsum([0] + per_block)
        for block, length in enumerate(block_lengths):
            within = outlier_offsets[bounds[block] : bounds[block + 1]]
            _require(bool(np.all(within < length) and np.all(np.diff(within) > 0)), "outlier offsets out of their block or not ascending")
        block_starts = np.repeat(np.arange(len(per_block)) * OUTLIER_BLOCK, per_block)
        in_group_order[block_starts + outlier_offsets] = values
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
