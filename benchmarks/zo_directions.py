"""Two ZO perturbation shapes the library does not ship, each run through zo_sweep's protocol (the same init,
training windows, held-out check and evaluation), so that their rows compare with zo_sweep's per-tensor step:

- ``--direction group``: each master-weight element's perturbation and update are scaled by its group's
  quantization step at the start of training (normalized to RMS 1 over the tensor, so the per-tensor unit of the
  relative step still sets the overall size): a probe moves every group by about the same number of grid steps.
- ``--direction lowrank``: LOZO's low-rank direction z = U V^T / sqrt(r), Gaussian U [out, r] drawn per query
  and V [in, r] redrawn every ``--lazy`` steps, for every 2-D master weight.

Every other tensor keeps the library's noise, and the seeds, estimator, relative step and update rule are the
library's. An experiment, not a training option: float32 master weights on the CPU (on CUDA the fused kernel would
perturb with the library's noise), no resume or trajectory replay (the trajectory does not record the shape).

    python benchmarks/zo_directions.py --direction group -- --recipe recipes/demo.yaml --set train.lr=3e-3 ...
"""

from __future__ import annotations

import argparse
import runpy
import sys
import zlib
from pathlib import Path
from unittest import mock

import torch

from zqat_peft.noise import WeightNoise, zo_noise
from zqat_peft.quant.primitives import weight_qparams
from zqat_peft.zo import estimator
from zqat_peft.zo.optimizer import ZOOptimizer
from zqat_peft.zo.perturbation import ZOParameter


class Directions:
    """The replacement direction z(seed, key) of each master weight, by its noise key."""

    def __init__(self, kind: str, rank: int, lazy: int) -> None:
        self.kind, self.rank, self.lazy = kind, rank, lazy
        self.group_units: dict[int, torch.Tensor] = {}  # kind "group": the per-element multiplier of z
        self.shapes: dict[int, tuple[int, int]] = {}
        self.v_draw = 0  # kind "lowrank": which V is current (the step // lazy)

    def register(self, params: list[ZOParameter]) -> None:
        for p in params:
            if p.margin is None:  # not a quantized master weight
                continue
            if p.param.dtype != torch.float32 or p.param.device.type != "cpu":
                # on CUDA the fused kernel would perturb with the library's noise, not this direction
                raise SystemExit(f"{p.name} is {p.param.dtype} on {p.param.device}: this experiment runs float32 "
                                 "master weights on the CPU only")
            self.shapes[p.key] = tuple(p.param.shape)
            if self.kind == "group":
                self.group_units[p.key] = group_unit(p)
        print(f"[zo_directions] {self.kind}: {len(self.shapes)} of {len(params)} trained tensors", flush=True)

    def z(self, seed: int, key: int, like: torch.Tensor) -> torch.Tensor:
        """The direction of (seed, key) in float32 before the group unit (kind "group": the library's own)."""
        if self.kind == "group":
            return zo_noise(seed, key, like.shape, device=like.device)
        rows, cols = self.shapes[key]
        u = gaussian((rows, self.rank), f"u/{seed}/{key}")
        v = gaussian((cols, self.rank), f"v/{self.v_draw}/{key}")
        return (u @ v.T) / self.rank ** 0.5

    def perturbed(self, weight: torch.Tensor, seed: int, key: int, size: float) -> torch.Tensor:
        if self.kind == "group":
            return (weight.float() + (size * self.group_units[key]) * self.z(seed, key, weight)).to(weight.dtype)
        return (weight.float() + size * self.z(seed, key, weight)).to(weight.dtype)

    def update_(self, param: torch.Tensor, key: int, terms: list[tuple[int, float]], decay: float) -> None:
        param.mul_(decay)
        if self.kind == "group":
            total = torch.zeros_like(param)
            for seed, coef in terms:
                total.add_(self.z(seed, key, param), alpha=float(coef))
            param.add_(total * self.group_units[key])
            return
        for seed, coef in terms:
            param.add_(self.z(seed, key, param), alpha=float(coef))


def group_unit(p: ZOParameter) -> torch.Tensor:
    """Each element's group quantization step, [out, in], normalized to RMS 1 over the tensor."""
    layer, holder, attr = p.sites[0]
    spec, master = layer.zqat_spec[attr], holder[attr]
    with torch.no_grad():
        step, _ = weight_qparams(master, spec.w_bits, spec.group_size, spec.symmetric,
                                 layer.zqat_clip_lower[attr], layer.zqat_clip_upper[attr])
        unit = step.float().repeat_interleave(master.shape[1] // step.shape[1], dim=1)
        return (unit / unit.pow(2).mean().sqrt()).contiguous()


def gaussian(shape: tuple[int, int], name: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def direction_patches(directions: Directions) -> list:
    """Patches that route the library's perturbation and update of the registered tensors through ``directions``."""
    optimizer_init, seeds_of = ZOOptimizer.__init__, ZOOptimizer.seeds.fget
    applied_to, add_update = WeightNoise.applied_to, estimator.add_noise_update_

    def init(self, params, *args, **kwargs):
        optimizer_init(self, params, *args, **kwargs)
        directions.register(self.zo_params)

    def seeds(self):  # read at each step's probes and update, before the step is recorded
        directions.v_draw = len(self.trajectory) // directions.lazy
        return seeds_of(self)

    def perturbed_weight(self, weight):
        if self.key not in directions.shapes:
            return applied_to(self, weight)
        if self.mask is not None:
            raise SystemExit("this experiment does not combine with train.mask=rounding")
        return directions.perturbed(weight, self.seed, self.key, self.scale)

    def update(param, key, terms, decay=1.0, rounding_seed=0):
        if key not in directions.shapes:
            return add_update(param, key, terms, decay, rounding_seed)
        with torch.no_grad():
            directions.update_(param, key, [(seed, coef) for seed, coef in terms if coef != 0.0], decay)
        return param

    return [mock.patch.object(ZOOptimizer, "__init__", init),
            mock.patch.object(ZOOptimizer, "seeds", property(seeds)),
            mock.patch.object(WeightNoise, "applied_to", perturbed_weight),
            mock.patch.object(estimator, "add_noise_update_", update)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--direction", choices=("group", "lowrank"), required=True)
    parser.add_argument("--rank", type=int, default=2, help="lowrank: r")
    parser.add_argument("--lazy", type=int, default=50, help="lowrank: steps between draws of V")
    parser.add_argument("sweep_args", nargs=argparse.REMAINDER, help="-- then zo_sweep.py's arguments")
    args = parser.parse_args()
    sweep_args = args.sweep_args[1:] if args.sweep_args[:1] == ["--"] else args.sweep_args
    patches = direction_patches(Directions(args.direction, args.rank, args.lazy))
    for patch in patches:
        patch.start()
    try:
        sys.argv = ["zo_sweep.py", *sweep_args]
        runpy.run_path(str(Path(__file__).with_name("zo_sweep.py")), run_name="__main__")
    finally:
        for patch in reversed(patches):
            patch.stop()


if __name__ == "__main__":
    main()
