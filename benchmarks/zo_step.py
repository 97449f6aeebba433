"""Cost of one ZO step against one plain forward of the same batch, per trainable mode.

A ZO step = two perturbed forwards + the seeded update; its floor is two forwards. Memory: peak of
a ZO step / peak of a forward (CPU: the process's peak RSS, each measured in a fresh process; GPU:
torch.cuda.max_memory_allocated). Time: median over repeats, forward and ZO step interleaved in the
same process (so load from elsewhere hits both alike).

    python benchmarks/zo_step.py --out benchmarks/results/zo_step_cpu.json

A mode may name a mask after a colon, e.g. ``full:rounding`` (``ZOOptimizer(mask="rounding")``: each step
measures every master weight's rounding margin once and perturbs and updates only the elements within reach,
eps 5e-3 of each tensor's RMS as in the demo recipe).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from peft import get_peft_model

from zqat_peft import ZeroQATConfig
from zqat_peft.zo import reference_scales, spsa_losses, zo_parameters, zo_update
from zqat_peft.zo.trajectory import set_scales

SHAPES = {
    # SmolLM2-135M (random weights give the same costs as the real ones)
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
}


def build(shape: str, mode: str, w_bits: int, group_size: int, dtype: torch.dtype, device: str):
    config = transformers.LlamaConfig(**SHAPES[shape], max_position_embeddings=4096)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    return get_peft_model(model, ZeroQATConfig(w_bits=w_bits, group_size=group_size, trainable=mode))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(args, what: str) -> dict:
    """Run in a fresh process: build the model, then time `what` ("forward" or "zo") and its peak memory."""
    dtype = getattr(torch, args.dtype)
    mode, _, mask = args.mode.partition(":")
    model = build(args.shape, mode, args.w_bits, args.group_size, dtype, args.device)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=gen).to(args.device)
    params = zo_parameters(model)
    eps = 1e-3
    if mask:
        eps = 5e-3
        set_scales(params, reference_scales(params), eps, mask)

    def forward():
        with torch.no_grad():
            return model(input_ids=ids, labels=ids).loss

    def zo_step(seed):
        lp, ln = spsa_losses(params, forward, seed, eps)
        zo_update(params, [seed], [float(lp - ln) / (2 * eps)], 1e-7)

    runs = {"forward": lambda i: forward(), "zo": zo_step}
    runs[what](0)  # warm up
    sync(args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # Both are timed in this one process, interleaved, so load from elsewhere hits both alike.
    times = {"forward": [], "zo": []}
    for i in range(args.repeats):
        for name in ([what] if what == "forward" else ["forward", "zo"]):
            start = time.perf_counter()
            runs[name](i + 1)
            sync(args.device)
            times[name].append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if args.device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    if args.profile and what == "zo":
        print_profile(runs, args.device)
    return {"seconds": {k: statistics.median(v) for k, v in times.items() if v}, "peak_bytes": peak,
            "trained_params": sum(p.param.numel() for p in params)}


def print_profile(runs: dict, device: str) -> None:
    """Per-kernel times of one forward and one ZO step (to stderr, which the parent prints)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    for name in ("forward", "zo"):
        with torch.profiler.profile(activities=activities) as prof:
            runs[name](1000)
            sync(device)
        sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
        print(f"--- one {name}", file=sys.stderr)
        print(prof.key_averages().table(sort_by=sort, row_limit=12, max_name_column_width=60), file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    parser.add_argument("--modes", nargs="*", default=["full", "lightweight", "scales"])
    parser.add_argument("--w-bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    parser.add_argument("--out", default="benchmarks/results/zo_step.json")
    parser.add_argument("--profile", action="store_true", help="print per-kernel times of one forward and ZO step")
    parser.add_argument("--child", choices=["forward", "zo"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="full", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(args, args.child)))
        return
    rows = {}
    for mode in args.modes:
        row = {}
        for what in ("forward", "zo"):
            cmd = [sys.executable, __file__, "--child", what, "--mode", mode] + _forward_args(args)
            child = subprocess.run(cmd, check=True, capture_output=True, text=True)
            if args.profile:
                print(child.stderr, file=sys.stderr)
            row[what] = json.loads(child.stdout.splitlines()[-1])
        seconds = row["zo"]["seconds"]  # forward and ZO step timed together in the ZO process
        row["forward_seconds"], row["zo_seconds"] = seconds["forward"], seconds["zo"]
        row["time_ratio"] = seconds["zo"] / seconds["forward"]
        row["memory_ratio"] = row["zo"]["peak_bytes"] / row["forward"]["peak_bytes"]
        rows[mode] = row
        print(f"{mode:12s} forward {row['forward_seconds']:.3f} s  ZO step {row['zo_seconds']:.3f} s  "
              f"time x{row['time_ratio']:.2f}  peak x{row['memory_ratio']:.3f}  "
              f"({row['zo']['trained_params'] / 1e6:.1f} M trained)", flush=True)
    meta = {k: v for k, v in vars(args).items() if k not in ("child", "mode", "out")}
    meta["threads"] = torch.get_num_threads()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "modes": rows}, indent=2))


def _forward_args(args) -> list[str]:
    return ["--shape", args.shape, "--w-bits", str(args.w_bits), "--group-size", str(args.group_size),
            "--batch", str(args.batch), "--seq", str(args.seq), "--dtype", args.dtype,
            "--repeats", str(args.repeats), "--device", args.device, "--threads", str(args.threads)] + (
                ["--profile"] if args.profile else [])


if __name__ == "__main__":
    main()
