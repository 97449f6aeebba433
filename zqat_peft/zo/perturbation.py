"""Perturbing a model's trainable parameters inside its forward, without ever writing them.

For a seed s and a scale c, every trainable parameter p is seen by its module as p + c * r_p * z(s, p) for
the duration of that module's forward only: a forward pre-hook swaps the perturbed tensor in, a
forward hook swaps the stored parameter back. The stored parameters are never modified, so after a
+eps and a -eps pass they are bit-identical to before (no drift), and the extra memory is one
module's perturbed weights at a time. r_p is the parameter's reference scale (``ZOParameter.scale``): 1 for
the absolute step, the tensor's RMS at the start of training for the relative one. This works for any module whose forward reads its parameters
(nn.Linear, LoRA's lora_A/lora_B, ZQATLinear's ParameterDict entries, norms, embeddings).

A module may instead take the perturbation into its own forward: if it has ``set_weight_noise(holder,
attr, noise)`` and that returns True, it is handed a ``WeightNoise`` (seed, key, scale) and no perturbed
copy is made. ZQATLinear does this for its master weight, so on CUDA the noise is generated inside the
fake-quantization kernel (the master weight is read once, not read, written and read again); the loss is
bit-identical.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from ..noise import WeightNoise, param_key

_CONTAINERS = (nn.ParameterDict, nn.ParameterList, nn.ModuleDict, nn.ModuleList)


@dataclass
class ZOParameter:
    """A trainable parameter, the stable key its noise derives from, and where it is read."""

    name: str
    param: nn.Parameter
    key: int
    # (module whose forward reads the parameter, holder of the parameter, attribute name in the holder)
    sites: list[tuple[nn.Module, nn.Module, str]] = field(default_factory=list)
    # perturbation and update sizes are multiplied by it: 1.0 (absolute step) or the tensor's reference scale
    scale: float = 1.0
    # for a master weight quantized in the forward: each element's distance to a change of its quantized value
    # (ZQATLayer.weight_rounding_margin); None for every other tensor
    margin: Optional[Callable[[], Optional[torch.Tensor]]] = None
    # the margin within which a step's perturbation can change an element's share of the quantized forward
    # (``rounding_reach``, with ZOOptimizer's mask="rounding"); inf: every element is perturbed and updated
    reach: float = math.inf
    _mask: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)
    _mask_reach: Optional[float] = field(default=None, repr=False, compare=False)

    def mask(self) -> Optional[torch.Tensor]:
        """The elements a perturbation within ``reach`` can move across a rounding boundary (bool, the
        parameter's shape), or None for all of them. The others cannot change the loss, so their share of the
        SPSA update is pure noise. Measured once per step, at the weights the step starts from: the update
        (``zo_update``) calls ``forget_mask``."""
        if self.margin is None or math.isinf(self.reach):
            return None
        if self._mask_reach != self.reach:
            margin = self.margin()
            self._mask = None if margin is None else margin < self.reach
            self._mask_reach = self.reach
        return self._mask

    def forget_mask(self) -> None:
        self._mask, self._mask_reach = None, None


def check_not_offloaded(model: nn.Module) -> None:
    """Refuse a model with accelerate offload hooks: they load each weight from their own copy before the
    module's forward, over the perturbed one, and the ZO update would write to a placeholder."""
    offloaded = [name for name, module in model.named_modules() if _offloads(getattr(module, "_hf_hook", None))]
    if offloaded:
        raise ValueError(
            f"{len(offloaded)} module(s) have their weights offloaded by accelerate hooks, e.g. {offloaded[0] or 'the model'}: "
            "ZO training perturbs and updates the weights in place and cannot train offloaded weights. Load the "
            "model onto one device (no device_map offload to cpu/disk, no cpu_offload)."
        )


def _offloads(hook) -> bool:
    """Whether an accelerate hook (or a SequentialHook of them) offloads its module's weights."""
    return bool(getattr(hook, "offload", False)) or any(_offloads(h) for h in getattr(hook, "hooks", ()))


def zo_parameters(model: nn.Module) -> list[ZOParameter]:
    """The parameters ZO training updates: those with requires_grad, in a stable order.

    A parameter shared by several modules (tied weights) is perturbed identically at every site.
    """
    check_not_offloaded(model)
    by_id: dict[int, ZOParameter] = {}
    modules = dict(model.named_modules(remove_duplicate=False))
    for name, param in model.named_parameters(remove_duplicate=False):
        if not param.requires_grad:
            continue
        holder_name, _, attr = name.rpartition(".")
        entry = by_id.setdefault(id(param), ZOParameter(name, param, param_key(name)))
        caller, holder = _calling_module(modules, holder_name), modules[holder_name]
        entry.sites.append((caller, holder, attr))
        if entry.margin is None and hasattr(caller, "weight_rounding_margin"):
            entry.margin = functools.partial(caller.weight_rounding_margin, holder, attr)
    if not by_id:
        raise ValueError(
            "The model has no trainable parameters (none has requires_grad=True): nothing for ZO training to update."
        )
    return list(by_id.values())


def _calling_module(modules: dict[str, nn.Module], holder_name: str) -> nn.Module:
    """The nearest module at or above the holder whose forward runs (containers are never called)."""
    name = holder_name
    while isinstance(modules[name], _CONTAINERS):
        name = name.rpartition(".")[0]
    return modules[name]


@contextlib.contextmanager
def perturbed(params: list[ZOParameter], seed: int, scale: float) -> Iterator[None]:
    """Inside this block, every forward sees each parameter as p + scale * p.scale * z(seed, p).

    Raises if a parameter was never swapped in during the block (it is read outside its module's
    forward), because its perturbation would silently be missing from the loss difference.
    """
    sites_by_module: dict[nn.Module, list[tuple[nn.Module, str, ZOParameter]]] = {}
    for p in params:
        for caller, holder, attr in p.sites:
            sites_by_module.setdefault(caller, []).append((holder, attr, p))
    noise = {id(p): WeightNoise(seed, p.key, scale * p.scale, p.mask()) for p in params}  # built once; checks the scale
    used: set[int] = set()

    def swap_in(module: nn.Module, args) -> None:
        for holder, attr, p in sites_by_module[module]:
            if not _set_noise(module, holder, attr, noise[id(p)]):
                holder._parameters[attr] = noise[id(p)].applied_to(p.param)
            used.add(id(p))

    def swap_back(module: nn.Module, args, output) -> None:
        for holder, attr, p in sites_by_module[module]:
            if not _set_noise(module, holder, attr, None):
                holder._parameters[attr] = p.param

    handles = []
    for module in sites_by_module:
        handles.append(module.register_forward_pre_hook(swap_in))
        handles.append(module.register_forward_hook(swap_back, always_call=True))
    try:
        with torch.no_grad():
            yield
    finally:
        for h in handles:
            h.remove()
        for module, sites in sites_by_module.items():
            for holder, attr, p in sites:
                if not _set_noise(module, holder, attr, None):
                    holder._parameters[attr] = p.param
    missing = [p.name for p in params if id(p) not in used]
    if missing:
        raise RuntimeError(
            f"{len(missing)} trainable parameter(s) were not read inside their module's forward, e.g. {missing[0]}; "
            "ZO training cannot perturb them. Freeze them (requires_grad=False) or train the module that uses them."
        )


def _set_noise(module: nn.Module, holder: nn.Module, attr: str, noise: WeightNoise | None) -> bool:
    """Hand the perturbation of ``holder.attr`` to the module's own forward, if it takes it."""
    set_weight_noise = getattr(module, "set_weight_noise", None)
    return set_weight_noise is not None and set_weight_noise(holder, attr, noise)
