"""How much of a ZO estimate is signal: the projected gradient of the same perturbations on two batches.

For a model (a saved adapter, e.g. a run's ``init_adapter``), fixed directions z_1..z_n (seeds) and each eps,
the projected gradient g = (L(w + eps z) - L(w - eps z)) / (2 eps) is measured on two disjoint training
batches A and B. Over the n directions:

- corr(A, B): the part of g both batches share (the gradient of the quantized model's loss along z, plus
  whatever rounding of the weights the perturbation flips, which every batch sees); 1 = noise-free, 0 = the
  estimate is all batch noise (data, and rounding of the activations, which differs per batch);
- corr(eps, next eps) on batch A: whether g measures the same slope at the next, larger eps (low when the
  loss is rough at that scale; read corr(A, B) with it: flipped weight roundings are shared by both batches
  and raise corr(A, B) without being a slope);
- rms g: the size of the estimate (the update is lr * g * z).

No training: two forwards per (direction, eps, batch). Prints a table and writes JSON.

    python benchmarks/zo_noise.py --adapter w3=runs/NAME/init_adapter --adapter w4a4=runs/OTHER/init_adapter
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from zqat_peft.pipeline import alternating_windows, load_adapter, pick_device
from zqat_peft.recipe import load_recipe, train_corpora
from zqat_peft.zo.estimator import projected_gradient, spsa_losses, step_seeds
from zqat_peft.zo.perturbation import zo_parameters


def projected_gradients(model, batch: torch.Tensor, seeds: list[int], eps: float) -> list[float]:
    params = zo_parameters(model)

    def loss() -> torch.Tensor:
        return model(input_ids=batch, labels=batch).loss

    out = []
    for seed in seeds:
        loss_pos, loss_neg = spsa_losses(params, loss, seed, eps)
        out.append(projected_gradient(float(loss_pos - loss_neg), eps))
    return out


def corr(a: list[float], b: list[float]) -> float:
    return float(torch.corrcoef(torch.tensor([a, b], dtype=torch.float64))[0, 1])


def measure(recipe: dict, adapter: str, eps_list: list[float], n_dirs: int, batch: int, seq_len: int,
            device: str) -> list[dict]:
    model, tokenizer = load_adapter(recipe, adapter, device, trainable=True)
    model.eval()
    windows = alternating_windows(tokenizer, train_corpora(recipe), "train", seq_len, 2 * batch)
    batches = {"A": windows[:batch].to(device), "B": windows[batch:].to(device)}
    seeds = [step_seeds(recipe["seed"], i, 1)[0] for i in range(n_dirs)]
    g = {(name, eps): projected_gradients(model, b, seeds, eps) for eps in eps_list for name, b in batches.items()}
    rows = []
    for i, eps in enumerate(eps_list):
        a, b = g[("A", eps)], g[("B", eps)]
        nxt = eps_list[i + 1] if i + 1 < len(eps_list) else None
        rows.append({"eps": eps, "corr_ab": corr(a, b), "corr_next_eps": corr(a, g[("A", nxt)]) if nxt else None,
                     "rms_g": float(torch.tensor(a + b).pow(2).mean().sqrt()), "g_a": a, "g_b": b})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", action="append", required=True, metavar="LABEL=ADAPTER_DIR",
                        help="a saved adapter, e.g. a run's init_adapter (its quantization settings are its own)")
    parser.add_argument("--recipe", default="recipes/demo.yaml", help="the base model, training data and seed")
    parser.add_argument("--eps", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3, 1e-2])
    parser.add_argument("--directions", type=int, default=24)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/zo_noise.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device()
    results = {"meta": vars(args) | {"device": device}, "runs": {}}
    print("| model | eps | corr(A, B) | corr(eps, next eps) | rms g |\n|---|---|---|---|---|")
    recipe = load_recipe(args.recipe)
    for item in args.adapter:
        label, _, adapter = item.partition("=")
        start = time.perf_counter()
        rows = measure(recipe, adapter, sorted(args.eps), args.directions, args.batch, args.seq_len, device)
        results["runs"][label] = {"adapter": adapter, "seconds": time.perf_counter() - start, "rows": rows}
        for r in rows:
            nxt = "" if r["corr_next_eps"] is None else f"{r['corr_next_eps']:.2f}"
            print(f"| {label} | {r['eps']:g} | {r['corr_ab']:.2f} | {nxt} | {r['rms_g']:.3g} |", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
