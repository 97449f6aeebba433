"""The online Hadamard before down_proj against the down_proj matmul it precedes.

For each shape (intermediate size n, hidden size d) and a batch of ``--rows`` tokens: the time of
``apply_hadamard`` on [rows, n] (the factored transform a rotated model runs at every forward) and of the
dense down_proj product [rows, n] @ [n, d], and their ratio next to the FLOP floor of that ratio:
the transform multiplies by each factor (sizes s_1 ... s_k, product n), 2 * rows * n * sum(s_i) FLOPs,
against 2 * rows * n * d for the linear. Prints a table and writes JSON.

    OMP_NUM_THREADS=1 python benchmarks/online_hadamard.py
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from zqat_peft.hadamard import apply_hadamard, hadamard_factors

# name -> (intermediate size, hidden size)
SHAPES = {
    "SmolLM2-135M": (1536, 576),
    "Qwen2.5-0.5B": (4864, 896),
    "LLaMA-3-8B": (14336, 4096),
}


def seconds(fn, repeats: int) -> float:
    """The fastest of ``repeats`` calls after a warm-up: on a shared machine the minimum is the least noisy."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(n: int, d: int, rows: int, repeats: int) -> dict:
    factors = [f.float() for f in hadamard_factors(n)]
    x = torch.randn(rows, n)
    weight = torch.randn(d, n)
    hadamard_s = seconds(lambda: apply_hadamard(x, factors), repeats)
    linear_s = seconds(lambda: x @ weight.t(), repeats)
    sizes = [f.shape[0] for f in factors]
    return {"n": n, "d": d, "rows": rows, "factors": sizes, "hadamard_ms": hadamard_s * 1e3,
            "linear_ms": linear_s * 1e3, "ratio": hadamard_s / linear_s, "flop_floor_ratio": sum(sizes) / d}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048, help="tokens per call (batch x sequence)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--out", default="benchmarks/results/online_hadamard.json")
    args = parser.parse_args()
    rows = []
    print("| shape | n = factors | hadamard ms | down_proj ms | ratio | FLOP floor of the ratio |\n|---|---|---|---|---|---|")
    for name in args.shapes:
        n, d = SHAPES[name]
        row = {"shape": name, **measure(n, d, args.rows, args.repeats)}
        rows.append(row)
        print(f"| {name} | {n} = {' x '.join(map(str, row['factors']))} | {row['hadamard_ms']:.1f} | "
              f"{row['linear_ms']:.1f} | {row['ratio']:.2f} | {row['flop_floor_ratio']:.2f} |", flush=True)
    meta = {"rows": args.rows, "repeats": args.repeats, "threads": torch.get_num_threads(), "torch": torch.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
