"""benchmarks/average_adapters.py: two adapters trained from one packed init averaged into one that loads."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from zqat_peft import ZeroQATConfig

from .conftest import load_benchmark, tiny_model

bench = load_benchmark("average_adapters")
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "average_adapters.py"


def _scales_model(scale_factor: float):
    """W4 packed layers, trainable scales multiplied by ``scale_factor``: what a ZO training from one init trains."""
    model = get_peft_model(tiny_model(), ZeroQATConfig(w_bits=4, group_size=32, trainable="scales"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "zqat_scales" in name:
                param.mul_(scale_factor)
    return model


def _saved_scales_adapter(folder: Path, scale_factor: float) -> None:
    _scales_model(scale_factor).save_pretrained(folder)


def test_the_average_adapter_loads_with_the_mean_scales_and_the_same_codes(tmp_path):
    _saved_scales_adapter(tmp_path / "a", 1.0)
    _saved_scales_adapter(tmp_path / "b", 1.5)
    subprocess.run([sys.executable, str(SCRIPT), "--adapter", str(tmp_path / "a"), "--adapter", str(tmp_path / "b"),
                    "--out", str(tmp_path / "ab")], check=True, capture_output=True)

    a, b = (load_file(tmp_path / f / "adapter_model.safetensors") for f in ("a", "b"))
    ab = load_file(tmp_path / "ab" / "adapter_model.safetensors")
    scales = [k for k in a if "zqat_scales" in k]
    codes = [k for k in a if not a[k].is_floating_point()]
    assert scales and codes
    for k in scales:
        assert torch.allclose(ab[k], 1.25 * a[k]) and not torch.equal(a[k], b[k])
    assert all(torch.equal(ab[k], a[k]) for k in codes)
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path / "ab")
    ids = torch.arange(16)[None]
    with torch.no_grad():  # the average of scales x1 and x1.5 is the model with scales x1.25
        assert torch.allclose(loaded(input_ids=ids).logits, _scales_model(1.25)(input_ids=ids).logits, atol=1e-5)


def test_adapters_of_different_codes_or_tensors_are_refused():
    codes = torch.tensor([1, 2], dtype=torch.uint8)
    scale = torch.ones(2)
    with pytest.raises(ValueError, match="integer.*not start from the same packed init"):
        bench.average_state([{"c": codes, "s": scale}, {"c": codes + 1, "s": scale}])
    with pytest.raises(ValueError, match="different tensors"):
        bench.average_state([{"c": codes, "s": scale}, {"c": codes}])
    assert torch.equal(bench.average_state([{"c": codes, "s": scale}, {"c": codes, "s": 3 * scale}])["s"], 2 * scale)


def test_adapters_of_different_configs_are_refused(tmp_path):
    _saved_scales_adapter(tmp_path / "a", 1.0)
    model = get_peft_model(tiny_model(), ZeroQATConfig(w_bits=3, group_size=32, trainable="scales"))
    model.save_pretrained(tmp_path / "b")
    run = subprocess.run([sys.executable, str(SCRIPT), "--adapter", str(tmp_path / "a"), "--adapter",
                          str(tmp_path / "b"), "--out", str(tmp_path / "ab")], capture_output=True, text=True)
    assert run.returncode != 0 and "adapter_config.json differ" in run.stderr
    assert not (tmp_path / "ab").exists()


def test_an_incomplete_adapter_folder_is_refused_before_anything_is_written(tmp_path):
    _saved_scales_adapter(tmp_path / "a", 1.0)
    (tmp_path / "b").mkdir()
    run = subprocess.run([sys.executable, str(SCRIPT), "--adapter", str(tmp_path / "a"), "--adapter",
                          str(tmp_path / "b"), "--out", str(tmp_path / "ab")], capture_output=True, text=True)
    assert run.returncode != 0 and "adapter_config.json does not exist" in run.stderr
    assert not (tmp_path / "ab").exists()
