"""Peak memory of one ZO step at LLaMA-2-13B shape, W2A16 g128, built packed layer by layer.

Per trainable mode, the model is built with ``build_packed_model`` (random weights, the meta device first:
each frozen layer is packed as soon as its weight exists, so the whole float model never does), and then
runs one ZO step (two perturbed forwards of ``batch x seq`` tokens with labels, then the seeded update).
Reported per mode:

* floor, tensors: the bytes of the built model's own storage (each storage once), by kind: packed codes,
  scales, zero points, master weights of trained layers and their clipping logits, embeddings/norms/lm_head;
* floor, arithmetic: the same kinds from the shape alone (the storage format written out, not read from the
  code), for the layers built and for the whole depth of the shape;
* the peak of the step and peak - floor. CUDA: ``torch.cuda.max_memory_allocated``, reset after the build.
  CPU: the floor plus the growth of the process's peak RSS over the step (Linux's VmHWM, reset after the
  build through /proc/self/clear_refs; the baseline is the RSS after the build, freed heap returned first);
* the same for the build itself (its peak over the floor: one layer's float weight and its packing).

On a CPU the full depth is too slow (a forward of 16 x 128 tokens at this shape is ~53 TFLOP): ``--layers N``
builds the first N decoder layers; the floor and the step's transient are measured there and the full-depth
floor is given by arithmetic. ``--smoke`` runs a tiny shape of the same layout in seconds.

    python benchmarks/peak_memory_13b.py --device cuda            # the issue's figure (bf16, every mode)
    nice python benchmarks/peak_memory_13b.py --layers 2 --modes scales lightweight \\
        --out benchmarks/results/peak_memory_13b_cpu.json        # CPU, float32, the first 2 layers
    python benchmarks/peak_memory_13b.py --smoke                  # tiny shape, every mode
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import platform
import re
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import transformers

from zqat_peft import ZeroQATConfig, ZQATLinear, kernels
from zqat_peft.build import build_packed_model
from zqat_peft.zo import (
    ZOTrainingArguments, chunked_causal_lm_loss, loss_difference, projected_gradient, spsa_losses, zo_parameters,
    zo_update,
)

GIB = 2**30
# ZOTrainer's default: the loss over this many token positions at a time
LOSS_CHUNK_TOKENS = ZOTrainingArguments.__dataclass_fields__["zo_loss_chunk_tokens"].default
SHAPES = {
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, vocab_size=32000, tie_word_embeddings=False),
    # the same layout, small: grouped KV heads and an MLP width that is an odd number of groups
    "smoke": dict(hidden_size=256, intermediate_size=640, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False),
}
# The paper's lightweight layers (ZeroQATConfig's default trainable_modules).
LIGHTWEIGHT_LAYERS = ("q_proj", "v_proj")
# The kinds of storage the floor is made of, in the order printed.
FLOOR_KINDS = ("codes", "scales", "zeros", "masters", "clip_logits", "base_layer_weights", "embeddings_norms_lm_head")


def model_config(shape: str, layers: Optional[int] = None) -> transformers.LlamaConfig:
    """The shape's LlamaConfig, with its first ``layers`` decoder layers only when given."""
    fields = dict(SHAPES[shape])
    if layers is not None:
        if not 1 <= layers <= fields["num_hidden_layers"]:
            raise ValueError(f"--layers must be in [1, {fields['num_hidden_layers']}] for {shape}, got {layers}.")
        fields["num_hidden_layers"] = layers
    return transformers.LlamaConfig(**fields, max_position_embeddings=4096)


def linear_shapes(hidden: int, intermediate: int, heads: int, kv_heads: int) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear layer of one LLaMA decoder layer."""
    kv = hidden // heads * kv_heads
    return {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
            "gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate), "down_proj": (intermediate, hidden)}


def arithmetic_floor(shape: dict, layers: int, mode: str, bits: int, group_size: int, dtype_bytes: int) -> dict:
    """Bytes by kind from the shape alone. Storage format: a packed layer holds int32 codes of 32 input rows per
    ``bits`` words, float32 scales and uint8 zero points per group; a trained layer a master weight in the model's
    dtype and two float32 clipping logits per group; the base layers' own weights are empty."""
    floor = dict.fromkeys(FLOOR_KINDS, 0)
    per_layer = linear_shapes(shape["hidden_size"], shape["intermediate_size"], shape["num_attention_heads"],
                              shape["num_key_value_heads"])
    for name, (n_in, n_out) in per_layer.items():
        groups = n_out * (n_in // group_size)
        trained = mode == "full" or (mode == "lightweight" and name in LIGHTWEIGHT_LAYERS)
        if trained:
            floor["masters"] += layers * n_in * n_out * dtype_bytes
            floor["clip_logits"] += layers * 2 * groups * 4
        else:
            floor["codes"] += layers * math.ceil(n_in / 32) * bits * n_out * 4
            floor["scales"] += layers * groups * 4
            floor["zeros"] += layers * groups
    hidden, vocab = shape["hidden_size"], shape["vocab_size"]
    embedding_tables = 1 if shape["tie_word_embeddings"] else 2
    norms = 2 * layers + 1
    floor["embeddings_norms_lm_head"] = (embedding_tables * vocab + norms) * hidden * dtype_bytes
    return floor


def _kind(name: str) -> str:
    for part, kind in (("zqat_qweight", "codes"), ("zqat_scales", "scales"), ("zqat_zeros", "zeros"),
                       ("zqat_weight", "masters"), ("zqat_clip_", "clip_logits"), ("base_layer.", "base_layer_weights"),
                       ("zqat_", "other_quantizer")):
        if f".{part}" in name:
            return kind
    return "embeddings_norms_lm_head"


def tensor_floor(model: torch.nn.Module) -> dict:
    """Bytes of the model's own storage by kind, each storage counted once (tied weights, views), whole."""
    floor = dict.fromkeys(FLOOR_KINDS, 0)
    floor["other_buffers"] = 0  # the rotary tables: not weights, reported apart from the floor
    seen: set[int] = set()
    tensors = [(n, t, False) for n, t in model.named_parameters()] + [(n, t, True) for n, t in model.named_buffers()]
    for name, tensor, is_buffer in tensors:
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        kind = _kind(name)
        if is_buffer and kind == "embeddings_norms_lm_head":
            kind = "other_buffers"
        floor[kind] = floor.get(kind, 0) + storage.nbytes()
    return floor


def float_weights_of_packed_layers(model: torch.nn.Module) -> list[str]:
    """Names of the layers that are packed yet still hold a float weight (a master or a non-empty base weight)."""
    found = []
    for name, layer in model.named_modules():
        if not isinstance(layer, ZQATLinear):
            continue
        for adapter in layer.zqat_spec:
            if layer.is_packed(adapter) and (adapter in layer.zqat_weight or layer.get_base_layer().weight.numel()):
                found.append(name)
    return found


def master_dtypes(model: torch.nn.Module) -> list[str]:
    return sorted({str(t.dtype) for n, t in model.named_parameters() if ".zqat_weight." in n})


def one_zo_step(model: torch.nn.Module, ids: torch.Tensor, seed: int, eps: float, lr: float,
                loss_chunk_tokens: Optional[int] = LOSS_CHUNK_TOKENS) -> tuple[float, float]:
    """One ZO step on ``ids`` (labels = inputs): the two perturbed losses, then the seeded update (absolute
    step). The forwards build no key/value cache and compute the loss ``loss_chunk_tokens`` positions at a
    time, as in ZOTrainer (None: the model's own loss, the whole float32 logits at once)."""
    params = zo_parameters(model)
    inputs = {"input_ids": ids, "labels": ids, "use_cache": False}

    def loss() -> torch.Tensor:
        if loss_chunk_tokens is None:
            return model(**inputs).loss
        return chunked_causal_lm_loss(model, inputs, loss_chunk_tokens)

    loss_pos, loss_neg = spsa_losses(params, loss, seed, eps)
    grad = projected_gradient(float(loss_difference(loss_pos, loss_neg)), eps)
    zo_update(params, [seed], [grad], lr)
    return float(loss_pos), float(loss_neg)


# Peak memory: bytes in use before and the peak during fn(), on the device's own terms.

CUDA_HOW = "torch.cuda.max_memory_allocated, reset before"
CPU_HOW = "process peak RSS (VmHWM) reset before, minus the RSS before (freed heap returned to the OS first)"


def measured(device: torch.device, fn: Callable[[], object]) -> tuple[object, dict]:
    """fn()'s result and {before, peak} bytes: allocated tensors on CUDA, the process's RSS on the CPU."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, {"before": before, "peak": torch.cuda.max_memory_allocated(device)}
    _return_freed_heap()
    _reset_peak_rss()
    before = _proc_status_bytes("VmRSS")
    result = fn()
    return result, {"before": before, "peak": _proc_status_bytes("VmHWM")}


def _proc_status_bytes(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE).group(1)) * 1024


def _reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS
    except OSError as error:
        raise SystemExit(f"The CPU peak needs Linux's /proc/self/clear_refs to reset the peak RSS ({error}); "
                         "run on Linux, or on CUDA (--device cuda).") from error


def _return_freed_heap() -> None:
    """glibc keeps small freed blocks in its heap; give them back so the baseline RSS holds live memory only."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass  # not glibc: the baseline may then hold freed heap the step reuses (a lower growth)


def run_mode(args: argparse.Namespace, mode: str, device: torch.device, dtype: torch.dtype) -> dict:
    """Build one mode's model, check its floor, measure one ZO step; the row of the table."""
    quant = ZeroQATConfig(w_bits=args.w_bits, group_size=args.group_size, trainable=mode)
    config = model_config(args.shape, args.layers)
    start = time.perf_counter()
    model, build = measured(device, lambda: build_packed_model(config, quant, dtype=dtype, device=device))
    build_seconds = time.perf_counter() - start
    lingering = float_weights_of_packed_layers(model)
    if lingering:
        raise RuntimeError(f"{len(lingering)} packed layer(s) still hold a float weight, e.g. {lingering[0]}.")
    floor = tensor_floor(model)
    shape, layers = SHAPES[args.shape], config.num_hidden_layers
    elem = dtype.itemsize
    arithmetic = arithmetic_floor(shape, layers, mode, args.w_bits, args.group_size, elem)
    full_depth = arithmetic_floor(shape, shape["num_hidden_layers"], mode, args.w_bits, args.group_size, elem)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen).to(device)
    start = time.perf_counter()
    losses, step = measured(device, lambda: one_zo_step(model, ids, args.seed, args.eps, args.lr,
                                                         args.loss_chunk_tokens or None))
    step_seconds = time.perf_counter() - start
    floor_bytes = sum(v for k, v in floor.items() if k != "other_buffers")  # any unforeseen kind counts too
    if device.type == "cuda":
        peak, build_peak = step["peak"], build["peak"]
    else:  # the floor plus what the process grew by over the step (resp. the build, which starts from nothing)
        peak, build_peak = floor_bytes + step["peak"] - step["before"], build["peak"] - build["before"]
    return {
        "mode": mode, "layers": layers, "trained_tensors": len(zo_parameters(model)),
        "master_dtypes": master_dtypes(model), "floor_tensors": floor, "floor_arithmetic": arithmetic,
        "floor_bytes": floor_bytes, "floor_arithmetic_bytes": sum(arithmetic.values()),
        "floor_full_depth_arithmetic_bytes": sum(full_depth.values()), "full_depth_layers": shape["num_hidden_layers"],
        "step_before_bytes": step["before"], "step_peak_bytes": peak, "step_over_floor_bytes": peak - floor_bytes,
        "build_peak_bytes": build_peak, "build_over_floor_bytes": build_peak - floor_bytes,
        "loss_pos": losses[0], "loss_neg": losses[1], "build_seconds": build_seconds, "step_seconds": step_seconds,
    }


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny shape of the same layout, 2 x 32 tokens")
    parser.add_argument("--layers", type=int, help="build only the first N decoder layers (default: all)")
    parser.add_argument("--modes", nargs="+", default=["scales", "lightweight", "full"])
    parser.add_argument("--w-bits", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--batch", type=int, help="sequences (default 16; smoke 2)")
    parser.add_argument("--seq", type=int, help="tokens per sequence (default 128; smoke 32)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", help="model dtype (default bfloat16 on CUDA, float32 on the CPU)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    parser.add_argument("--loss-chunk-tokens", type=int, default=LOSS_CHUNK_TOKENS,
                        help=f"token positions per chunk of the loss (default {LOSS_CHUNK_TOKENS}, ZOTrainer's); "
                             "0: the model's own loss over the whole logits")
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/peak_memory_13b.json")
    args = parser.parse_args(argv)
    args.shape = "smoke" if args.smoke else "llama2-13b"
    args.batch = args.batch or (2 if args.smoke else 16)
    args.seq = args.seq or (32 if args.smoke else 128)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.loss_chunk_tokens < 0:
        parser.error(f"--loss-chunk-tokens must be >= 0 (0: the model's own loss), got {args.loss_chunk_tokens}.")
    if not isinstance(getattr(torch, args.dtype, None), torch.dtype):
        parser.error(f"--dtype {args.dtype!r} is not a torch dtype (e.g. bfloat16, float32).")
    return args


def kernel_in_use(device: torch.device) -> str:
    if device.type == "cuda":
        return "zqat CUDA kernels" if kernels.cuda_ext() is not None else "PyTorch path (CUDA kernels not built)"
    return "zqat CPU packed-linear kernel" if kernels.cpu_packed_ext() is not None else "PyTorch path (no CPU kernel)"


def print_table(rows: list[dict], meta: dict) -> None:
    chunk = meta["loss_chunk_tokens"]
    loss_how = f"in chunks of {chunk} tokens" if chunk else "over the whole logits"
    scale, unit = (GIB, "GiB") if max(r["floor_bytes"] for r in rows) >= GIB else (2**20, "MiB")
    print(f"{meta['shape']} shape, {meta['layers']} of {meta['full_depth_layers']} decoder layers, "
          f"W{meta['w_bits']}A16 g{meta['group_size']}, {meta['batch']} x {meta['seq']} tokens, {meta['dtype']}, "
          f"loss {loss_how}, on {meta['device']} ({meta['kernel']}); peak: {meta['peak_how']}")
    full = f"floor {meta['full_depth_layers']}L (arith.)"
    print(f"{'mode':12s} {'floor (tensors)':>15s} {'floor (arith.)':>14s} {'step peak':>10s} {'peak-floor':>10s} "
          f"{'build-floor':>11s} {full:>22s}  {'masters':14s} losses (+eps, -eps)")
    for r in rows:
        print(f"{r['mode']:12s} {r['floor_bytes'] / scale:15.3f} {r['floor_arithmetic_bytes'] / scale:14.3f} "
              f"{r['step_peak_bytes'] / scale:10.3f} {r['step_over_floor_bytes'] / scale:10.3f} "
              f"{r['build_over_floor_bytes'] / scale:11.3f} {r['floor_full_depth_arithmetic_bytes'] / scale:22.3f}  "
              f"{','.join(r['master_dtypes']) or '-':14s} {r['loss_pos']:.6f}, {r['loss_neg']:.6f}")
    print(f"{unit}. floor = packed codes + scales + zero points + master weights and clipping logits of the trained "
          "layers + embeddings, norms, lm_head, from the built model's storage; the full-depth floor is arithmetic.")
    for r in rows:
        kinds = ", ".join(f"{k} {v / scale:.3f}" for k, v in r["floor_tensors"].items() if v)
        print(f"  {r['mode']}: {kinds}")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    kernel = kernel_in_use(device)  # loaded now, not inside the first measurement
    rows = []
    for mode in args.modes:
        rows.append(run_mode(args, mode, device, dtype))
        gc.collect()  # the mode's model is gone before the next one is built
        if device.type == "cuda":
            torch.cuda.empty_cache()
    meta = {key: getattr(args, key) for key in ("shape", "w_bits", "group_size", "batch", "seq", "dtype", "eps", "lr",
                                                 "seed", "modes", "loss_chunk_tokens")}
    meta.update(device=str(device), layers=rows[0]["layers"], full_depth_layers=rows[0]["full_depth_layers"],
                kernel=kernel, peak_how=CUDA_HOW if device.type == "cuda" else CPU_HOW,
                torch=torch.__version__, transformers=transformers.__version__, threads=torch.get_num_threads(),
                machine=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                or platform.machine(), command=" ".join(sys.argv))
    print_table(rows, meta)
    result = {"meta": meta, "modes": {r["mode"]: r for r in rows}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
