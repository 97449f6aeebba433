"""Peak memory of block-wise calibration at several model depths: it should grow with one block, not with depth.

A random-weight LLaMA of SmolLM2-135M's width (W3A16g64, every linear layer trained) is built in CPU
memory at each depth, each in a fresh process, and calibrated for one epoch on random token ids.
GPU: ``calibrate(..., device="cuda")`` moves one block at a time to the GPU; the figure is
torch.cuda.max_memory_allocated. CPU: the peak RSS above the RSS just before calibrating (the model
itself already lives in that memory).

    python benchmarks/calib_memory.py --depths 15 30 --out benchmarks/results/calib_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from peft import get_peft_model

import zqat_peft
from zqat_peft import ZeroQATConfig

WIDTH = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
             vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(depth: int, device: str, samples: int, seq: int) -> dict:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**WIDTH, num_hidden_layers=depth)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model = get_peft_model(model, ZeroQATConfig(w_bits=3, group_size=64, trainable="full", init="calibrate"))
    ids = torch.randint(0, config.vocab_size, (samples, seq), generator=torch.Generator().manual_seed(1))
    batches = list(ids.split(4))
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = _rss_bytes()
    start = time.perf_counter()
    zqat_peft.calibrate(model, batches, epochs=1, device=device, progress=False)
    seconds = time.perf_counter() - start
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"depth": depth, "peak_bytes": peak, "model_bytes": model_bytes, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[15, 30])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="benchmarks/results/calib_memory.json")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.device, args.samples, args.seq)))
        return
    rows = []
    for depth in args.depths:
        cmd = [sys.executable, __file__, "--child", str(depth), "--device", args.device,
               "--samples", str(args.samples), "--seq", str(args.seq)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
        rows.append(json.loads(out))
    what = "peak GPU memory" if args.device == "cuda" else "peak RSS above the loaded model"
    print(f"| depth | model (MiB) | {what} (MiB) | seconds |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['depth']} | {r['model_bytes'] / 2**20:.0f} | {r['peak_bytes'] / 2**20:.0f} | {r['seconds']:.1f} |")
    print(f"peak ratio deepest / shallowest: {rows[-1]['peak_bytes'] / rows[0]['peak_bytes']:.3f} "
          f"(depth ratio {rows[-1]['depth'] / rows[0]['depth']:.1f})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
