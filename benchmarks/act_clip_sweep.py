"""Perplexity against the activation clipping ratio (``ZeroQATConfig.act_clip``) at 4-bit activations.

SmolLM2-135M, residual stream rotated (online Hadamard before down_proj), per-token 4-bit activations, weights
at ``--w-bits`` per channel rounded to nearest (8 by default, so that the activations' error is what is
measured). One model per ratio, the same windows for all; pick the ratio on the train split, not the test split.
Prints a table and writes JSON::

    PYTHONPATH=. python benchmarks/act_clip_sweep.py --split train --ratios 1.0 0.9 0.85 0.8 0.75
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from peft import get_peft_model

from zqat_peft import ZeroQATConfig
from zqat_peft.data import load_model_and_tokenizer, load_text
from zqat_peft.evaluation import encode_joined, perplexity, token_windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--split", default="train", choices=["train", "test"])
    parser.add_argument("--windows", type=int, default=32, help="512-token windows of the wiki split")
    parser.add_argument("--documents", type=int, default=400, help="the split's first documents (enough for the windows)")
    parser.add_argument("--w-bits", type=int, default=8)
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.9, 0.85, 0.8, 0.75])
    parser.add_argument("--out", default="benchmarks/results/act_clip_sweep.json")
    args = parser.parse_args()
    _, tokenizer = load_model_and_tokenizer(args.model)
    windows = token_windows(encode_joined(tokenizer, load_text("wiki", args.split)[: args.documents]), 512,
                            args.windows)
    rows = []
    print(f"| act_clip | wiki {args.split} ppl ({len(windows)} windows), W{args.w_bits}A4 rotated, RTN | seconds |")
    print("|---|---|---|")
    for ratio in args.ratios:
        model, _ = load_model_and_tokenizer(args.model)
        config = ZeroQATConfig(w_bits=args.w_bits, a_bits=4, group_size=-1, rotate=True, trainable="scales",
                               act_clip=ratio)
        model = get_peft_model(model, config)
        start = time.perf_counter()
        with torch.no_grad():
            ppl = perplexity(model, windows)
        rows.append({"act_clip": ratio, "wiki_ppl": ppl, "seconds": round(time.perf_counter() - start, 1)})
        print(f"| {ratio} | {ppl:.2f} | {rows[-1]['seconds']} |", flush=True)
    meta = {"model": args.model, "split": args.split, "windows": len(windows), "w_bits": args.w_bits}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
