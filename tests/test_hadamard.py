"""Hadamard matrices of sizes m x 2^k and their fast (factored) application."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from zqat_peft.hadamard import apply_hadamard, hadamard_factors, hadamard_matrix


@pytest.mark.parametrize("n", [1, 2, 8, 64, 256, 12, 24, 96, 1536, 20, 40, 28, 36, 576])
def test_hadamard_matrix_is_orthogonal_with_equal_magnitudes(n):
    h = hadamard_matrix(n)
    torch.testing.assert_close(h @ h.t(), torch.eye(n, dtype=torch.float64))
    # a Hadamard matrix, not any orthogonal one: every entry +-1/sqrt(n), so one channel spreads evenly
    torch.testing.assert_close(h.abs(), torch.full((n, n), n**-0.5, dtype=torch.float64))


@pytest.mark.parametrize("n", [6, 172, 344])
def test_sizes_without_a_construction_are_refused_by_name(n):
    with pytest.raises(ValueError, match=f"size {n}"):
        hadamard_factors(n)


@pytest.mark.parametrize("n", [1536, 576, 256])
def test_apply_hadamard_equals_the_dense_product_without_forming_it(n):
    x = torch.randn(2, 3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    factors = hadamard_factors(n)
    assert max(f.shape[0] for f in factors) < n  # factored: no n x n matrix is multiplied
    h = hadamard_matrix(n)
    torch.testing.assert_close(apply_hadamard(x, factors), x @ h)
    torch.testing.assert_close(apply_hadamard(x, factors, transpose=True), x @ h.t())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_apply_hadamard_keeps_the_input_dtype(dtype, tol):
    x = torch.randn(4, 1536, generator=torch.Generator().manual_seed(1))
    y = apply_hadamard(x.to(dtype), hadamard_factors(1536))
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), x.double() @ hadamard_matrix(1536), rtol=tol, atol=tol)


def test_apply_hadamard_refuses_a_wrong_width():
    with pytest.raises(ValueError, match="last dimension must be 1536"):
        apply_hadamard(torch.zeros(2, 576), hadamard_factors(1536))


class _MatmulShapes(TorchDispatchMode):
    """Records the operand shapes of every matrix product dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default):
            self.shapes.append((tuple(args[0].shape), tuple(args[1].shape)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("transpose", [False, True])
def test_apply_hadamard_multiplies_matrices_not_a_batch_of_vectors(transpose):
    # the last factor's axis is innermost: applied as a batch of [128, 128] @ [128, 1] products it cost
    # 9x the down_proj matmul it precedes on the CPU; as one [rows, 128] @ [128, 128] GEMM, 0.6x
    factors = [f.float() for f in hadamard_factors(1536)]
    with _MatmulShapes() as recorded:
        apply_hadamard(torch.randn(64, 1536), factors, transpose)
    assert recorded.shapes, "apply_hadamard dispatched no matrix product"
    vector_products = [s for s in recorded.shapes if s[1][-1] == 1]
    assert not vector_products, f"matrix-vector products: {vector_products}"
