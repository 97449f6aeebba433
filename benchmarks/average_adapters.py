"""The element-wise average of saved adapters trained from one init (a "model soup"): a diagnostic of how much
of a ZO training's result is its random directions' noise.

Two ZO trainings from the same saved init, with different seeds, share the gradient's signal and differ in their
noise (and, where the seed draws the training text, in their samples); to first order their average keeps the signal
and halves the noise's variance, as averaging two directions a step (``train.num_queries: 2``) does within one
training at the same number of forwards (benchmarks/RESULTS.md measures both at W4A4). Only the floating-point
tensors (scales, clipping ratios, norm weights, master weights) are averaged; the packed integer codes must be
equal in every adapter (the same init, trained without the codes moving), and the adapters' configs equal.
Evaluate the result with benchmarks/kl_by_position.py or zqat_peft's own evaluation like any saved adapter.

    python benchmarks/average_adapters.py --adapter runs/A/adapter --adapter runs/B/adapter --out runs/AB_average
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from zqat_peft.recipe import check_adapter_folder

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def average_state(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The float tensors averaged (in float64, stored in their dtype); every other tensor must be equal in all."""
    keys = set(states[0])
    for state in states[1:]:
        if set(state) != keys:
            raise ValueError(f"the adapters hold different tensors ({sorted(keys ^ set(state))[:4]}...): they were "
                             "not saved from the same tuner configuration")
    averaged = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            total = sum(state[key].double() for state in states)
            averaged[key] = (total / len(states)).to(first.dtype)
        elif all(torch.equal(first, state[key]) for state in states[1:]):
            averaged[key] = first
        else:
            raise ValueError(f"{key} (integer) differs between the adapters: they do not start from the same packed "
                             "init, and codes cannot be averaged")
    return averaged


def comparable(config: dict) -> dict:
    """The config with its lists of module names sorted: peft saves target_modules, a set, in any order."""
    return {k: sorted(v) if isinstance(v, list) and all(isinstance(x, str) for x in v) else v
            for k, v in config.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", action="append", required=True, help="a saved adapter folder (two or more)")
    parser.add_argument("--out", required=True, help="the folder the averaged adapter is written to")
    args = parser.parse_args()
    folders = [Path(a) for a in args.adapter]
    if len(folders) < 2:
        raise SystemExit("give at least two --adapter folders to average")
    configs = [comparable(check_adapter_folder(f)) for f in folders]  # each folder whole and of ZeroQAT's type
    if any(c != configs[0] for c in configs[1:]):
        raise SystemExit(f"the adapters' {CONFIG} differ: average only adapters of one configuration")
    averaged = average_state([load_file(f / WEIGHTS) for f in folders])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(folders[0] / CONFIG, out / CONFIG)
    save_file(averaged, out / WEIGHTS, metadata={"format": "pt"})
    print(f"averaged {len(folders)} adapters ({sum(t.is_floating_point() for t in averaged.values())} float tensors) "
          f"into {out}")


if __name__ == "__main__":
    main()
