"""Zero-shot accuracy with the lm-eval harness, offline, on an in-memory model.

The tasks are local lm-eval task definitions (``zqat_peft/evaluation/tasks/*.yaml``) that mirror lm-eval's
standard ones (same prompts, choices, targets and metrics) but read the validation splits that
:mod:`zqat_peft.data` keeps in its cache: each YAML's ``custom_dataset`` loader calls
:func:`zqat_peft.data.task_data_dir` at run time, so the data's location is resolved when a task is loaded
and nothing is fetched from the Hugging Face Hub. While :func:`zero_shot` runs, ``HF_HUB_OFFLINE`` and
``HF_DATASETS_OFFLINE`` are set (and restored afterwards).

Known differences with published lm-eval numbers: ARC and OpenBookQA are scored on their validation
splits (lm-eval uses the test splits, which are not available offline), and BoolQ's passages lack the
``"Title -- "`` prefix that SuperGLUE's copy has (same questions and labels).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator

import torch

__all__ = [
    "HEADLINE_METRIC",
    "TASKS_DIR",
    "ZERO_SHOT_TASKS",
    "available_tasks",
    "headline",
    "paired_difference",
    "task_manager",
    "zero_shot",
    "zero_shot_documents",
]

TASKS_DIR = Path(__file__).resolve().parent / "tasks"

# The six tasks of the usual QAT / PTQ zero-shot tables, in their usual order.
ZERO_SHOT_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq")

# The metric papers report for each task: length-normalized accuracy where the choices differ in length
# (PIQA, ARC, HellaSwag, OpenBookQA), plain accuracy for WinoGrande (one shared continuation) and BoolQ
# (yes / no).
HEADLINE_METRIC = {
    "piqa": "acc_norm",
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
    "hellaswag": "acc_norm",
    "winogrande": "acc",
    "boolq": "acc",
    "openbookqa": "acc_norm",
}

_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def available_tasks() -> tuple[str, ...]:
    """Names of the local tasks (one YAML file each in :data:`TASKS_DIR`), sorted."""
    return tuple(sorted(p.stem for p in TASKS_DIR.glob("*.yaml")))


def _check_tasks(tasks: str | Iterable[str]) -> list[str]:
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    known = available_tasks()
    unknown = [t for t in names if t not in known]
    if unknown:
        raise ValueError(f"unknown zero-shot task(s) {unknown}; known tasks: {', '.join(known)}")
    if not names:
        raise ValueError(f"no task given; known tasks: {', '.join(known)}")
    return list(dict.fromkeys(names))  # drop repeats, keep the order


def task_manager(cache: str | os.PathLike | None = None):
    """An lm-eval ``TaskManager`` that knows only the local tasks.

    ``cache``: the :mod:`zqat_peft.data` cache folder to read the task data from (default: ``$ZQAT_CACHE``
    or ``~/.cache/zqat_peft``); it reaches the loaders as the task metadata key ``zqat_cache``.
    """
    from lm_eval.tasks import TaskManager

    metadata = {"zqat_cache": os.fspath(cache)} if cache is not None else {}
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata)


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Hub-offline mode for the duration of the block: the environment variables, and the flags that
    huggingface_hub and datasets read from them at import time."""
    saved_env = {k: os.environ.get(k) for k in _OFFLINE_ENV}
    os.environ.update({k: "1" for k in _OFFLINE_ENV})
    saved_attrs = []
    for module_name, attrs in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
                               ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))):
        try:
            module = sys.modules.get(module_name) or importlib.import_module(module_name)
        except ImportError:
            continue
        for attr in attrs:
            if hasattr(module, attr):
                saved_attrs.append((module, attr, getattr(module, attr)))
                setattr(module, attr, True)
    try:
        yield
    finally:
        for module, attr, value in reversed(saved_attrs):
            setattr(module, attr, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _DropMessages(logging.Filter):
    """Drops lm-eval's warnings that say nothing useful about an in-memory model on local tasks."""

    NOISE = (
        "Custom kwargs can be passed to `--metadata`",  # every custom_dataset task, on every load
        "`pretrained` model kwarg is not of type `str`",  # HFLM given a model object: expected here
        "Passed an already-initialized model through `pretrained`",  # same
        "Overwriting default num_fewshot",  # num_fewshot is always set explicitly
    )

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in self.NOISE)


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Without ``verbose``: lm-eval logs warnings and errors only (minus known noise), no datasets
    progress bars. lm-eval's own progress bars over the requests stay."""
    if verbose:
        yield
        return
    import datasets

    lm_logger = logging.getLogger("lm_eval")
    old_level = lm_logger.level
    lm_logger.setLevel(logging.WARNING)
    drop = _DropMessages()
    # Logger filters do not apply to records of child loggers: one on each logger that emits the noise.
    noisy = [logging.getLogger(f"lm_eval.{n}") for n in ("api.task", "models.huggingface", "evaluator")]
    for lg in noisy:
        lg.addFilter(drop)
    bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            datasets.utils.logging.enable_progress_bar()
        for lg in noisy:
            lg.removeFilter(drop)
        lm_logger.setLevel(old_level)


def _metrics(task_result: dict) -> dict[str, float]:
    """lm-eval's ``{"acc,none": .., "acc_stderr,none": .., "alias": ..}`` -> ``{"acc": ..}``."""
    out = {}
    for key, value in task_result.items():
        metric, _, filter_name = key.partition(",")
        if not filter_name or metric.endswith("_stderr") or not isinstance(value, (int, float)):
            continue
        if filter_name != "none":  # only multiple-choice tasks here; keep other filters distinguishable
            metric = f"{metric},{filter_name}"
        out[metric] = float(value)
    return out


def zero_shot(
    model: torch.nn.Module,
    tokenizer,
    tasks: str | Iterable[str] = ZERO_SHOT_TASKS,
    limit: int | float | None = None,
    batch_size: int = 8,
    num_fewshot: int = 0,
    *,
    cache: str | os.PathLike | None = None,
    verbose: bool = False,
) -> dict[str, dict[str, float]]:
    """Score ``model`` on lm-eval multiple-choice tasks, offline; returns ``{task: {metric: value}}``.

    ``model``: a transformers causal LM, or a peft ``PeftModel`` wrapping one (e.g. with ZeroQAT layers),
    evaluated as it is (on its device, in its dtype), in eval mode; its train/eval mode is restored
    afterwards. ``tokenizer``: its tokenizer. ``tasks``: names among :func:`available_tasks` (default: the
    six of :data:`ZERO_SHOT_TASKS`). ``limit``: score only the first ``limit`` documents of each task (a
    float below 1 is a fraction, as in lm-eval). ``batch_size``: sequences per forward pass.
    ``num_fewshot``: in-context examples, drawn from the same validation split. ``cache``: the
    :mod:`zqat_peft.data` cache folder holding the task data (default: ``$ZQAT_CACHE`` or
    ``~/.cache/zqat_peft``). ``verbose``: keep lm-eval's info logs and warnings.

    The values are plain floats (lm-eval's metric names, ``acc`` and for most tasks ``acc_norm``; no
    standard errors), keyed by the standard task names, in the order asked.
    """
    names = _check_tasks(tasks)
    out = _simple_evaluate(model, tokenizer, names, limit, batch_size, num_fewshot, cache, verbose, False)
    if out is None:  # simple_evaluate returns None on non-zero ranks of a distributed run
        return {}
    return {name: _metrics(out["results"][name]) for name in names}


def zero_shot_documents(
    model: torch.nn.Module,
    tokenizer,
    tasks: str | Iterable[str] = ZERO_SHOT_TASKS,
    limit: int | float | None = None,
    batch_size: int = 8,
    num_fewshot: int = 0,
    *,
    cache: str | os.PathLike | None = None,
    verbose: bool = False,
) -> dict[str, list[float]]:
    """Like :func:`zero_shot`, one score per document instead of the average: ``{task: [1.0 or 0.0, ...]}``
    in document order, on each task's :data:`HEADLINE_METRIC`; the mean of a list is :func:`headline`'s
    number. For comparing two models on the same documents (:func:`paired_difference`)."""
    names = _check_tasks(tasks)
    out = _simple_evaluate(model, tokenizer, names, limit, batch_size, num_fewshot, cache, verbose, True)
    if out is None:
        return {}
    scores = {}
    for name in names:
        samples = sorted(out["samples"][name], key=lambda sample: sample["doc_id"])
        scores[name] = [_headline_value(name, sample) for sample in samples]
    return scores


def paired_difference(a: Iterable[float], b: Iterable[float]) -> tuple[float, float]:
    """Mean of ``b - a`` over paired documents and its standard error: what two models both get right or
    both get wrong does not count, so the difference is known better than from two independent accuracies
    (much better when the models disagree on few documents)."""
    diffs = [y - x for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    if n < 2:
        raise ValueError(f"a paired difference needs at least 2 documents, got {n}")
    mean = sum(diffs) / n
    variance = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    return mean, math.sqrt(variance / n)


def _simple_evaluate(model, tokenizer, names: list[str], limit, batch_size, num_fewshot, cache, verbose,
                     log_samples: bool) -> dict | None:
    if limit is not None and not (isinstance(limit, (int, float)) and limit > 0):
        raise ValueError(f"limit must be a positive number or None, got {limit!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    try:
        with _offline(), _quiet(verbose):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            return simple_evaluate(
                model=lm,
                tasks=names,
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=task_manager(cache),
                log_samples=log_samples,
                bootstrap_iters=0,
            )
    finally:
        model.train(was_training)


def headline(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """One number per task: the metric of :data:`HEADLINE_METRIC` (``acc_norm`` for PIQA, ARC, HellaSwag;
    ``acc`` for WinoGrande, BoolQ), falling back to ``acc`` when a task has no such metric."""
    return {task: _headline_value(task, metrics) for task, metrics in results.items()}


def _headline_value(task: str, metrics: dict) -> float:
    """``metrics``: a task's averages, or one document's scores (lm-eval names both the same way)."""
    return float(metrics.get(HEADLINE_METRIC.get(task, "acc_norm"), metrics.get("acc", math.nan)))
