"""Fixed-width bit packing of unsigned integers (lossless; ceil(n * bits / 8) bytes)."""

from __future__ import annotations

import math

import numpy as np


def bits_for(n_symbols: int) -> int:
    """Bits per symbol for ``n_symbols`` distinct values: ceil(log2 n), at least 1."""
    return max(1, math.ceil(math.log2(n_symbols)))


def packed_nbytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack(values: np.ndarray, bits: int) -> bytes:
    """Pack ``values`` (non-negative, < 2**bits) at ``bits`` bits each, little-endian bits
    (value i at bits [i * bits, (i + 1) * bits) of the stream); the groups of :func:`unpack`,
    written column by column."""
    v = np.asarray(values).ravel()
    if v.size and (v.min() < 0 or int(v.max()) >= 1 << bits):
        raise ValueError(f"values must lie in [0, {1 << bits}) to pack at {bits} bits")
    if bits > WORD_BITS:
        v = v.astype(np.uint64)
        shifts = np.arange(bits, dtype=np.uint64)
        bit_matrix = ((v[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
        return np.packbits(bit_matrix.ravel(), bitorder="little").tobytes()
    per_group = 8 // math.gcd(bits, 8)
    group_bytes = bits * per_group // 8
    groups = -(-v.size // per_group)
    wide = np.uint32 if bits + 7 <= 32 else np.uint64
    grid = np.zeros(groups * per_group, dtype=wide)
    grid[: v.size] = v
    grid = grid.reshape(groups, per_group)
    cols = np.zeros((groups, group_bytes), dtype=np.uint8)
    for j in range(per_group):
        first, shift = divmod(j * bits, 8)
        word = grid[:, j] << wide(shift)
        for k in range((shift + bits + 7) // 8):
            cols[:, first + k] |= ((word >> wide(8 * k)) & wide(0xFF)).astype(np.uint8)
    return cols.tobytes()[: packed_nbytes(v.size, bits)]


WORD_BITS = 57  # widest value one unaligned 64-bit read holds at any bit offset (64 - 7)


def unpack(data: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack`: ``count`` values as int64.

    Vectorised over values: the bit stream repeats its layout every ``lcm(bits, 8)`` bits,
    a group of ``g = 8 / gcd(bits, 8)`` values in ``bits * g / 8`` bytes. Viewing the bytes as
    (groups, bytes per group), value j of every group is the same few byte columns shifted
    and masked: ~``g * ceil((bits + 7) / 8)`` whole-column operations, never one array op
    per bit. Widths over :data:`WORD_BITS` (not used by the suite) take the per-bit path.
    """
    if packed_nbytes(count, bits) > len(data):
        raise ValueError(f"{len(data)} bytes hold fewer than {count} values of {bits} bits")
    if bits > WORD_BITS:
        flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
        bit_matrix = flat[: count * bits].reshape(count, bits).astype(np.int64)
        return (bit_matrix << np.arange(bits, dtype=np.int64)).sum(axis=1)
    per_group = 8 // math.gcd(bits, 8)
    group_bytes = bits * per_group // 8
    groups = -(-count // per_group)
    raw = np.frombuffer(data, dtype=np.uint8)[: groups * group_bytes]
    if raw.size < groups * group_bytes:  # the last group's unused tail was not written
        raw = np.concatenate([raw, np.zeros(groups * group_bytes - raw.size, np.uint8)])
    cols = raw.reshape(groups, group_bytes)
    wide = np.uint32 if bits + 7 <= 32 else np.uint64  # a word that holds any value's bytes
    out = np.empty((groups, per_group), dtype=wide)
    mask = wide((1 << bits) - 1)
    for j in range(per_group):
        first, shift = divmod(j * bits, 8)
        word = cols[:, first].astype(wide)
        for k in range(1, (shift + bits + 7) // 8):
            word |= cols[:, first + k].astype(wide) << wide(8 * k)
        out[:, j] = (word >> wide(shift)) & mask
    return out.reshape(-1)[:count].astype(np.int64)
