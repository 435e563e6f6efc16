"""A seeded Rademacher random projection R (P x d, entries +-1/sqrt(d)) that is never held whole.

Entry R[p, j] is a pure function of (seed, p, j): the sign is bit j mod 32 of the 32-bit integer hash
(`mix32`, the "lowbias32" finaliser) of hash(seed, p) XOR hash(seed, j div 32), so one hash gives 32 signs.
It is computed with 64-bit integer tensor arithmetic that never overflows, so every device, machine, worker
count and chunk size gives the same matrix, and rows can be generated for any range [start, stop) on their
own. `project` multiplies the gradients chunk by chunk (`chunk_rows` rows of R at a time); when the whole of R
fits the cache budget (by default 2 GiB on CPU, as float32; a quarter of a GPU's memory, as int8 signs turned
into float32 one chunk at a time) the chunks are kept after their first use.

E[R R^T] = I (the entries are independent, mean 0, variance 1/d), so norms and inner products are preserved
in expectation, within the Johnson-Lindenstrauss tolerance O(sqrt(1/d)) for one pair of vectors.
"""

from __future__ import annotations

import math

import torch

MASK32 = 0xFFFFFFFF
GENERATED_ENTRIES = {"cpu": 1 << 22, "cuda": 1 << 26}  # entries per chunk: int64 temporaries of 32 MB / 512 MB
CPU_CACHE_BYTES = 2 << 30
BIT = torch.arange(32, dtype=torch.int64)


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """x * constant mod 2^32 for int64 x in [0, 2^32), through 16-bit halves of the constant (no overflow)."""
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The lowbias32 integer hash of int64 values in [0, 2^32): every output bit depends on every input bit."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _index_hash(indices: torch.Tensor, salt: int) -> torch.Tensor:
    return mix32(mix32(indices & MASK32) ^ salt)


class RademacherProjection:
    """x (B, P) -> x R (B, d) for the seeded Rademacher matrix R described in the module docstring."""

    def __init__(
        self,
        num_params: int,
        dim: int,
        seed: int,
        chunk_rows: int | None = None,
        cache_bytes: int | None = None,
    ):
        if num_params <= 0 or dim <= 0:
            raise ValueError(f"projection needs num_params > 0 and dim > 0, got {num_params} and {dim}")
        if num_params >= 1 << 32:
            raise ValueError(f"num_params={num_params} exceeds the 2^32 rows the hash addresses")
        self.num_params, self.dim, self.seed = num_params, dim, seed
        self.chunk_rows, self.cache_bytes = chunk_rows, cache_bytes
        self._cache: dict[tuple[int, str], torch.Tensor] = {}
        seed_hash = int(mix32(torch.tensor([seed & MASK32]))[0])
        self._row_salt = int(mix32(torch.tensor([seed_hash ^ 0x9E3779B9]))[0])
        self._column_salt = int(mix32(torch.tensor([seed_hash ^ 0x85EBCA6B]))[0])

    def signs(self, start: int, stop: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The signs of R[start:stop] (+1 / -1, int8), generated on `device`."""
        words = -(-self.dim // 32)
        row_hash = _index_hash(torch.arange(start, stop, device=device, dtype=torch.int64), self._row_salt)
        word_hash = _index_hash(torch.arange(words, device=device, dtype=torch.int64), self._column_salt)
        hashed = mix32(row_hash[:, None] ^ word_hash[None, :])  # (rows, words): 32 signs each
        bits = (hashed[:, :, None] >> BIT.to(device)) & 1
        return (bits.reshape(stop - start, words * 32)[:, : self.dim] * 2 - 1).to(torch.int8)

    def rows(self, start: int, stop: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """R[start:stop] as float32 on `device`."""
        return self.signs(start, stop, device).to(torch.float32) * (1.0 / math.sqrt(self.dim))

    def _chunk_rows(self, device: torch.device) -> int:
        return self.chunk_rows or max(1, GENERATED_ENTRIES["cuda" if device.type == "cuda" else "cpu"] // self.dim)

    def _cache_dtype(self, device: torch.device) -> torch.dtype | None:
        """What cached chunks are kept as on `device` (int8 signs on GPUs, float32 on CPU), or None: no cache."""
        dtype = torch.int8 if device.type == "cuda" else torch.float32
        budget = self.cache_bytes
        if budget is None and device.type == "cuda":
            budget = torch.cuda.get_device_properties(device).total_memory // 4
        budget = CPU_CACHE_BYTES if budget is None else budget
        return dtype if self.num_params * self.dim * dtype.itemsize <= budget else None

    def _chunk(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        """The signs of R[start:stop] as float32: from the cache, else generated (and cached when R fits)."""
        key = (start, str(device))
        chunk = self._cache.get(key)
        if chunk is None:
            chunk = self.signs(start, stop, device)
            dtype = self._cache_dtype(device)
            if dtype is not None:
                self._cache[key] = chunk = chunk.to(dtype)
        return chunk.to(torch.float32)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(B, P) float -> (B, d) float32, accumulated over row chunks of R."""
        if x.shape[-1] != self.num_params:
            raise ValueError(f"expected vectors of {self.num_params} values, got {x.shape[-1]}")
        x = x.float()
        out = torch.zeros(x.shape[0], self.dim, device=x.device, dtype=torch.float32)
        step = self._chunk_rows(x.device)
        for start in range(0, self.num_params, step):
            stop = min(start + step, self.num_params)
            out.addmm_(x[:, start:stop], self._chunk(start, stop, x.device))
        return out.mul_(1.0 / math.sqrt(self.dim))
