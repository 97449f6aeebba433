"""Packed layers at inference speed: SmolLM2-135M (real weights) with every linear layer packed, against the
float32 dense model, on the CPU.

Rows (each timed in this one process, interleaved round by round, so load from elsewhere hits all alike;
the figure is the median over rounds of each round's ratio to that round's dense forward):

* ``dense``: the float32 model, no ZeroQAT.
* ``W4 g64``, ``W2 g64``: every linear packed (``trainable: scales``), forward through ``zqat::packed_linear``.
* ``W4 g64 reference``: the same forward on the PyTorch path (``dequantize_packed`` then ``F.linear``),
  what every packed forward ran before the kernel.
* ``W2 g64 ZO step``: one scales-mode ZO step (two perturbed forwards + the update of every scale).

A forward is 4 x 128 tokens of Wikipedia text with labels (loss included); ``--decode`` adds a batch-1
forward of one token (the per-token cost of decoding without the attention over a cache). The floor of a
packed forward is the dense one: the same GEMM FLOPs plus decoding each weight once (bytes read below).

    python benchmarks/packed_forward.py --threads 2 --rounds 7 --out benchmarks/results/packed_forward_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from peft import get_peft_model

from zqat_peft import ZeroQATConfig, kernels
from zqat_peft.data import load_model_and_tokenizer, load_text
from zqat_peft.evaluation import encode_joined, token_windows
from zqat_peft.quant import packing
from zqat_peft.tuner import ZQATLinear
from zqat_peft.zo import spsa_losses, zo_parameters, zo_update


def packed_model(base: torch.nn.Module, bits: int, group_size: int) -> torch.nn.Module:
    return get_peft_model(copy.deepcopy(base), ZeroQATConfig(w_bits=bits, group_size=group_size, trainable="scales"))


def floor_counts(model: torch.nn.Module, bits: int, tokens: int) -> dict:
    """What any packed forward must do: the linear layers' GEMM FLOPs and the bytes of codes and scales read."""
    layers = [m for m in model.modules() if isinstance(m, ZQATLinear)]
    weights = sum(m.in_features * m.out_features for m in layers)
    scales = sum(t.numel() for m in layers for t in m.zqat_scales.values())
    return {"layers": len(layers), "weights": weights, "linear_gflop": 2 * tokens * weights / 1e9,
            "code_mib": weights * bits / 8 / 2**20, "scale_zero_mib": scales * 5 / 2**20,
            "dense_weight_mib": weights * 4 / 2**20}


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def reference_path(fn: Callable[[], object]) -> Callable[[], object]:
    """fn with the packed kernel turned away (the PyTorch path of zqat_peft.quant.packed_linear)."""

    def run():
        original = packing.packed_kernel_for
        packing.packed_kernel_for = lambda *args: None
        try:
            return fn()
        finally:
            packing.packed_kernel_for = original

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--decode", action="store_true", help="also time a batch-1 one-token forward")
    parser.add_argument("--no-reference", action="store_true", help="skip the PyTorch-path row (slow)")
    parser.add_argument("--out", default="benchmarks/results/packed_forward_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if kernels.cpu_packed_ext() is None:
        raise SystemExit("the CPU packed-linear kernel did not build: nothing to measure")

    base, tok = load_model_and_tokenizer("smollm2-135m")
    base = base.float().eval()
    ids = token_windows(encode_joined(tok, load_text("wiki", "test")), args.seq, max_windows=args.batch)
    w4, w2 = packed_model(base, 4, args.group_size), packed_model(base, 2, args.group_size)
    params = zo_parameters(w2)

    def forward(model, x=ids):
        with torch.no_grad():
            return model(input_ids=x, labels=x).loss

    def zo_step(seed=[0]):
        seed[0] += 1
        loss_pos, loss_neg = spsa_losses(params, lambda: forward(w2), seed[0], 1e-3)
        zo_update(params, [seed[0]], [float(loss_pos.float() - loss_neg.float()) / 2e-3], 1e-7)

    runs = {
        "dense": lambda: forward(base),
        "W4 g64": lambda: forward(w4),
        "W2 g64": lambda: forward(w2),
        "W2 g64 ZO step": zo_step,
    }
    if not args.no_reference:
        runs["W4 g64 reference"] = reference_path(lambda: forward(w4))
    if args.decode:
        one = ids[:1, :1]
        runs.update({"dense decode": lambda: forward(base, one), "W4 g64 decode": lambda: forward(w4, one),
                     "W2 g64 decode": lambda: forward(w2, one)})
    # Every row computes the same function as its dense or PyTorch counterpart; check before timing.
    ref_loss = reference_path(lambda: forward(w4))()
    assert abs(float(forward(w4)) - float(ref_loss)) < 1e-4, "packed kernel and PyTorch path disagree"
    for fn in runs.values():
        fn()  # warm up

    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            seconds[name].append(timed(fn))
    rows = {}
    for name, values in seconds.items():
        base_name = "dense decode" if name.endswith("decode") else "dense"
        ratios = [v / d for v, d in zip(values, seconds[base_name])]
        rows[name] = {"median_seconds": statistics.median(values), "median_ratio_to_dense": statistics.median(ratios),
                      "seconds": values}

    tokens = args.batch * args.seq
    floors = {"W4": floor_counts(w4, 4, tokens), "W2": floor_counts(w2, 2, tokens)}
    print(f"SmolLM2-135M float32, {args.batch} x {args.seq} tokens, {args.threads} threads, {args.rounds} rounds "
          f"(median of per-round ratios)")
    print(f"{'row':22s} {'median s':>9s} {'x dense':>8s}")
    for name, row in rows.items():
        print(f"{name:22s} {row['median_seconds']:9.4f} {row['median_ratio_to_dense']:8.3f}")
    for bits, f in floors.items():
        print(f"floor {bits}: {f['layers']} linears, {f['weights'] / 1e6:.1f} M weights, {f['linear_gflop']:.1f} GFLOP "
              f"of GEMM per forward; codes {f['code_mib']:.1f} MiB + scales/zeros {f['scale_zero_mib']:.1f} MiB read "
              f"once (dense weights: {f['dense_weight_mib']:.1f} MiB)")
    result = {"rows": rows, "floors": floors, "args": vars(args), "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
