"""The benchmark against llm-compressor's GPTQ (benchmarks/vs_ptq.py): which saved init a zeroqat row starts from."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from .conftest import load_benchmark

bench = load_benchmark("vs_ptq")


def init_path(*overrides: str) -> Path:
    args = SimpleNamespace(models="models", recipe_overrides=list(overrides))
    return bench.saved_model(args, "W3A16g64", "init-gptq-grid")


def test_a_zeroqat_row_shares_the_init_of_rows_that_differ_only_in_training():
    assert init_path("quant.calib_refine_epochs=2", "train.lr=1e-3") == init_path("quant.calib_refine_epochs=2",
                                                                                "train.lr=3e-3")


def test_the_modules_to_save_are_part_of_the_init_because_the_refinement_refits_them():
    norms = "quant.modules_to_save=[input_layernorm, post_attention_layernorm, norm]"
    assert init_path("quant.calib_refine_epochs=2", norms) != init_path("quant.calib_refine_epochs=2")
