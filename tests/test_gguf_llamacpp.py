"""llama.cpp itself runs the GGUF export of the real SmolLM2-135M (opt-in, a few minutes on 2 cores).

llama-cpp-python builds from source (~22 min on 2 cores; see benchmarks/gguf_llamacpp.py), so it is not a
dependency: the test runs when ``ZQAT_LLAMACPP_PYTHON`` names the Python of an environment that has it, or when
``llama_cpp`` is importable here, and is skipped at collection otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from peft import get_peft_model

import zqat_peft  # noqa: F401  (registers ZeroQAT with peft)
from zqat_peft import ZeroQATConfig

LLAMACPP_PYTHON = os.environ.get("ZQAT_LLAMACPP_PYTHON") or (
    sys.executable if importlib.util.find_spec("llama_cpp") is not None else None
)
RUNNER = Path(__file__).resolve().parents[1] / "benchmarks" / "llamacpp_eval.py"
pytestmark = pytest.mark.skipif(
    LLAMACPP_PYTHON is None,
    reason="llama-cpp-python is not available: set ZQAT_LLAMACPP_PYTHON to the Python of an environment with it",
)


def test_llamacpp_runs_the_smollm2_gguf_export_within_1_percent_of_our_perplexity(tmp_path):
    """The file loads in llama.cpp as written (tokenizer included) and scores 4 wiki windows within 1% of the
    ZeroQAT model's perplexity (llama.cpp rounds activations to 8 bits for Q4_1 products)."""
    from zqat_peft.data import is_complete, load_model_and_tokenizer, load_text
    from zqat_peft.evaluation import encode_joined, perplexity, token_windows
    from zqat_peft.export import save_gguf

    if not (is_complete("model") and is_complete("wiki")):
        pytest.skip("the real model and wiki are not fetched (zqat fetch model wiki)")
    base, tokenizer = load_model_and_tokenizer("smollm2-135m")
    model = get_peft_model(base, ZeroQATConfig(w_bits=4, group_size=64, trainable="scales"))
    windows = token_windows(encode_joined(tokenizer, load_text("wiki", "test")), 512, max_windows=4)
    ours = perplexity(model, windows)
    save_gguf(model, tmp_path / "model.gguf", tokenizer, tokenizer_pre="smollm")
    np.save(tmp_path / "windows.npy", windows.numpy().astype(np.int32))
    prompt = "The capital of France is"
    (tmp_path / "prompts.json").write_text(json.dumps([prompt]))

    run = subprocess.run([LLAMACPP_PYTHON, str(RUNNER), str(tmp_path / "model.gguf"), str(tmp_path / "windows.npy"),
                          str(tmp_path / "out.json"), "--prompts", str(tmp_path / "prompts.json"), "--new-tokens", "1"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())

    assert result["count"] == 4 * 511
    assert abs(math.exp(result["nll_sum"] / result["count"]) / ours - 1) < 0.01
    assert result["continuations"][0]["prompt_ids"] == tokenizer(prompt)["input_ids"]
