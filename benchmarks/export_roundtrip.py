"""Exports of SmolLM2-135M read back by the real loaders: perplexity and size on disk per format.

RTN W{bits} g64 (every layer packed), exported as merged float, compressed-tensors (4/8-bit), GPTQ (needs
GPTQModel and optimum) and GGUF Q4_1 (read by transformers' GGUF loader, which dequantizes with gguf-py),
each loaded by its folder (file) name alone and evaluated on the Wikipedia test split (512-token windows).
Prints a table and writes JSON.

    TORCH_COMPILE_DISABLE=1 python benchmarks/export_roundtrip.py --bits 4 --out benchmarks/results/export_roundtrip.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import transformers
from peft import get_peft_model
from torch import nn

import zqat_peft  # noqa: F401
from zqat_peft import ZeroQATConfig
from zqat_peft.data import load_model_and_tokenizer, load_text
from zqat_peft.evaluation import encode_joined, perplexity, token_windows
from zqat_peft.export import ExportWarning, save_compressed_tensors, save_gguf, save_gptq, save_merged


def size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [f for f in path.iterdir() if f.suffix in (".safetensors", ".gguf")]
    return sum(f.stat().st_size for f in files) / 2**20


def rtn_model(bits: int) -> tuple[nn.Module, Any]:
    """SmolLM2-135M with every linear layer RTN W{bits} g64 (float32), and its tokenizer."""
    base, tokenizer = load_model_and_tokenizer("smollm2-135m")
    return get_peft_model(base, ZeroQATConfig(w_bits=bits, group_size=64, trainable="scales")), tokenizer


def wiki_test_windows(tokenizer, max_windows: Optional[int] = None) -> torch.Tensor:
    """[n, 512] token windows of the Wikipedia test split (the whole split by default)."""
    return token_windows(encode_joined(tokenizer, load_text("wiki", "test")), 512, max_windows=max_windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--windows", type=int, default=None, help="512-token test windows (default: the whole split)")
    parser.add_argument("--out", default="benchmarks/results/export_roundtrip.json")
    args = parser.parse_args()

    model, tokenizer = rtn_model(args.bits)
    windows = wiki_test_windows(tokenizer, args.windows)
    rows = {"zqat_peft": {"wiki_ppl": perplexity(model, windows, batch_size=4), "size_mb": None}}
    exports = {"merged float32": (save_merged, "merged"), "gguf Q4_1": (save_gguf, "model.gguf")}
    if args.bits in (2, 4, 8):
        exports["compressed-tensors"] = (save_compressed_tensors, "ct")
    if importlib.util.find_spec("gptqmodel") is not None:
        exports["gptq"] = (save_gptq, "gptq")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (save, target) in exports.items():
            path = Path(tmp) / target
            kwargs = {"tokenizer_pre": "smollm"} if save is save_gguf else {}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExportWarning)
                report = save(model, path, tokenizer=tokenizer, **kwargs)
            if save is save_gguf:
                loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp, gguf_file=target, dtype=torch.float32)
            else:
                loaded = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu")
            rows[name] = {"wiki_ppl": perplexity(loaded.eval(), windows, batch_size=4), "size_mb": size_mb(path),
                          "max_weight_change": report.max_weight_change}
            del loaded
    print(f"SmolLM2-135M RTN W{args.bits} g64, wiki test, {len(windows)} x 512 tokens")
    print("| checkpoint | wiki_ppl | size on disk (MiB) | largest weight change |\n|---|---|---|---|")
    for name, row in rows.items():
        size = "" if row["size_mb"] is None else f"{row['size_mb']:.1f}"
        change = "" if "max_weight_change" not in row else f"{row['max_weight_change']:.2g}"
        print(f"| {name} | {row['wiki_ppl']:.3f} | {size} | {change} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"bits": args.bits, "windows": len(windows), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
