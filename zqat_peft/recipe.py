"""Recipes: what a run does, as a YAML file of dotted keys (``train.lr``) over the defaults.

``load_recipe(path, overrides)`` gives the defaults updated by the file and then by ``key=value`` overrides,
checked before any model is loaded: an unknown key or an unusable value is a ``RecipeError`` that says which
key and what it accepts. Every key and its default is in ``default_recipe()``.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import yaml
from transformers import SchedulerType

from .data import ASSETS, MODELS, TEXT_CORPORA
from .evaluation.zeroshot import available_tasks
from .tuner import ZeroQATConfig

SECTIONS = ("quant", "calibration", "train", "eval", "finetune")
TASKS = ("boolq",)
FINETUNE_LOSSES = ("lm", "choices")
TRAIN_LOSSES = ("ce", "distill")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANT_KEYS = (
    "w_bits", "a_bits", "kv_bits", "group_size", "symmetric", "target_modules", "exclude_modules", "trainable",
    "trainable_modules", "init", "smooth", "calib_epochs", "calib_lr", "calib_smooth_lr", "calib_alpha",
    "rounding", "gptq_damp", "gptq_block_size", "rotate", "rotation_seed",
)
_SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


class RecipeError(ValueError):
    """A recipe that cannot be used as written (unknown key, bad value)."""


def default_recipe() -> dict:
    """Every recipe key with its default value; a recipe file or an override changes some of them."""
    quant = ZeroQATConfig()
    return {
        "name": None,  # default: the recipe file's name
        "output_dir": None,  # default: runs/NAME
        "model": "smollm2-135m",  # a zqat_peft.data model name, a local folder or a Hub id
        "dtype": "float32",
        "seed": 0,
        # also write runs/NAME/init_adapter, the model ZO training starts from, so it can be evaluated later
        # on more data (zqat eval --adapter runs/NAME/init_adapter) against runs/NAME/adapter
        "save_init": False,
        # an adapter folder (e.g. runs/NAME/init_adapter, or a trained runs/NAME/adapter) to train from instead of
        # quantizing and calibrating anew; its quantization settings must be the recipe's quant keys
        "start_from": None,
        "task": None,  # None: language modelling; "boolq": fine-tuning
        "quant": {k: copy.deepcopy(getattr(quant, k)) for k in QUANT_KEYS},  # ZeroQATConfig fields
        "calibration": {"data": "wiki", "n_samples": 32, "seq_len": 256, "batch_size": 4},
        "train": {
            "data": "wiki", "seq_len": 256, "batch_size": 8, "steps": 200, "lr": 1e-5, "eps": 1e-3, "num_queries": 1,
            "grad_clip": None, "weight_decay": 0.0, "scheduler": "constant", "warmup_steps": 0, "logging_steps": 10,
            "bf16": False,
            # a transformers scheduler's own arguments (TrainingArguments.lr_scheduler_kwargs), e.g. for
            # scheduler: warmup_stable_decay, {num_decay_steps: 300, min_lr_ratio: 0.3, decay_type: linear}
            "scheduler_kwargs": {},
            # "ce": next-token cross-entropy on train.data; "distill": KL to the full-precision model's top-k
            # next-token distribution on the same windows (zqat_peft.distill), which keeps the model close to
            # what it was rather than fitting train.data
            "loss": "ce",
            # the first max_windows windows of train.data's train split; null: all of them ("distill": the
            # steps * batch_size windows one pass visits, since each needs a full-precision forward first)
            "max_windows": None,
            # Every eval_steps steps, the loss on held-out data (the first eval_windows windows of train.data's
            # validation split; BoolQ: the validation questions); the best checkpoint is the result. null: off.
            "eval_steps": None, "eval_windows": 32,
        },
        "eval": {
            "corpora": {"wiki": "wiki", "lee": "lee", "austen": "austen"},  # metric prefix -> corpus
            "split": "test", "seq_len": 512, "max_windows": None, "batch_size": 4,
            "tasks": [], "limit": None, "zero_shot_batch_size": 8,
        },
        "finetune": {
            "n_train": 1000, "n_val": 500, "n_test": 1000, "max_length": 512, "eval_batch_size": 8,
            # "choices": cross-entropy over the answers' logits only (MeZO's classification loss: the loss is
            # about the decision, nothing else); "lm": the answer token's cross-entropy over the whole vocabulary,
            # which ZO lowers mostly by moving mass onto the answer tokens, not by choosing (benchmarks/RESULTS.md)
            "loss": "choices",
        },
    }


def valid_keys() -> list[str]:
    """The dotted recipe keys, e.g. ``train.lr``."""
    keys = []
    for key, value in default_recipe().items():
        keys += [f"{key}.{sub}" for sub in value] if key in SECTIONS else [key]
    return keys


def load_recipe(path: Optional[str | os.PathLike] = None, overrides: Sequence[str] = ()) -> dict:
    """The defaults, updated by the YAML file at ``path`` and then by ``key=value`` overrides
    (dotted keys, YAML-typed values: ``train.lr=2e-5``, ``eval.tasks=[piqa]``)."""
    recipe = default_recipe()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe file not found: {path}")
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise RecipeError(f"{path}: a recipe is a YAML mapping of keys to values")
        for key, value in loaded.items():
            _apply(recipe, str(key), value)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise RecipeError(f"override {item!r} is not of the form key=value")
        _apply(recipe, key.strip(), yaml.safe_load(raw))
    if recipe["name"] is None:
        recipe["name"] = Path(path).stem if path is not None else "run"
    check_recipe(recipe)
    return recipe


def _apply(recipe: dict, key: str, value: Any) -> None:
    """Set one key; a mapping given to a section (``quant: {w_bits: 3}``) sets each of its keys."""
    if key in SECTIONS and isinstance(value, dict):
        for sub, v in value.items():
            _set(recipe, f"{key}.{sub}", v)
    else:
        _set(recipe, key, value)


def _set(recipe: dict, key: str, value: Any) -> None:
    keys = valid_keys()
    if key not in keys:
        hint = f" ({key} is a section: set its keys, e.g. {key}.{next(iter(recipe[key]))})" if key in SECTIONS else ""
        raise RecipeError(f"unknown recipe key {key!r}{hint}; valid keys: {', '.join(keys)}")
    if isinstance(value, str) and _SCIENTIFIC.match(value):
        value = float(value)  # YAML 1.1 reads 1e-5 (no dot) as a string
    section, _, sub = key.partition(".")
    if sub:
        recipe[section][sub] = value
    else:
        recipe[section] = value


def check_recipe(recipe: dict) -> None:
    """Refuse values the job cannot use, before any model is loaded."""
    if recipe["task"] not in (None, *TASKS):
        raise RecipeError(f"task must be null (language modelling) or one of {TASKS}, got {recipe['task']!r}")
    if recipe["dtype"] not in DTYPES:
        raise RecipeError(f"dtype must be one of {tuple(DTYPES)}, got {recipe['dtype']!r}")
    if not isinstance(recipe["eval"]["corpora"], dict):
        raise RecipeError("eval.corpora must be a mapping of metric prefix to corpus, e.g. {wiki: wiki}")
    known = available_tasks()
    tasks = recipe["eval"]["tasks"]
    if not isinstance(tasks, list) or any(t not in known for t in tasks):
        raise RecipeError(f"eval.tasks must be a list of zero-shot tasks among {', '.join(known)}; got {tasks!r}")
    if recipe["finetune"]["loss"] not in FINETUNE_LOSSES:
        raise RecipeError(f"finetune.loss must be one of {FINETUNE_LOSSES}, got {recipe['finetune']['loss']!r}")
    t = recipe["train"]
    for key in ("steps", "eval_steps", "eval_windows", "max_windows"):
        nullable = key in ("eval_steps", "max_windows")
        if t[key] is None and nullable:
            continue
        if isinstance(t[key], bool) or not isinstance(t[key], int) or t[key] < 1:
            raise RecipeError(f"train.{key} must be a positive integer{' or null' if nullable else ''}, got {t[key]!r}")
    schedulers = [s.value for s in SchedulerType]
    if t["scheduler"] not in schedulers:
        raise RecipeError(f"train.scheduler must be one of {', '.join(schedulers)}; got {t['scheduler']!r}")
    if not isinstance(t["scheduler_kwargs"], dict):
        raise RecipeError("train.scheduler_kwargs must be a mapping of the scheduler's arguments, e.g. "
                          f"{{num_decay_steps: 100}}; got {t['scheduler_kwargs']!r}")
    if t["loss"] not in TRAIN_LOSSES:
        raise RecipeError(f"train.loss must be one of {TRAIN_LOSSES}, got {t['loss']!r}")
    if t["loss"] == "distill" and recipe["task"] is not None:
        raise RecipeError("train.loss=distill is for language modelling (task: null); a fine-tuning task "
                          "trains on its answers (finetune.loss)")
    if t["eval_steps"] is not None and t["eval_steps"] > t["steps"]:
        # no check would run during training, and the run would give back the start, untrained
        raise RecipeError(f"train.eval_steps ({t['eval_steps']}) is larger than train.steps ({t['steps']}): "
                          "lower it or set it to null")
    if not isinstance(recipe["save_init"], bool):
        raise RecipeError(f"save_init must be true or false, got {recipe['save_init']!r}")
    quant_config(recipe)  # ZeroQATConfig checks the quantization settings
    if recipe["start_from"] is not None:
        check_start_from(recipe)


# What a saved adapter's codes, scales and smoothing depend on: a recipe that starts from it must agree.
START_KEYS = ("w_bits", "a_bits", "kv_bits", "group_size", "symmetric", "trainable", "init")


def check_start_from(recipe: dict) -> None:
    """Refuse a ``start_from`` that is not an adapter folder, or whose quantization is not the recipe's."""
    path = recipe["start_from"]
    if not isinstance(path, str) or not (Path(path) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"start_from: no adapter in {path!r} (no adapter_config.json); expected an adapter "
                                "folder such as runs/NAME/init_adapter")
    saved, wanted = ZeroQATConfig.from_pretrained(path), quant_config(recipe)
    keys = [*START_KEYS, "trainable_modules"] if wanted.trainable == "lightweight" else list(START_KEYS)
    differ = [f"quant.{k} {getattr(saved, k)!r} there, {getattr(wanted, k)!r} here" for k in keys
              if getattr(saved, k) != getattr(wanted, k)]
    if saved.smooths != wanted.smooths:
        differ.append(f"quant.smooth {saved.smooth!r} there, {wanted.smooth!r} here")
    if differ:
        raise RecipeError(f"start_from {path} was quantized otherwise ({'; '.join(differ)}): set those quant keys "
                          "to the adapter's")
    base = saved.base_model_name_or_path
    if base and _model_name(base) != _model_name(recipe["model"]):
        raise RecipeError(f"start_from {path} was trained on the base model {base!r}, the recipe's model is "
                          f"{recipe['model']!r}: set model= to the adapter's base model")


def _model_name(name_or_path: Any) -> str:
    """A model's last name component, so that a short name, its cached folder and a moved copy compare equal."""
    return Path(str(name_or_path).rstrip("/\\")).name.lower()


def calibrates(recipe: dict) -> bool:
    """Whether the job calibrates a fresh quantized model (not when it starts from a saved adapter)."""
    return recipe["quant"]["init"] == "calibrate" and recipe["start_from"] is None


def quant_config(recipe: dict, **changes: Any) -> ZeroQATConfig:
    return ZeroQATConfig(**{**recipe["quant"], **changes})


def output_dir(recipe: dict) -> Path:
    return Path(recipe["output_dir"] or Path("runs") / recipe["name"])


def required_assets(recipe: dict) -> list[str]:
    """The zqat_peft.data assets the recipe reads (fetched before the job starts)."""
    names = {"model"} if str(recipe["model"]).lower() in MODELS else set()
    sources = list(recipe["eval"]["corpora"].values())
    if recipe["task"] is None:
        sources.append(recipe["train"]["data"])
    if calibrates(recipe):
        sources.append(recipe["calibration"]["data"])
    names |= {s for s in sources if s in TEXT_CORPORA}
    if recipe["eval"]["tasks"] or recipe["task"]:
        names.add("tasks")
    return [a for a in ASSETS if a in names]


def changed_keys(before: dict, after: dict) -> list[str]:
    """The dotted keys whose values differ between two recipes (one may be a run's saved ``config.yaml``, which
    lacks the keys added since it was written: those count as their defaults)."""
    defaults = default_recipe()
    return sorted(k for k in valid_keys() if _get(before, k, defaults) != _get(after, k, defaults))


def _get(recipe: dict, key: str, defaults: dict) -> Any:
    section, _, sub = key.partition(".")
    if sub:
        return recipe.get(section, {}).get(sub, defaults[section][sub])
    return recipe.get(section, defaults[section])
