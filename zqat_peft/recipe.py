"""Recipes: what a run does, as a YAML file of dotted keys (``train.lr``) over the defaults.

``load_recipe(path, overrides)`` gives the defaults updated by the file and then by ``key=value`` overrides,
checked before any model is loaded: an unknown key or an unusable value is a ``RecipeError`` that says which
key and what it accepts. Every key and its default is in ``default_recipe()``.
"""

from __future__ import annotations

import copy
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import yaml
from transformers import SchedulerType

from .data import ASSETS, MODELS, TEXT_CORPORA, check_model_source, check_text_source, model_asset
from .evaluation.zeroshot import available_tasks
from .files import check_adapter, read_yaml
from .tuner import ZeroQATConfig
from .tuner.registration import zqat_peft_type
from .zo.estimator import ZO_ESTIMATORS, ZO_MASKS
from .zo.optimizer import ZO_STEPS, step_sizes

SECTIONS = ("quant", "calibration", "train", "eval", "finetune")
TASKS = ("boolq",)
FINETUNE_LOSSES = ("lm", "choices")
TRAIN_LOSSES = ("ce", "distill")
GENERATED = "generated"  # train.data: text sampled from the full-precision model, not a corpus
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANT_KEYS = (
    "w_bits", "a_bits", "act_clip", "kv_bits", "group_size", "symmetric", "target_modules", "exclude_modules", "trainable",
    "trainable_modules", "init", "smooth", "calib_epochs", "calib_lr", "calib_smooth_lr", "calib_alpha",
    "calib_refine_epochs", "calib_refine_lr", "rounding", "gptq_damp", "gptq_block_size", "gptq_act_order",
    "gptq_master", "rotate", "rotation_seed", "online_hadamard", "modules_to_save",
)
_SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


class RecipeError(ValueError):
    """A recipe that cannot be used as written (unknown key, bad value)."""


@dataclass(frozen=True)
class Range:
    """The values a numeric recipe key accepts: integers (or any finite number) from ``low`` to ``high``
    (``low`` itself excluded when ``low_open``), plus the few listed in ``also`` (-1: per channel) and null when
    ``nullable``."""

    integer: bool
    low: float
    high: float = math.inf
    low_open: bool = False
    nullable: bool = False
    also: tuple[int, ...] = ()

    def admits(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if isinstance(value, bool) or not isinstance(value, (int, float)):  # YAML's true is an int to Python
            return False
        if self.integer and not isinstance(value, int):
            return False
        if value in self.also:
            return True
        above = value > self.low if self.low_open else value >= self.low
        return math.isfinite(value) and above and value <= self.high

    def __str__(self) -> str:
        kind = "an integer" if self.integer else "a number"
        low, high = _number(self.low), _number(self.high)
        if self.high < math.inf:
            bounds = f"in {'(' if self.low_open else '['}{low}, {high}]"
        else:
            bounds = f"{'>' if self.low_open else '>='} {low}"
        extra = [str(v) for v in self.also] + (["null"] if self.nullable else [])
        return f"{kind} {bounds}" + "".join(f" or {e}" for e in extra)


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _count(low: int = 1, nullable: bool = False) -> Range:
    return Range(integer=True, low=low, nullable=nullable)


POSITIVE = Range(integer=False, low=0, low_open=True)
NON_NEGATIVE = Range(integer=False, low=0)

# Every numeric recipe key and what it accepts, checked when a recipe is loaded (quant.w_bits, a_bits and kv_bits
# take a few listed values: ZeroQATConfig checks those). A sequence length needs two tokens: one to predict the other.
RANGES: dict[str, Range] = {
    "seed": Range(integer=True, low=0, high=2**32 - 1),  # numpy's seeds are 32-bit
    "quant.group_size": Range(integer=True, low=1, also=(-1,)),
    "quant.act_clip": Range(integer=False, low=0, high=1, low_open=True),  # the fraction of a token's range kept
    "quant.calib_epochs": _count(low=0),  # 0: the smoothing scales' initial values, nothing learned
    "quant.calib_lr": NON_NEGATIVE,
    "quant.calib_smooth_lr": NON_NEGATIVE,
    "quant.calib_alpha": Range(integer=False, low=0, high=1),
    "quant.calib_refine_epochs": _count(low=0),
    "quant.calib_refine_lr": NON_NEGATIVE,
    "quant.gptq_damp": POSITIVE,  # a fraction of the Hessian's mean diagonal
    "quant.gptq_block_size": _count(),
    "quant.rotation_seed": Range(integer=True, low=0, high=2**32 - 1),
    "calibration.n_samples": _count(),
    "calibration.seq_len": _count(low=2),
    "calibration.batch_size": _count(),
    "train.seq_len": _count(low=2),
    "train.batch_size": _count(),
    "train.steps": _count(),
    "train.lr": POSITIVE,
    "train.eps": POSITIVE,
    "train.num_queries": _count(),
    "train.grad_clip": Range(integer=False, low=0, low_open=True, nullable=True),
    "train.weight_decay": NON_NEGATIVE,
    "train.warmup_steps": _count(low=0),
    "train.logging_steps": _count(),
    "train.max_windows": _count(nullable=True),
    "train.eval_steps": _count(nullable=True),
    "train.eval_windows": _count(),
    "train.sample_temperature": POSITIVE,
    "eval.seq_len": _count(low=2),
    "eval.max_windows": _count(nullable=True),
    "eval.batch_size": _count(),
    "eval.limit": Range(integer=False, low=0, low_open=True, nullable=True),  # below 1: a fraction (lm-eval's)
    "eval.zero_shot_batch_size": _count(),
    "finetune.n_train": _count(),
    "finetune.n_val": _count(low=0),
    "finetune.n_test": _count(),
    "finetune.max_length": _count(low=2),
    "finetune.eval_batch_size": _count(),
}
BOOLEAN_KEYS = ("save_init", "quant.symmetric", "quant.smooth", "quant.rotate", "quant.online_hadamard",
                "train.bf16")
RECIPE_FILE_FIX = "correct the file (recipes/demo.yaml shows the form)"
ADAPTER_FIX = "give a folder that save_pretrained wrote whole (e.g. runs/NAME/adapter), or train the adapter again"


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
            # "relative": lr and eps are fractions of each trained tensor's RMS and the projected gradient is
            # divided by its running RMS, so one lr carries over to other models; "absolute": p -= lr * g * z
            # (grad_clip applies to this one only)
            "step": "relative",
            # data: a corpus, or a list of corpora whose windows alternate (one from each in turn, as many from
            # each), so that a gain is less a fit to one corpus; or "generated": windows sampled from the
            # full-precision model itself, seeded by `seed` (distillation only: zqat_peft.distill.sampled_windows)
            "data": "wiki", "seq_len": 256, "batch_size": 8, "steps": 200, "num_queries": 1,
            # the temperature of "generated" windows (training and held-out): 1 draws from the full distribution
            "sample_temperature": 1.0,
            # null: the step's default (relative: lr 1e-3 and eps 5e-3 of each tensor's RMS; absolute: no default
            # lr, which depends on the model, and MeZO's eps 1e-3)
            "lr": None, "eps": None,
            # "two_point": L(p + eps z) - L(p - eps z), 2 forwards per query; "one_sided": L(p + eps z) - L(p),
            # the step's num_queries probes sharing one unperturbed forward (num_queries + 1 forwards)
            "estimator": "two_point",
            # "rounding": perturb and update only the master-weight elements a perturbation can move across a
            # rounding boundary (the others cannot change the loss); "none": every element
            "mask": "none",
            "grad_clip": None, "weight_decay": 0.0, "scheduler": "constant", "warmup_steps": 0, "logging_steps": 10,
            "bf16": False,
            # a transformers scheduler's own arguments (TrainingArguments.lr_scheduler_kwargs), e.g. for
            # scheduler: warmup_stable_decay, {num_decay_steps: 300, min_lr_ratio: 0.3, decay_type: linear}
            "scheduler_kwargs": {},
            # "ce": next-token cross-entropy on train.data; "distill": KL to the full-precision model's top-k
            # next-token distribution on the same windows (zqat_peft.distill), which keeps the model close to
            # what it was rather than fitting train.data
            "loss": "ce",
            # the first max_windows windows of train.data's train split (of a list: of its alternating windows);
            # null: all of them ("distill": the steps * batch_size windows one pass visits, since each needs a
            # full-precision forward first)
            "max_windows": None,
            # Every eval_steps steps, the loss on held-out data (the first eval_windows windows of train.data's
            # validation split; BoolQ: the validation questions); the best checkpoint is the result. null: off.
            "eval_steps": None, "eval_windows": 32,
            # the held-out check's text, when it is not train.data's validation split (null): a corpus, a list
            # of them, or "generated" (distillation only), so that the checkpoint kept is the one closest to the
            # full-precision model on text the training did not fit, not only on more of the training corpus
            "eval_data": None,
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
    (dotted keys, YAML-typed values: ``train.lr=2e-3``, ``eval.tasks=[piqa]``)."""
    recipe = default_recipe()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe file not found: {path}")
        loaded = read_yaml(path, fix=RECIPE_FILE_FIX) or {}  # an empty file: the defaults
        if not isinstance(loaded, dict):
            raise RecipeError(f"{path}: a recipe is a YAML mapping of keys to values; {RECIPE_FILE_FIX}")
        for key, value in loaded.items():
            _apply(recipe, str(key), value)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise RecipeError(f"override {item!r} is not of the form key=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise RecipeError(f"override {item!r}: the value is not valid YAML ({getattr(e, 'problem', e)}); quote "
                              "it as YAML writes it, e.g. train.lr=2e-3 or eval.tasks=[piqa]") from e
        _apply(recipe, key.strip(), value)
    if recipe["name"] is None:
        recipe["name"] = Path(path).stem if path is not None else "run"
    _fill_step_sizes(recipe["train"])
    check_recipe(recipe)
    return recipe


def _fill_step_sizes(train: dict) -> None:
    """train.lr and train.eps left null take their step's defaults (``zqat_peft.zo.optimizer.step_sizes``)."""
    if train["step"] not in ZO_STEPS:
        return  # check_recipe says what is wrong
    try:
        train["lr"], train["eps"] = step_sizes(train["step"], train["lr"], train["eps"])
    except ValueError as e:
        raise RecipeError(f"train.step: absolute needs train.lr: {e}") from e


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
    """Refuse values the job cannot use, before any model is loaded: numbers out of their range, unknown names,
    a start_from adapter that is not whole or not the recipe's."""
    check_ranges(recipe)
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
    schedulers = [s.value for s in SchedulerType]
    if t["scheduler"] not in schedulers:
        raise RecipeError(f"train.scheduler must be one of {', '.join(schedulers)}; got {t['scheduler']!r}")
    if not isinstance(t["scheduler_kwargs"], dict):
        raise RecipeError("train.scheduler_kwargs must be a mapping of the scheduler's arguments, e.g. "
                          f"{{num_decay_steps: 100}}; got {t['scheduler_kwargs']!r}")
    corpora = train_corpora(recipe)
    if not corpora or not all(isinstance(c, str) and c for c in corpora):
        raise RecipeError("train.data must be a corpus name or a non-empty list of them, e.g. wiki or "
                          f"[wiki, austen]; got {t['data']!r}")
    if GENERATED in corpora and (t["data"] != GENERATED or t["loss"] != "distill"):
        raise RecipeError(f"train.data: {GENERATED} trains on text sampled from the full-precision model and needs "
                          f"train.loss: distill (the model's own targets), alone, not in a list; got train.data "
                          f"{t['data']!r} with train.loss {t['loss']!r}")
    held_out = held_out_corpora(recipe)
    if not held_out or not all(isinstance(c, str) and c for c in held_out):
        raise RecipeError("train.eval_data must be null (train.data's validation split), a corpus name or a "
                          f"non-empty list of them, or {GENERATED}; got {t['eval_data']!r}")
    if GENERATED in held_out and (held_out != [GENERATED] or t["loss"] != "distill"):
        raise RecipeError(f"train.eval_data: {GENERATED} checks on text sampled from the full-precision model and "
                          f"needs train.loss: distill, alone, not with corpora; got train.eval_data "
                          f"{t['eval_data']!r} with train.loss {t['loss']!r}")
    if t["sample_temperature"] != 1 and GENERATED not in corpora + held_out:
        raise RecipeError(f"train.sample_temperature ({t['sample_temperature']}) sets how {GENERATED} windows are "
                          f"sampled, and neither train.data nor train.eval_data is {GENERATED}: remove it, or set "
                          f"one of them to {GENERATED}")
    if t["step"] not in ZO_STEPS:
        raise RecipeError(f"train.step must be one of {ZO_STEPS}, got {t['step']!r}")
    if t["estimator"] not in ZO_ESTIMATORS:
        raise RecipeError(f"train.estimator must be one of {ZO_ESTIMATORS}, got {t['estimator']!r}")
    if t["mask"] not in ZO_MASKS:
        raise RecipeError(f"train.mask must be one of {ZO_MASKS}, got {t['mask']!r}")
    if t["step"] == "relative" and t["grad_clip"] is not None:
        raise RecipeError(f"train.grad_clip ({t['grad_clip']}) clips the absolute step's projected gradient; the "
                          "relative step clips its normalized gradient itself: unset it or use train.step=absolute")
    if t["loss"] not in TRAIN_LOSSES:
        raise RecipeError(f"train.loss must be one of {TRAIN_LOSSES}, got {t['loss']!r}")
    if t["loss"] == "distill" and recipe["task"] is not None:
        raise RecipeError("train.loss=distill is for language modelling (task: null); a fine-tuning task "
                          "trains on its answers (finetune.loss)")
    if t["eval_steps"] is not None and t["eval_steps"] > t["steps"]:
        # no check would run during training, and the run would give back the start, untrained
        raise RecipeError(f"train.eval_steps ({t['eval_steps']}) is larger than train.steps ({t['steps']}): "
                          "lower it or set it to null")
    if t["warmup_steps"] >= t["steps"]:
        # the learning rate would never reach train.lr: the whole run would train at a fraction of it
        raise RecipeError(f"train.warmup_steps ({t['warmup_steps']}) is not below train.steps ({t['steps']}): "
                          "lower it (a warmup is usually a small part of the run)")
    quant_config(recipe)  # ZeroQATConfig checks the quantization settings
    if recipe["start_from"] is not None:
        check_start_from(recipe)


def check_sources(recipe: dict) -> None:
    """Refuse at once a model or a corpus that cannot be had here (an unknown name, a missing folder, a Hub id
    with the Hub out of reach), before a job fetches or loads anything. Apart from ``check_recipe``: a recipe
    for another machine (a Hub model, here offline) still loads and reads."""
    check_model_source(recipe["model"])
    for source in text_sources(recipe):
        check_text_source(source)


def check_ranges(recipe: dict) -> None:
    """Every number within its ``RANGES`` entry, every ``BOOLEAN_KEYS`` value true or false."""
    for key, allowed in RANGES.items():
        value = _value(recipe, key)
        if not allowed.admits(value):
            raise RecipeError(f"{key}={value!r} is out of range: {key} takes {allowed}")
    for key in BOOLEAN_KEYS:
        value = _value(recipe, key)
        if not isinstance(value, bool):
            raise RecipeError(f"{key}={value!r} is not allowed: {key} takes true or false")


def _value(recipe: dict, key: str) -> Any:
    section, _, sub = key.partition(".")
    return recipe[section][sub] if sub else recipe[section]


# What a saved adapter's codes, scales and smoothing depend on: a recipe that starts from it must agree.
START_KEYS = ("w_bits", "a_bits", "kv_bits", "group_size", "symmetric", "trainable", "init")


def check_start_from(recipe: dict) -> None:
    """Refuse a ``start_from`` that is not an adapter folder, or whose quantization is not the recipe's."""
    path = recipe["start_from"]
    if not isinstance(path, str):
        raise RecipeError(f"start_from={path!r} is not allowed: start_from takes an adapter folder such as "
                          "runs/NAME/init_adapter, or null")
    try:
        check_adapter_folder(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"start_from: no adapter in {path!r} ({e})") from e
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


def check_adapter_folder(folder: str | os.PathLike) -> dict:
    """The ``adapter_config.json`` of a ZeroQAT adapter folder, once the folder is known to be whole (config and
    weights readable, of ZeroQAT's type): checked before a model is built for it."""
    return check_adapter(folder, zqat_peft_type().value, ADAPTER_FIX)


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
    model = str(recipe["model"]).lower()
    names = {model_asset(model)} if model in MODELS else set()
    names |= {s for s in text_sources(recipe) if s in TEXT_CORPORA}
    if recipe["eval"]["tasks"] or recipe["task"]:
        names.add("tasks")
    return [a for a in ASSETS if a in names] + sorted(names - set(ASSETS))  # then a model fetched on demand


def train_corpora(recipe: dict) -> list[str]:
    """train.data as a list: one corpus, or the corpora whose windows alternate."""
    data = recipe["train"]["data"]
    return list(data) if isinstance(data, (list, tuple)) else [data]


def held_out_corpora(recipe: dict) -> list[str]:
    """The held-out check's text as a list: train.eval_data, or train.data's corpora when it is null."""
    data = recipe["train"]["eval_data"]
    if data is None:
        return train_corpora(recipe)
    return list(data) if isinstance(data, (list, tuple)) else [data]


def samples_held_out(recipe: dict) -> bool:
    """Whether the run has a held-out check whose windows are sampled from the full-precision model."""
    return bool(recipe["train"]["eval_steps"]) and held_out_corpora(recipe) == [GENERATED]


def text_sources(recipe: dict) -> list[str]:
    """The corpora the job reads: the evaluation corpora, the training data (language modelling) and the
    calibration data (when it calibrates)."""
    sources = list(recipe["eval"]["corpora"].values())
    if recipe["task"] is None:
        sources += [c for c in dict.fromkeys(train_corpora(recipe) + held_out_corpora(recipe)) if c != GENERATED]
    if calibrates(recipe):
        sources.append(recipe["calibration"]["data"])
    return sources


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
