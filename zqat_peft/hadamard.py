"""Hadamard transforms of sizes m * 2^k, applied as a Kronecker product of small factors.

A Hadamard matrix of order n has entries +-1 and ``H H^T = n I``; divided by sqrt(n) it is orthogonal and
spreads a single large channel evenly over all n (QuaRot's online rotation before down_proj). Sizes that are
not powers of two are built as ``H_m (x) H_{2^k}``: Sylvester's construction for 2^k and Paley's for m
(Paley I for m - 1 a prime = 3 mod 4: 12, 20, 24, ...; Paley II for m / 2 - 1 a prime = 1 mod 4: 28, 36, ...).
So SmolLM2-135M's intermediate size 1536 is 12 x 128, its hidden size 576 is 36 x 16.

``apply_hadamard`` multiplies the last dimension by the normalized product one factor at a time (a reshape and
a small matmul per factor), never by a dense n x n matrix. The factors hold +-1, exact in any float dtype; the
normalization is one scalar multiply.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_SYLVESTER_2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)


def hadamard_factors(n: int) -> list[torch.Tensor]:
    """+-1 matrices (float64) whose Kronecker product, in order, is a Hadamard matrix of order n.

    Raises ValueError for an n that is not a power of two times a Paley order (e.g. 172 = 4 x 43).
    """
    if n < 1:
        raise ValueError(f"a Hadamard matrix needs a positive size, got {n}")
    power = n & -n  # the largest power of two dividing n
    if power == n:  # two halves: sqrt(n)-sized matmuls instead of one n x n
        half = 2 ** (n.bit_length() // 2)
        return [_sylvester(n // half), _sylvester(half)] if n > 2 else [_sylvester(n)]
    for base in _candidate_bases(n, power):
        paley = _paley(base)
        if paley is not None:
            return [paley] if base == n else [paley, _sylvester(n // base)]
    raise ValueError(
        f"no Hadamard matrix of size {n} is built here: sizes are 2^k or m x 2^k with m a Paley order "
        f"(m - 1 a prime = 3 mod 4, e.g. 12, 20, 24, or m / 2 - 1 a prime = 1 mod 4, e.g. 28, 36); "
        f"{n} = {n // power} x {power}. Quantize this model without the online Hadamard (online_hadamard=False)."
    )


def hadamard_matrix(n: int) -> torch.Tensor:
    """The orthogonal Hadamard matrix of order n, float64 [n, n] (``H H^T = I``): the dense form of what
    ``apply_hadamard(x, hadamard_factors(n))`` multiplies with."""
    dense = torch.ones(1, 1, dtype=torch.float64)
    for factor in hadamard_factors(n):
        dense = torch.kron(dense, factor)
    return dense / math.sqrt(n)


def apply_hadamard(x: torch.Tensor, factors: list[torch.Tensor], transpose: bool = False) -> torch.Tensor:
    """``x @ H`` (``x @ H^T`` with transpose) along the last dimension, H the normalized Kronecker product of
    ``factors``; in x's dtype, x of any leading shape [..., n]."""
    sizes = [f.shape[0] for f in factors]
    n = math.prod(sizes)
    if x.shape[-1] != n:
        raise ValueError(f"the Hadamard transform has size {n} ({' x '.join(map(str, sizes))}), but x is "
                         f"{tuple(x.shape)}: its last dimension must be {n}")
    y = x.reshape(-1, n)
    outer = 1
    for factor, size in zip(factors, sizes):
        h = factor.to(device=x.device, dtype=x.dtype)
        inner = n // (outer * size)
        # y[b, (i_outer, i, i_inner)] -> sum_i y[.., i, ..] H[i, j]. The last factor (inner 1) is one GEMM over
        # every row: as H^T @ y it would be a batch of matrix-vector products, 9x the cost of down_proj itself
        if inner == 1:
            y = y.reshape(-1, size) @ (h.t() if transpose else h)
        else:
            y = (h if transpose else h.t()) @ y.reshape(-1, size, inner)
        outer *= size
    return (y.reshape(x.shape) * (1.0 / math.sqrt(n))).to(x.dtype)


class OnlineHadamard(nn.Module):
    """``x -> x H`` at run time, H the orthogonal Hadamard matrix of order ``size`` (deterministic: no signs)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        # non-persistent: rebuilt from the size, never saved; +-1, so a cast of the model keeps them exact
        for i, factor in enumerate(hadamard_factors(size)):
            self.register_buffer(f"factor_{i}", factor.float(), persistent=False)

    def factors(self) -> list[torch.Tensor]:
        return [buffer for _, buffer in sorted(self.named_buffers(recurse=False))]

    def forward(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        return apply_hadamard(x, self.factors(), transpose)

    def extra_repr(self) -> str:
        return f"size={self.size}"


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(_SYLVESTER_2, h)
    return h


def _candidate_bases(n: int, power: int) -> list[int]:
    """m = odd part x 4, x 8, ... (Hadamard orders above 2 are multiples of 4), smallest first."""
    odd = n // power
    return [odd * 2**j for j in range(2, power.bit_length()) if n % (odd * 2**j) == 0]


def _paley(m: int) -> torch.Tensor | None:
    """A Hadamard matrix of order m by Paley's construction I or II (q prime), or None."""
    if _is_prime(m - 1) and (m - 1) % 4 == 3:  # I: H = I + S, S = [[0, 1], [-1, Q]] skew
        q = m - 1
        s = torch.zeros(m, m, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return torch.eye(m, dtype=torch.float64) + s
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:  # II: from the symmetric conference matrix
        q = m // 2 - 1
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        plus = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, _SYLVESTER_2) + torch.kron(torch.eye(q + 1, dtype=torch.float64), plus)
    return None


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = Legendre symbol of (j - i) mod q, q an odd prime."""
    squares = {(k * k) % q for k in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if d in squares else -1.0 for d in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q).unsqueeze(0) - torch.arange(q).unsqueeze(1)) % q
    return chi[idx]


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))
