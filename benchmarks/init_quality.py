"""Initialization quality on the real model: full precision vs RTN vs block-wise calibration.

Token-level perplexity of the held-out Wikipedia test split (joined with "\\n\\n", 512-token
windows), SmolLM2-135M. Prints a table and writes JSON.

    python benchmarks/init_quality.py --out benchmarks/results/init_quality.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from peft import get_peft_model

import zqat_peft
from zqat_peft import ZeroQATConfig
from zqat_peft.data import load_model_and_tokenizer, load_text
from zqat_peft.evaluation import encode_joined, perplexity, token_windows

# (name, quantization settings, calibration epochs): ZeroQAT uses ~2 epochs for W4A4, ~4 for W2A16.
SETTINGS = [
    ("W3A16g64", dict(w_bits=3, group_size=64), 2),
    ("W4A4", dict(w_bits=4, a_bits=4, group_size=-1), 2),
    ("W4A4 no smoothing", dict(w_bits=4, a_bits=4, group_size=-1, smooth=False), 2),
    ("W2A16g64", dict(w_bits=2, group_size=64), 4),
    ("W4A16g64", dict(w_bits=4, group_size=64), 2),
    ("W4A8", dict(w_bits=4, a_bits=8, group_size=-1), 2),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=16, help="512-token test windows evaluated")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-seq-len", type=int, default=256)
    parser.add_argument("--only", nargs="*", help="names of settings to run")
    parser.add_argument("--out", default="benchmarks/results/init_quality.json")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    model, tokenizer = load_model_and_tokenizer(args.model, device=device)
    windows = token_windows(encode_joined(tokenizer, load_text("wiki", "test")), 512, args.windows)
    train_ids = encode_joined(tokenizer, load_text("wiki", "train"))
    calib = zqat_peft.calibration_batches(train_ids, args.calib_samples, args.calib_seq_len, batch_size=1)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results["meta"] = {"model": args.model, "device": device, "windows": args.windows, "seq_len": 512,
                       "calib_samples": args.calib_samples, "calib_seq_len": args.calib_seq_len,
                       "threads": torch.get_num_threads()}
    if "fp" not in results:
        results["fp"] = {"wiki_ppl": perplexity(model, windows)}
        _save(out, results)
    for name, settings, epochs in SETTINGS:
        if args.only and name not in args.only:
            continue
        row = {}
        rtn = get_peft_model(load_model_and_tokenizer(args.model, device=device)[0],
                             ZeroQATConfig(trainable="scales", **settings))
        row["rtn_ppl"] = perplexity(rtn, windows)
        del rtn
        cal = get_peft_model(load_model_and_tokenizer(args.model, device=device)[0],
                             ZeroQATConfig(trainable="scales", init="calibrate", calib_epochs=epochs, **settings))
        start = time.perf_counter()
        zqat_peft.calibrate(cal, calib, progress=False)
        row["calib_seconds"] = time.perf_counter() - start
        row["calib_epochs"] = epochs
        row["calibrated_ppl"] = perplexity(cal, windows)
        del cal
        results[name] = row
        _save(out, results)
        print(f"{name:20s} RTN {row['rtn_ppl']:10.2f}  calibrated {row['calibrated_ppl']:10.2f}  "
              f"({row['calib_seconds']:.0f} s)", flush=True)
    print_table(results)


def _save(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)


def print_table(results: dict) -> None:
    print(f"\nfull precision: {results['fp']['wiki_ppl']:.2f}")
    print(f"| setting | RTN | calibrated | calibration time (s) |\n|---|---|---|---|")
    for name, _, _ in SETTINGS:
        if name in results:
            r = results[name]
            print(f"| {name} | {r['rtn_ppl']:.2f} | {r['calibrated_ppl']:.2f} | {r['calib_seconds']:.0f} |")


if __name__ == "__main__":
    main()
