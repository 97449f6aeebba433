"""Writing an exported checkpoint folder: safetensors shards, config.json, tokenizer, generation config.

The folder is written next to its destination and moved there at the end, so a failed export leaves
nothing behind and an existing folder is never overwritten.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from safetensors.torch import save_file
from torch import Tensor, nn

from .weights import base_model

MAX_SHARD_BYTES = 5 * 2**30  # transformers' default shard size


@contextmanager
def new_folder(out_dir: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder that becomes ``out_dir`` when the block ends without an error."""
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new folder for the export")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_safetensors(folder: Path, tensors: dict[str, Tensor], max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards plus their index when larger."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_model_files(
    folder: Path, model: nn.Module, tokenizer: Any, quantization_config: Optional[dict[str, Any]]
) -> None:
    """config.json (with ``quantization_config`` when given), generation_config.json and the tokenizer."""
    base = base_model(model)
    config = copy.deepcopy(base.config)
    if quantization_config is not None:
        config.quantization_config = quantization_config
    elif hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    generation_config = getattr(base, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
