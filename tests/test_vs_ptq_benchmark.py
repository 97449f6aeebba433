"""The benchmark against llm-compressor's GPTQ (benchmarks/vs_ptq.py): which saved init a zeroqat row starts from."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

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


def fake_package(root: Path) -> Path:
    for part in bench.INIT_CODE:
        path = root / part if part.endswith(".py") else root / part / "code.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# {part}\n")
    (root / "pipeline.py").write_text("# not init code\n")
    return root


def test_the_init_code_digest_changes_with_the_calibration_code_and_not_with_other_code(tmp_path):
    package = fake_package(tmp_path)
    before = bench.init_code_digest(package)
    (package / "pipeline.py").write_text("# changed, but an init does not depend on it\n")
    assert bench.init_code_digest(package) == before
    (package / "calibration" / "code.py").write_text("# changed\n")
    assert bench.init_code_digest(package) != before


def test_a_saved_init_made_by_other_code_is_refused_and_one_made_by_this_code_is_used(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.pipeline, "save_adapter", lambda model, path: path.mkdir(parents=True))
    saved = tmp_path / "init"
    bench.save_init(None, saved)
    bench.check_init_code(saved)  # the same code: used
    monkeypatch.setattr(bench, "init_code_digest", lambda: "0123456789abcdef")
    with pytest.raises(SystemExit, match="made by other code.*Delete the folder"):
        bench.check_init_code(saved)


def test_a_saved_init_without_a_stamp_is_used_with_a_warning(tmp_path, capsys):
    (tmp_path / "init").mkdir()
    bench.check_init_code(tmp_path / "init")
    assert "cannot be checked" in capsys.readouterr().out
