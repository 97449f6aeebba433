"""llama.cpp itself runs the GGUF export of SmolLM2-135M: its perplexity and greedy continuations next to ours.

SmolLM2-135M RTN W{bits} g64 (as benchmarks/export_roundtrip.py builds it), exported by ``save_gguf`` (Q4_1),
evaluated three ways on the same 512-token windows of the Wikipedia test split:

- ``zqat_peft``: the ZeroQAT model itself, float32, by zqat_peft.evaluation.perplexity;
- ``transformers (gguf-py)``: the file read back by transformers' GGUF loader (weights dequantized to float32),
  which separates the file's float16 rounding of the Q4_1 scales and offsets from llama.cpp's runtime;
- ``llama.cpp``: llama-cpp-python on the file, one window at a time from an empty KV cache, fed our tokenizer's
  ids, every next token scored as zqat_peft scores it (benchmarks/llamacpp_eval.py). llama.cpp multiplies Q4_1
  weights with activations rounded to 8 bits (Q8_1 blocks of 32) and keeps its KV cache in float16.

Then three prompts, tokenized by llama.cpp from the file's metadata, continued greedily by llama.cpp and, from
the merged float model (``save_merged``), by transformers with our tokenizer. Prints a table, writes JSON.

llama-cpp-python is built from source into an environment of its own (~22 min on 2 cores)::

    python -m venv ../venvs/llamacpp
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \\
        -DLLAMA_BUILD_SERVER=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \\
        ../venvs/llamacpp/bin/pip install --no-binary llama-cpp-python llama-cpp-python==0.3.36 numpy

then name its Python with ``--llamacpp-python`` (or ``LLAMACPP_PYTHON``)::

    python benchmarks/gguf_llamacpp.py --llamacpp-python ../venvs/llamacpp/bin/python --bits 4 3 [--windows 8]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from torch import nn

from zqat_peft.evaluation import perplexity
from zqat_peft.export import save_gguf, save_merged

from export_roundtrip import rtn_model, wiki_test_windows  # benchmarks/, the script's own folder

PROMPTS = ["The capital of France is", "Water boils at a temperature of", "Once upon a time, there was a little"]
RUNNER = Path(__file__).with_name("llamacpp_eval.py")


@torch.no_grad()
def greedy_transformers(model: nn.Module, tokenizer, prompt: str, new_tokens: int) -> dict:
    """Our tokenizer's ids of ``prompt`` and exactly ``new_tokens`` argmax tokens (no stop at EOS, as the runner)."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    prompt_ids = ids[0].tolist()
    for _ in range(new_tokens):
        next_id = model(input_ids=ids).logits[0, -1].argmax()
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    generated = ids[0, len(prompt_ids):].tolist()
    return {"prompt_ids": prompt_ids, "ids": generated, "text": tokenizer.decode(generated)}


def run_llamacpp(python: str, gguf_file: Path, windows: torch.Tensor, folder: Path, new_tokens: int,
                 threads: int | None) -> dict:
    """benchmarks/llamacpp_eval.py in the llama-cpp-python environment: NLL sums and greedy continuations."""
    windows_file, prompts_file, out_file = folder / "windows.npy", folder / "prompts.json", folder / "llamacpp.json"
    np.save(windows_file, windows.numpy().astype(np.int32))
    prompts_file.write_text(json.dumps(PROMPTS))
    cmd = [python, str(RUNNER), str(gguf_file), str(windows_file), str(out_file), "--prompts", str(prompts_file),
           "--new-tokens", str(new_tokens)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    subprocess.run(cmd, check=True, stdout=sys.stdout, stderr=sys.stderr)
    result = json.loads(out_file.read_text())
    expected = windows.numel() - windows.shape[0]
    if result["count"] != expected:
        raise RuntimeError(f"llama.cpp scored {result['count']} tokens, zqat_peft scores {expected}")
    return result


def compare_continuations(ours: list[dict], llama: list[dict]) -> list[dict]:
    rows = []
    for prompt, hf, lc in zip(PROMPTS, ours, llama):
        same = next((i for i, (a, b) in enumerate(zip(hf["ids"], lc["ids"])) if a != b), len(hf["ids"]))
        rows.append({"prompt": prompt, "same_prompt_ids": hf["prompt_ids"] == lc["prompt_ids"],
                     "same_continuation": hf["ids"] == lc["ids"], "first_tokens_equal": same,
                     "transformers": hf, "llama_cpp": lc})
    return rows


def evaluate(bits: int, args) -> dict:
    model, tokenizer = rtn_model(bits)
    windows = wiki_test_windows(tokenizer, args.windows)
    row = {"bits": bits, "group_size": 64, "windows": len(windows)}
    row["zqat_peft_ppl"] = perplexity(model, windows, batch_size=4)
    with tempfile.TemporaryDirectory() as tmp:
        gguf_file = Path(tmp) / "model.gguf"
        report = save_gguf(model, gguf_file, tokenizer=tokenizer, tokenizer_pre="smollm")
        row["gguf_mib"] = gguf_file.stat().st_size / 2**20
        row["max_weight_change"] = report.max_weight_change
        read_back = transformers.AutoModelForCausalLM.from_pretrained(tmp, gguf_file="model.gguf", dtype=torch.float32)
        row["transformers_gguf_ppl"] = perplexity(read_back.eval(), windows, batch_size=4)
        del read_back
        llama = run_llamacpp(args.llamacpp_python, gguf_file, windows, Path(tmp), args.new_tokens, args.threads)
        save_merged(model, Path(tmp) / "merged")
        merged = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "merged", dtype=torch.float32).eval()
        ours = [greedy_transformers(merged, tokenizer, prompt, args.new_tokens) for prompt in PROMPTS]
    row["llamacpp_ppl"] = math.exp(llama["nll_sum"] / llama["count"])
    row["llamacpp_over_zqat_peft"] = row["llamacpp_ppl"] / row["zqat_peft_ppl"]
    row["llamacpp"] = {k: llama[k] for k in ("llama_cpp_python", "n_ctx", "threads", "seconds", "add_bos")}
    row["continuations"] = compare_continuations(ours, llama["continuations"])
    return row


def print_rows(rows: list[dict]) -> None:
    print(f"SmolLM2-135M RTN g64, GGUF Q4_1, wiki test, {rows[0]['windows']} x 512 tokens")
    print("| bits | zqat_peft | transformers (gguf-py) | llama.cpp | llama.cpp / zqat_peft | file (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| W{r['bits']} | {r['zqat_peft_ppl']:.3f} | {r['transformers_gguf_ppl']:.3f} | {r['llamacpp_ppl']:.3f} "
              f"| {r['llamacpp_over_zqat_peft']:.4f} | {r['gguf_mib']:.1f} |")
    for r in rows:
        for c in r["continuations"]:
            verdict = "same" if c["same_continuation"] else f"differ from token {c['first_tokens_equal']}"
            print(f"W{r['bits']} {c['prompt']!r}: prompt ids {'same' if c['same_prompt_ids'] else 'DIFFER'}, "
                  f"continuations {verdict}\n  transformers: {c['transformers']['text']!r}\n"
                  f"  llama.cpp:    {c['llama_cpp']['text']!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3], choices=[2, 3, 4])
    parser.add_argument("--windows", type=int, default=None, help="512-token test windows (default: the whole split)")
    parser.add_argument("--llamacpp-python", default=os.environ.get("LLAMACPP_PYTHON"),
                        help="the Python of an environment with llama-cpp-python")
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp's threads (default: its own choice)")
    parser.add_argument("--new-tokens", type=int, default=16, help="greedy continuation length")
    parser.add_argument("--out", default="benchmarks/results/gguf_llamacpp.json")
    args = parser.parse_args()
    if not args.llamacpp_python:
        parser.error("name the Python of an environment with llama-cpp-python: --llamacpp-python or LLAMACPP_PYTHON")

    rows = [evaluate(bits, args) for bits in args.bits]
    print_rows(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"torch_threads": torch.get_num_threads(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
