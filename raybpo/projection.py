"""A seeded Rademacher random projection R (P x d, entries +-1/sqrt(d)) that is never held whole.

Entry R[p, j] is a pure function of (seed, p, j): the sign is the top bit of a 32-bit integer hash
(`mix32`, the "lowbias32" finaliser) of hash(seed, p) XOR hash(seed, j). It is computed with 64-bit integer
tensor arithmetic that never overflows, so every device, machine, worker count and chunk size gives the same
matrix, and rows can be generated for any range [start, stop) on their own. `project` multiplies the
gradients chunk by chunk (`chunk_rows` rows of R at a time); when the whole of R is small enough
(`cache_bytes`) the chunks are kept after the first use.

E[R R^T] = I (the entries are independent, mean 0, variance 1/d), so norms and inner products are preserved
in expectation, within the Johnson-Lindenstrauss tolerance O(sqrt(1/d)) for one pair of vectors.
"""

from __future__ import annotations

import math

import torch

MASK32 = 0xFFFFFFFF
GENERATED_ENTRIES = 1 << 22  # entries of R generated per chunk (bounds the int64 temporaries to ~32 MB each)


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
        cache_bytes: int = 1 << 30,
    ):
        if num_params <= 0 or dim <= 0:
            raise ValueError(f"projection needs num_params > 0 and dim > 0, got {num_params} and {dim}")
        if num_params >= 1 << 32:
            raise ValueError(f"num_params={num_params} exceeds the 2^32 rows the hash addresses")
        self.num_params, self.dim, self.seed = num_params, dim, seed
        self.chunk_rows = chunk_rows or max(1, GENERATED_ENTRIES // dim)
        self.cache = num_params * dim * 4 <= cache_bytes
        self._chunks: dict[tuple[int, str], torch.Tensor] = {}
        seed_hash = int(mix32(torch.tensor([seed & MASK32]))[0])
        self._row_salt = int(mix32(torch.tensor([seed_hash ^ 0x9E3779B9]))[0])
        self._column_salt = int(mix32(torch.tensor([seed_hash ^ 0x85EBCA6B]))[0])

    def rows(self, start: int, stop: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """R[start:stop] as float32 on `device` (generated there)."""
        row_hash = _index_hash(torch.arange(start, stop, device=device, dtype=torch.int64), self._row_salt)
        column_hash = _index_hash(torch.arange(self.dim, device=device, dtype=torch.int64), self._column_salt)
        bits = (mix32(row_hash[:, None] ^ column_hash[None, :]) >> 31).to(torch.float32)
        return (bits * 2.0 - 1.0) * (1.0 / math.sqrt(self.dim))

    def _chunk(self, start: int, device: torch.device) -> torch.Tensor:
        stop = min(start + self.chunk_rows, self.num_params)
        key = (start, str(device))
        if key in self._chunks:
            return self._chunks[key]
        chunk = self.rows(start, stop, device)
        if self.cache:
            self._chunks[key] = chunk
        return chunk

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(B, P) float -> (B, d) float32, accumulated over row chunks of R."""
        if x.shape[-1] != self.num_params:
            raise ValueError(f"expected vectors of {self.num_params} values, got {x.shape[-1]}")
        x = x.float()
        out = torch.zeros(x.shape[0], self.dim, device=x.device, dtype=torch.float32)
        for start in range(0, self.num_params, self.chunk_rows):
            chunk = self._chunk(start, x.device)
            out.addmm_(x[:, start : start + chunk.shape[0]], chunk)
        return out
