"""Lossless index codecs: fixed-width bit packing, per-layer entropy coding (rANS), and
deltas against the previous task's indices.

``fixed``: all layers' indices concatenated and packed at ceil(log2 n) bits each, so a task
costs exactly ceil(9 x indices / 8) bytes for n = 512. ``entropy``: per layer, the index
histogram (packed at the width of its largest count) and an ANS stream under that
histogram's categorical model (``constriction``); layer sizes come from the architecture.

``delta`` (the suite's extension, not the paper's): a task coded against the indices of the
task before it (:func:`encode_delta`); see that function for the layout. A task stored this
way needs the previous task's indices to decode (``benchmarks.methods.nws_method`` walks the chain).
"""

from __future__ import annotations

import struct

import numpy as np

from nws.bitpack import bits_for, pack, packed_nbytes, unpack

CODECS = ("fixed", "entropy")  # stand-alone: a task decodes from its own bytes
DELTA = "delta"
TASK_CODECS = (*CODECS, DELTA)  # what the NWS method's ``codec`` option accepts


def empirical_entropy_bits(layers: list[np.ndarray], n: int) -> float:
    """Bits per index of an ideal per-layer frequency model: sum_l d_l H_l / sum_l d_l."""
    total = sum(len(a) for a in layers)
    bits = 0.0
    for a in layers:
        p = np.bincount(a, minlength=n) / max(len(a), 1)
        p = p[p > 0]
        bits += -len(a) * float((p * np.log2(p)).sum())
    return bits / max(total, 1)


def _entropy0_bits(values: np.ndarray, n: int) -> float:
    """Total bits of ``values`` under their own empirical frequencies (order 0)."""
    if not len(values):
        return 0.0
    p = np.bincount(values, minlength=n) / len(values)
    p = p[p > 0]
    return -len(values) * float((p * np.log2(p)).sum())


def fixed_nbytes(counts: list[int], n: int) -> int:
    return packed_nbytes(sum(counts), bits_for(n))


def encode_fixed(layers: list[np.ndarray], n: int) -> bytes:
    return pack(np.concatenate(layers) if layers else np.zeros(0, np.int64), bits_for(n))


def decode_fixed(data: bytes, counts: list[int], n: int) -> list[np.ndarray]:
    flat = unpack(data, bits_for(n), sum(counts))
    return np.split(flat, np.cumsum(counts)[:-1])


def _categorical(hist: np.ndarray):
    import constriction

    return constriction.stream.model.Categorical(hist.astype(np.float64), perfect=False)


def encode_entropy(layers: list[np.ndarray], n: int) -> bytes:
    import constriction

    out = []
    for a in layers:
        hist = np.bincount(a, minlength=n)
        width = bits_for(int(hist.max()) + 1) if len(a) else 1
        coder = constriction.stream.stack.AnsCoder()
        if len(a):
            coder.encode_reverse(a.astype(np.int32), _categorical(hist))
        words = coder.get_compressed()
        out += [struct.pack("<BI", width, len(words)), pack(hist, width),
                words.astype("<u4").tobytes()]
    return b"".join(out)


def decode_entropy(data: bytes, counts: list[int], n: int) -> list[np.ndarray]:
    import constriction

    layers, pos = [], 0
    for count in counts:
        width, nwords = struct.unpack_from("<BI", data, pos)
        pos += 5
        size = packed_nbytes(n, width)
        hist = unpack(data[pos : pos + size], width, n)
        pos += size
        words = np.frombuffer(data[pos : pos + 4 * nwords], dtype="<u4").astype(np.uint32)
        pos += 4 * nwords
        if count:
            coder = constriction.stream.stack.AnsCoder(words)
            layers.append(coder.decode(_categorical(hist), count).astype(np.int64))
        else:
            layers.append(np.zeros(0, np.int64))
    if pos != len(data):
        raise ValueError(f"entropy-coded indices: {len(data) - pos} trailing bytes")
    return layers


# -- delta: a task against the task before it ----------------------------------------------
#
# Per layer l with d indices, against the previous task's d' indices (the head may have
# another size when class counts differ; rows are kept in order, so the first min(d, d')
# positions correspond and positions >= d' are new):
#
#   <I c          positions among the first m = min(d, d') whose index changed
#   <B model      how the new values are coded: 0 uniform over n, 1 their own histogram
#                 (packed as in ``entropy``: <B width + n counts), 2 the histogram of the
#                 previous task's layer (known to the decoder, costs nothing)
#   <I words      then the ANS stream: the change mask (m bits, under the static binary model
#                 c/m; left out when c is 0 or m) and the new values (c changed positions in
#                 order, then the d - m new positions) under the chosen model.
#
# The encoder tries the three value models and keeps the smallest stream. The reference it
# is measured against is :func:`delta_entropy_bits`.

_UNIFORM, _OWN_HISTOGRAM, _PREV_HISTOGRAM = 0, 1, 2


def _changes(layer: np.ndarray, prev: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(change mask over the common prefix, new values: changed positions then the tail)."""
    m = min(len(layer), len(prev))
    mask = layer[:m] != prev[:m]
    return mask, np.concatenate([layer[:m][mask], layer[m:]])


def delta_entropy_bits(layers: list[np.ndarray], prev: list[np.ndarray], n: int) -> float:
    """The delta codec's reference, bits per index: per layer, the order-0 entropy of the
    change mask plus that of the new values (sum_l [m_l H2(c_l / m_l) + N_l H_l(values)]),
    over all indices of the task."""
    _check_layers(layers, prev)
    total = sum(len(a) for a in layers)
    bits = 0.0
    for a, b in zip(layers, prev, strict=True):
        mask, values = _changes(a, b)
        bits += _entropy0_bits(mask.astype(np.int64), 2) + _entropy0_bits(values, n)
    return bits / max(total, 1)


def changed_fraction(layers: list[np.ndarray], prev: list[np.ndarray]) -> float:
    """Share of the task's indices that differ from the previous task's (new head rows
    count as changed)."""
    _check_layers(layers, prev)
    total = sum(len(a) for a in layers)
    changed = sum(len(_changes(a, b)[1]) for a, b in zip(layers, prev, strict=True))
    return changed / max(total, 1)


def _check_layers(layers: list[np.ndarray], prev: list[np.ndarray]) -> None:
    if len(layers) != len(prev):
        raise ValueError(f"delta codec: the task has {len(layers)} layers, the previous task "
                         f"{len(prev)}: a delta needs the same architecture")


def _values_model(kind: int, values: np.ndarray, prev: np.ndarray, n: int):
    import constriction

    if kind == _UNIFORM:
        return constriction.stream.model.Uniform(n)
    if kind == _OWN_HISTOGRAM:
        return _categorical(np.bincount(values, minlength=n))
    return _categorical(np.bincount(prev, minlength=n) + 0.5)  # every entry codable


def _ans_words(values: np.ndarray, model, mask: np.ndarray | None, mask_model) -> np.ndarray:
    import constriction

    coder = constriction.stream.stack.AnsCoder()
    if len(values):
        coder.encode_reverse(values.astype(np.int32), model)
    if mask is not None:  # a stack: encoded last, decoded first
        coder.encode_reverse(mask.astype(np.int32), mask_model)
    return coder.get_compressed()


def encode_delta(layers: list[np.ndarray], prev: list[np.ndarray], n: int) -> bytes:
    """The layers of a task as changes against ``prev`` (the previous task's layers)."""
    _check_layers(layers, prev)
    out = []
    for a, b in zip(layers, prev, strict=True):
        mask, values = _changes(a, b)
        c, m = int(mask.sum()), len(mask)
        coded_mask = mask if 0 < c < m else None
        mask_model = _categorical(np.array([m - c, c])) if coded_mask is not None else None
        best = None
        for kind in (_UNIFORM, _OWN_HISTOGRAM, _PREV_HISTOGRAM):
            if kind != _UNIFORM and not (len(values) and len(b)):
                continue  # nothing to model, or no previous layer to take a histogram of
            words = _ans_words(values, _values_model(kind, values, b, n), coded_mask,
                               mask_model)
            head = struct.pack("<IB", c, kind)
            if kind == _OWN_HISTOGRAM:
                hist = np.bincount(values, minlength=n)
                width = bits_for(int(hist.max()) + 1) if len(values) else 1
                head += struct.pack("<B", width) + pack(hist, width)
            blob = head + struct.pack("<I", len(words)) + words.astype("<u4").tobytes()
            if best is None or len(blob) < len(best):
                best = blob
        out.append(best)
    return b"".join(out)


def decode_delta(data: bytes, counts: list[int], prev: list[np.ndarray],
                 n: int) -> list[np.ndarray]:
    """Inverse of :func:`encode_delta`: the task's layers (int64), ``counts`` indices each."""
    import constriction

    if len(counts) != len(prev):
        raise ValueError(f"delta codec: {len(counts)} layers to decode against a previous "
                         f"task of {len(prev)} layers")
    layers, pos = [], 0
    for count, b in zip(counts, prev, strict=True):
        c, kind = struct.unpack_from("<IB", data, pos)
        pos += 5
        hist = None
        if kind == _OWN_HISTOGRAM:
            (width,) = struct.unpack_from("<B", data, pos)
            size = packed_nbytes(n, width)
            hist = unpack(data[pos + 1 : pos + 1 + size], width, n)
            pos += 1 + size
        elif kind not in (_UNIFORM, _PREV_HISTOGRAM):
            raise ValueError(f"delta-coded indices: unknown value model {kind} at byte {pos}")
        (nwords,) = struct.unpack_from("<I", data, pos)
        pos += 4
        words = np.frombuffer(data[pos : pos + 4 * nwords], dtype="<u4").astype(np.uint32)
        pos += 4 * nwords
        m = min(count, len(b))
        coder = constriction.stream.stack.AnsCoder(words)
        if 0 < c < m:
            mask = coder.decode(_categorical(np.array([m - c, c])), m).astype(bool)
        else:
            mask = np.full(m, c == m and m > 0)
        new = c + count - m
        if kind == _OWN_HISTOGRAM:
            model = _categorical(hist)
        else:
            model = _values_model(kind, np.zeros(0, np.int64), b, n)
        values = coder.decode(model, new).astype(np.int64) if new else np.zeros(0, np.int64)
        layer = np.empty(count, np.int64)
        layer[:m] = b[:m]
        layer[:m][mask] = values[:c]
        layer[m:] = values[c:]
        layers.append(layer)
    if pos != len(data):
        raise ValueError(f"delta-coded indices: {len(data) - pos} trailing bytes")
    return layers


def encode(layers: list[np.ndarray], n: int, codec: str) -> bytes:
    if codec == "fixed":
        return encode_fixed(layers, n)
    if codec == "entropy":
        return encode_entropy(layers, n)
    raise ValueError(f"unknown codec {codec!r}; valid: {CODECS}")


def decode(data: bytes, counts: list[int], n: int, codec: str) -> list[np.ndarray]:
    if codec == "fixed":
        return decode_fixed(data, counts, n)
    if codec == "entropy":
        return decode_entropy(data, counts, n)
    raise ValueError(f"unknown codec {codec!r}; valid: {CODECS}")
