"""The main job: evaluate a model in full precision, RTN-quantized, initialized (calibrated) and ZeroQAT-trained.

A *recipe* (YAML, see ``recipes/``; its keys in ``zqat_peft.recipe``) says which model, how to quantize,
calibrate, train and evaluate.
``run(recipe)`` writes everything into ``runs/NAME/`` (or the recipe's ``output_dir``)::

    config.yaml      the resolved recipe
    metrics.json     {"fp": {...}, "rtn": {...}, "init": {...}, "zeroqat": {...}}
    timings.json     seconds per stage
    loss_curve.png   the ZO training loss
    report.md        the metrics table, the settings and the timings
    adapter/         the trained adapter (PeftModel.from_pretrained(base, "runs/NAME/adapter"))
    init_adapter/    the model training started from (only with ``save_init: true``)
    DONE             written last: a run without it did not finish

While it runs, ``.trainer/`` holds the checkpoints (with ``train.eval_steps``) and ``.stages.json`` the
evaluations done before training (then the training log too, once ``adapter/`` is saved), so that
``run(recipe, resume=True)`` can go on after an interruption.

Two kinds of job: language modelling (``task: null``; ZO training on fixed-length windows of
``train.data``), and fine-tuning (``task: boolq``, the pieces in ``zqat_peft.finetune``; MeZO's protocol:
1000 train / 500 validation / 1000 test questions drawn from BoolQ's validation split with a fixed seed, the
loss on the answer token only, accuracy = " yes" vs " no" by log-likelihood on the test questions).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from peft import PeftModel, get_peft_model
from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
from peft.utils.error import NoMatchingPeftModuleError
from peft.utils.other import set_additional_trainable_modules
from safetensors import safe_open
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState, TrainerState
from transformers.trainer_utils import get_last_checkpoint

from . import distill, finetune
from .calibration import calibrate, calibration_batches
from .data import load_model_and_tokenizer, load_text
from .evaluation import encode_joined, perplexity, token_windows
from .files import check_file, read_mapping
from .recipe import (DTYPES, GENERATED, RecipeError, calibrates, changed_keys, check_adapter_folder, check_sources,
                     held_out_corpora, output_dir, quant_config, samples_held_out, train_corpora)
from .report import format_value, loss_figure, report
from .zo import DivergenceGuard, ZOTrainer, ZOTrainingArguments

STAGES_FILE = ".stages.json"  # the stages an unfinished run has done (metrics, timings, training log), for resume


class AssetError(RuntimeError):
    """A model or a corpus that cannot be had here (no network, failed fetch)."""


class AdapterMismatchError(ValueError):
    """A saved adapter made for another base model than the one it is loaded onto."""


# --------------------------------------------------------------------------------------- models, data


def pick_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_base(recipe: dict, device: str):
    """``(model, tokenizer)`` of the recipe's model; one clear error when it cannot be had here."""
    try:
        return load_model_and_tokenizer(recipe["model"], dtype=DTYPES[recipe["dtype"]], device=device)
    except (ConnectionError, FileNotFoundError):
        raise  # the checks' own messages: they name the model or file and what to do
    except (OSError, RuntimeError) as e:  # a failed fetch, a Hub error
        raise AssetError(f"cannot load the model {recipe['model']!r}: {_one_line(e)}") from e


def quantized_model(recipe: dict, device: str, init: str):
    """A fresh copy of the base model wrapped by ZeroQAT with the recipe's settings and ``init`` (the RTN model
    rounds to nearest whatever the recipe's rounding, unrefined: GPTQ and refinement happen in calibration)."""
    base, tokenizer = load_base(recipe, device)
    changes = {"init": init}
    if init == "rtn":
        changes.update(rounding="nearest", calib_refine_epochs=0)
    return get_peft_model(base, quant_config(recipe, **changes)), tokenizer


def load_adapter(recipe: dict, adapter_dir: str | os.PathLike, device: str, trainable: bool = False):
    """The base model with a saved ZeroQAT adapter: in eval mode, or with its weights trainable again. The
    adapter's files are checked before the base model loads; an adapter of another base model is refused."""
    check_adapter_folder(adapter_dir)
    base, tokenizer = load_base(recipe, device)
    model = attach_adapter(base, adapter_dir, recipe["model"], trainable)
    if trainable:
        train_modules_to_save(model, recipe["quant"]["modules_to_save"], adapter_dir)
    return (model if trainable else model.eval()), tokenizer


def train_modules_to_save(model: PeftModel, wanted: Optional[list[str]], adapter_dir: str | os.PathLike) -> None:
    """Make the recipe's ``quant.modules_to_save`` trainable in a loaded adapter that has none (an init adapter
    trained further with its norms, say): the quantized layers do not depend on them. An adapter that trained
    other ones is refused, since their trained weights would be dropped or kept at odds with the recipe."""
    config = model.peft_config[model.active_adapter]
    saved = config.modules_to_save
    if not wanted or sorted(saved or []) == sorted(wanted):
        return
    if saved:
        raise RecipeError(f"the adapter {adapter_dir} trained the modules {sorted(saved)}, the recipe's "
                          f"quant.modules_to_save is {sorted(wanted)}: set quant.modules_to_save to the adapter's")
    model.base_model.check_modules_to_save(wanted)
    config.modules_to_save = list(wanted)
    set_additional_trainable_modules(model, config, model.config, model.active_adapter)


def attach_adapter(base, adapter_dir: str | os.PathLike, model_name: str, trainable: bool):
    """``PeftModel.from_pretrained``, refusing in one line an adapter whose layers or shapes are not the base
    model's (peft would raise a page of shape errors, or only warn about missing layers and go on)."""
    def mismatch(detail: str) -> AdapterMismatchError:
        return AdapterMismatchError(f"the adapter {adapter_dir} was not made for the model {model_name!r} ({detail}): "
                                    "load it onto the base model it was trained on (model=..., or the run's "
                                    "config.yaml next to the adapter)")

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Found missing adapter keys")  # refused below instead
        try:
            model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)
        except NoMatchingPeftModuleError as e:
            raise mismatch("none of its layers is in the model") from e
        except RuntimeError as e:
            shapes = [line.strip() for line in str(e).splitlines() if "size mismatch" in line]
            if not shapes:
                raise
            raise mismatch(f"{len(shapes)} tensors differ in shape, e.g. {shapes[0]}") from e
    weights = Path(adapter_dir) / SAFETENSORS_WEIGHTS_NAME
    if weights.is_file():
        with safe_open(str(weights), "pt") as f:
            saved = set(f.keys())
        expected = set(get_peft_model_state_dict(model))
        if saved != expected:
            missing, unexpected = sorted(expected - saved), sorted(saved - expected)
            example = f"e.g. {missing[0]} is not in the adapter" if missing else f"e.g. {unexpected[0]} is not in the model"
            raise mismatch(f"{len(missing)} of the model's tensors are not in the adapter and {len(unexpected)} of the "
                           f"adapter's not in the model, {example}")
    return model


def corpus_tokens(tokenizer, source: str, split: str) -> torch.Tensor:
    try:
        return encode_joined(tokenizer, load_text(source, split))
    except (RuntimeError, ConnectionError) as e:  # a corpus that could not be fetched, a dataset id without network
        raise AssetError(f"cannot load the corpus {source!r}: {_one_line(e)}") from e


def alternating_windows(tokenizer, corpora: list[str], split: str, seq_len: int,
                        max_windows: Optional[int]) -> torch.Tensor:
    """[n, seq_len] windows of one corpus, or of several taken in turn (window i from corpora[i % k]) so that
    every batch mixes them. Each corpus gives the same number, ceil(max_windows / k), or as many as the
    shortest has; the first max_windows are returned."""
    per_corpus = None if max_windows is None else -(-max_windows // len(corpora))
    parts = [token_windows(corpus_tokens(tokenizer, c, split), seq_len, per_corpus) for c in corpora]
    n = min(len(p) for p in parts)
    return torch.stack([p[:n] for p in parts], dim=1).reshape(n * len(parts), seq_len)[:max_windows]


def eval_windows(recipe: dict, tokenizer) -> dict[str, torch.Tensor]:
    """The fixed perplexity windows of each evaluation corpus; optional corpora that cannot be had are
    skipped with a message (wiki is required)."""
    ev, out = recipe["eval"], {}
    for key, source in ev["corpora"].items():
        try:
            ids = corpus_tokens(tokenizer, source, ev["split"])
        except AssetError as e:
            if key == "wiki":
                raise
            _log(f"skipping {key}_ppl: {e}")
            continue
        out[key] = token_windows(ids, ev["seq_len"], ev["max_windows"])
    return out


class TokenWindows(torch.utils.data.Dataset):
    """Fixed-length windows of a token stream as causal-LM examples (labels = the input ids)."""

    def __init__(self, windows: torch.Tensor):
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.windows[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def task_splits(recipe: dict) -> dict[str, list[dict]]:
    """The fine-tuning task's train / validation / test questions, as the recipe's ``finetune`` sizes them."""
    f = recipe["finetune"]
    return finetune.boolq_splits(f["n_train"], f["n_val"], f["n_test"], recipe["seed"])


def prepare_eval_data(recipe: dict, tokenizer) -> dict[str, Any]:
    """What ``evaluate`` reads: the perplexity windows, and the fine-tuning task's test questions."""
    data: dict[str, Any] = {"windows": eval_windows(recipe, tokenizer)}
    if recipe["task"] == "boolq":
        max_length = recipe["finetune"]["max_length"]
        data["test"] = [finetune.choice_example(tokenizer, row, max_length) for row in task_splits(recipe)["test"]]
    return data


def prepare_data(recipe: dict, tokenizer) -> dict[str, Any]:
    """Everything the stages read: the evaluation data, calibration batches, the training set."""
    data = prepare_eval_data(recipe, tokenizer)
    if calibrates(recipe):
        c = recipe["calibration"]
        data["calibration"] = calibration_batches(corpus_tokens(tokenizer, c["data"], "train"), c["n_samples"],
                                                  c["seq_len"], c["batch_size"], recipe["seed"])
    t = recipe["train"]
    if recipe["task"] == "boolq":
        max_length = recipe["finetune"]["max_length"]
        splits = task_splits(recipe)
        data["train"] = [finetune.answer_example(tokenizer, row, max_length) for row in splits["train"]]
        if t["eval_steps"]:
            # sorted by length: the Trainer evaluates in dataset order, and similar lengths pad little
            held_out = [finetune.answer_example(tokenizer, row, max_length) for row in splits["validation"]]
            data["validation"] = sorted(held_out, key=lambda e: len(e["input_ids"]))
        data["collator"] = finetune.AnswerCollator(tokenizer.pad_token_id)
        if recipe["finetune"]["loss"] == "choices":
            answers = finetune.answer_tokens(data["test"], data["train"] + data.get("validation", []))
            data["loss"] = finetune.ChoiceLoss(answers)
    else:
        # generated windows need the full-precision model: add_generated_windows
        if t["data"] != GENERATED:
            windows = alternating_windows(tokenizer, train_corpora(recipe), "train", t["seq_len"], train_windows(t))
            data["train"] = TokenWindows(windows)
        if t["eval_steps"] and not samples_held_out(recipe):
            held_out = alternating_windows(tokenizer, held_out_corpora(recipe), "validation", t["seq_len"],
                                           t["eval_windows"])
            data["validation"] = TokenWindows(held_out)
        data["collator"] = None  # transformers' default: the windows have one length
    return data


def train_windows(train: dict) -> Optional[int]:
    """How many training windows a language-modelling run reads: max_windows, or with distillation the
    steps * batch_size one pass visits (each needs a full-precision forward first); None: all."""
    if train["max_windows"] is None and train["loss"] == "distill":
        return train["steps"] * train["batch_size"]
    return train["max_windows"]


def add_generated_windows(fp_model, tokenizer, recipe: dict, data: dict) -> None:
    """For ``train.data: generated`` (and ``train.eval_data: generated``): training (and held-out) windows
    sampled from the full-precision model, each starting from a random non-special token; the held-out ones
    from the next seed. Run before ``add_teacher``; nothing to do where both are corpora."""
    t = recipe["train"]
    # the recipe check allows generated windows only with distillation, i.e. language modelling
    train, held_out = t["data"] == GENERATED, samples_held_out(recipe)
    if not (train or held_out):
        return
    starts = sorted(set(range(len(tokenizer))) - set(tokenizer.all_special_ids))

    def sample(n: int, seed: int) -> TokenWindows:
        return TokenWindows(distill.sampled_windows(fp_model, n, t["seq_len"], starts, seed,
                                                    temperature=t["sample_temperature"]))

    if train:
        data["train"] = sample(train_windows(t), recipe["seed"])
        _log(f"  sampled {len(data['train'])} training windows of {t['seq_len']} tokens from the full-precision "
             "model")
    if held_out:
        data["validation"] = sample(t["eval_windows"], recipe["seed"] + 1)
        _log(f"  sampled {len(data['validation'])} held-out windows of {t['seq_len']} tokens from the "
             "full-precision model")


def add_teacher(fp_model, recipe: dict, data: dict) -> None:
    """For ``train.loss: distill``: give the training (and held-out) windows the full-precision model's
    top-k next-token targets. Run with the full-precision model, before it is quantized or dropped."""
    for split in ("train", "validation"):
        if split in data:
            windows = data[split].windows
            ids, logprobs = distill.teacher_top_k(fp_model, windows, batch_size=recipe["train"]["batch_size"])
            data[split] = distill.TeacherWindows(windows, ids, logprobs)
            size = ids.nbytes + logprobs.nbytes
            _log(f"  {split}: the full-precision targets of {len(windows)} windows ({size / 2**20:.0f} MiB)")


# ----------------------------------------------------------------------------------- evaluate, train


def evaluate(model, tokenizer, recipe: dict, data: dict) -> dict[str, float]:
    """Perplexity on each evaluation corpus, zero-shot accuracy per task, fine-tuning accuracy."""
    ev = recipe["eval"]
    metrics = {f"{key}_ppl": perplexity(model, windows, ev["batch_size"]) for key, windows in data["windows"].items()}
    if ev["tasks"]:
        from .evaluation.zeroshot import headline, zero_shot

        accs = headline(zero_shot(model, tokenizer, ev["tasks"], limit=ev["limit"],
                                  batch_size=ev["zero_shot_batch_size"]))
        metrics.update(accs)
        if len(accs) > 1:
            metrics["zero_shot_avg"] = sum(accs.values()) / len(accs)
    if recipe["task"]:
        accuracy = finetune.choice_accuracy(model, data["test"], recipe["finetune"]["eval_batch_size"],
                                            tokenizer.pad_token_id)
        metrics[f"{recipe['task']}_acc"] = accuracy
    _log("  " + ", ".join(f"{k} {format_value(v)}" for k, v in metrics.items()))
    return metrics


class TrainingClock(TrainerCallback, ExportableState):
    """Seconds of training so far, counting from ``seconds`` (what the checkpoint a resumed run goes on from
    recorded), kept in each checkpoint (the Trainer saves an ExportableState callback's ``state()`` there), so
    that a resumed run's timing includes every piece before its cuts."""

    def __init__(self, seconds: float = 0.0):
        self.seconds_before = seconds
        self.started = time.perf_counter()

    def state(self) -> dict:
        return {"args": {"seconds": self.seconds_before + time.perf_counter() - self.started}, "attributes": {}}


def checkpoint_training_seconds(work_dir: Path) -> float:
    """The training seconds the last checkpoint in ``work_dir`` recorded (0 when there is none)."""
    last = get_last_checkpoint(str(work_dir)) if work_dir.is_dir() else None
    if last is None:
        return 0.0
    state = TrainerState.load_from_json(str(Path(last) / "trainer_state.json"))
    return state.stateful_callbacks.get(TrainingClock.__name__, {}).get("args", {}).get("seconds", 0.0)


def train(model, recipe: dict, data: dict, work_dir: Path, device: str, resume: bool = False) -> list[dict]:
    """ZO-train the model in place with ZOTrainer; returns the trainer's log history. ``resume``: go on from
    the last checkpoint in ``work_dir`` (``model`` is then the starting model, ``work_dir/start``).

    With ``train.eval_steps`` the Trainer measures the held-out loss every eval_steps steps, checkpoints
    there, and ends by loading the best checkpoint (``load_best_model_at_end``), as MeZO's protocol does.
    The starting model is a candidate too (its held-out loss is logged at step 0): when no checkpoint beats
    it, training gave nothing and the start is what comes back, not the least bad checkpoint.
    """
    t = recipe["train"]
    every = t["eval_steps"]
    keep_best = dict(
        save_strategy="steps", save_steps=every, save_total_limit=1, eval_strategy="steps", eval_steps=every,
        per_device_eval_batch_size=t["batch_size"], load_best_model_at_end=True, metric_for_best_model="eval_loss",
        greater_is_better=False,
    ) if every else {"save_strategy": "no"}
    args = ZOTrainingArguments(
        output_dir=str(work_dir), max_steps=t["steps"], per_device_train_batch_size=t["batch_size"],
        learning_rate=t["lr"], lr_scheduler_type=t["scheduler"], lr_scheduler_kwargs=t["scheduler_kwargs"],
        warmup_steps=t["warmup_steps"], weight_decay=t["weight_decay"], zo_eps=t["eps"], zo_num_queries=t["num_queries"],
        zo_grad_clip=t["grad_clip"], zo_step=t["step"], zo_estimator=t["estimator"],
        zo_mask=t["mask"],
        logging_steps=t["logging_steps"], report_to=[], seed=recipe["seed"], bf16=t["bf16"],
        use_cpu=device == "cpu", dataloader_num_workers=0, **keep_best,
    )
    # with eval_steps the start is saved to disk and restored below; without, the guard keeps it in memory
    guard = DivergenceGuard(keep_start=not every)
    trainer_class = ZOTrainer
    if t["loss"] == "distill":
        if not isinstance(data.get("train"), distill.TeacherWindows):
            generated = GENERATED in train_corpora(recipe) + held_out_corpora(recipe)
            generate = "add_generated_windows(fp_model, tokenizer, recipe, data) and " if generated else ""
            raise ValueError(f"train.loss=distill needs the teacher's targets: call {generate}add_teacher(fp_model, "
                             "recipe, data) with the full-precision model before training")
        trainer_class = distill.DistillZOTrainer
    if every and "validation" not in data:
        raise ValueError(f"train.eval_steps ({every}) needs held-out windows: train.eval_data "
                         f"{t['eval_data']!r} is sampled by add_generated_windows(fp_model, tokenizer, recipe, data), "
                         "which was not called")
    trainer = trainer_class(model=model, args=args, train_dataset=data["train"], data_collator=data["collator"],
                            eval_dataset=data.get("validation"),  # present only with eval_steps
                            compute_loss_func=data.get("loss"),  # None: the model's own loss
                            callbacks=[TrainingClock(checkpoint_training_seconds(work_dir) if resume else 0.0), guard])
    if every:
        start = work_dir / "start"
        if not resume:
            trainer.save_model(str(start))
        at_start = {**trainer.evaluate(), "step": 0}  # train() starts a new log history: kept apart
        start_loss = at_start["eval_loss"]
    trainer.train(resume_from_checkpoint=resume or None)  # True: the last checkpoint in work_dir
    outcome = {"zeroqat_kept": "start" if guard.restored else "last", "zeroqat_stopped": guard.stopped}
    if guard.stopped:
        _log(f"  training stopped by the divergence guard at {guard.stopped}")
    if not every:
        return [*trainer.state.log_history, outcome]
    best, best_loss = trainer.state.best_model_checkpoint, trainer.state.best_metric
    if best is None or start_loss <= best_loss:
        model.load_adapter(str(start), model.active_adapter)
        best, best_loss = start, start_loss
    outcome["zeroqat_kept"] = Path(best).name
    _log(f"  kept {Path(best).name} (held-out loss {format_value(best_loss)}; at the start {format_value(start_loss)})")
    return [at_start, *trainer.state.log_history, outcome]


# -------------------------------------------------------------------------------------------- run


def run(recipe: dict, resume: bool = False) -> dict[str, Any]:
    """The whole job; returns ``{"output_dir", "metrics", "timings"}`` (also written to the output folder).

    ``resume``: go on with an interrupted run of the same recipe: from its last checkpoint (runs checkpoint
    with ``train.eval_steps``), or, when training had finished, from the trained adapter; the stages it
    finished are not repeated."""
    check_sources(recipe)
    out = output_dir(recipe)
    saved = resume_state(out, recipe) if resume else {"metrics": {}, "timings": {}}
    metrics, timings = saved["metrics"], saved["timings"]
    history = saved.get("history")  # present once training has finished
    device = pick_device()
    start = time.perf_counter() - sum(timings.values())  # resumed: the stages done before count too
    # the full-precision model is needed for its evaluation and the teacher's targets; a resumed run that
    # needs neither starts from the model saved in its folder
    needs_fp = not resume or (history is None and recipe["train"]["loss"] == "distill")
    with _timed("data", timings):
        model, tokenizer = load_base(recipe, device) if needs_fp else saved_model(recipe, out, history, device)
        data = prepare_data(recipe, tokenizer)
    # the model and the data could be had: only now does the run (re)write its folder, so that a job that
    # fails on its inputs leaves nothing behind (and an earlier run's results as they were)
    out.mkdir(parents=True, exist_ok=True)
    (out / "DONE").unlink(missing_ok=True)
    if not resume:  # an earlier interrupted run's checkpoints would mix with this run's
        shutil.rmtree(out / ".trainer", ignore_errors=True)
    write_text(out / "config.yaml", yaml.safe_dump(recipe, sort_keys=False))
    if not resume:
        with _timed("fp", timings):
            metrics["fp"] = evaluate(model, tokenizer, recipe, data)
    if history is None and recipe["train"]["loss"] == "distill":
        with _timed("teacher", timings):
            add_generated_windows(model, tokenizer, recipe, data)
            add_teacher(model, recipe, data)
    if needs_fp:
        del model  # before the next model is made: one model in memory at a time
        if resume:
            model, _ = saved_model(recipe, out, history, device)
        else:
            model = initial_model(recipe, tokenizer, data, device, metrics, timings)
            if recipe["save_init"]:
                save_adapter(model, out / "init_adapter")
            write_text(out / STAGES_FILE, json.dumps({"metrics": metrics, "timings": timings}))
    if history is None:
        trained_before_cut = checkpoint_training_seconds(out / ".trainer") if resume else 0.0
        with _timed("train", timings):
            history = train(model, recipe, data, out / ".trainer", device, resume)
        timings["train"] += trained_before_cut  # up to the last checkpoint: the steps lost after it count once
        start -= trained_before_cut
        # the trained model is kept before its evaluation, so an interruption there loses no training
        save_adapter(model, out / "adapter")
        write_text(out / STAGES_FILE, json.dumps({"metrics": metrics, "timings": timings, "history": history}))
        shutil.rmtree(out / ".trainer", ignore_errors=True)
    with _timed("zeroqat", timings):
        metrics["zeroqat"] = evaluate(model, tokenizer, recipe, data)
    metrics.update(training_outcome(history))
    timings["total"] = time.perf_counter() - start
    write_outputs(out, recipe, metrics, timings, history, device)
    (out / STAGES_FILE).unlink(missing_ok=True)
    return {"output_dir": str(out), "metrics": metrics, "timings": timings}


def training_outcome(history: list[dict]) -> dict[str, Any]:
    """Which model training kept ("start", "last" or a checkpoint's name) and, if the divergence guard stopped
    it, why: ``train`` records it as the last entry of the log history."""
    outcome = next((e for e in reversed(history) if "zeroqat_kept" in e), {})
    return {k: v for k, v in outcome.items() if v is not None}


def initial_model(recipe: dict, tokenizer, data: dict, device: str, metrics: dict, timings: dict):
    """The RTN model and, with ``init: calibrate``, the calibrated one, each evaluated into ``metrics``;
    returns the model training starts from. With ``start_from`` that is the saved adapter (no RTN column)."""
    if recipe["start_from"] is not None:
        with _timed("init", timings):
            model, _ = load_adapter(recipe, recipe["start_from"], device, trainable=True)
            metrics["init"] = evaluate(model, tokenizer, recipe, data)
        return model
    with _timed("rtn", timings):
        model, _ = quantized_model(recipe, device, "rtn")
        metrics["rtn"] = evaluate(model, tokenizer, recipe, data)
    if recipe["quant"]["init"] == "calibrate":
        del model
        with _timed("calibration", timings):
            model, _ = quantized_model(recipe, device, "calibrate")
            calibrate(model, data["calibration"])
        with _timed("init", timings):
            metrics["init"] = evaluate(model, tokenizer, recipe, data)
    else:  # the RTN model is the initialization
        metrics["init"] = dict(metrics["rtn"])
    return model


def saved_model(recipe: dict, out: Path, history: Optional[list[dict]], device: str):
    """``(model, tokenizer)`` an interrupted run in ``out`` goes on with: its trained adapter once training
    had finished (``history`` recorded), else the starting model of its checkpoints, trainable."""
    if history is not None:
        return load_adapter(recipe, out / "adapter", device)
    return load_adapter(recipe, out / ".trainer" / "start", device, trainable=True)


def resume_state(out: Path, recipe: dict) -> dict[str, Any]:
    """What an interrupted run of ``recipe`` in ``out`` recorded: the ``metrics`` and ``timings`` of the stages
    it finished, and the training log ``history`` once training had finished; one clear error when there is
    nothing to resume or the recipe is not the one that run used."""
    if is_done(out):
        raise RecipeError(f"{out} holds a finished run; nothing to resume (remove it or pick another name)")
    config, stages = out / "config.yaml", out / STAGES_FILE
    fix = "the run cannot be resumed: run without --resume to start over"
    saved = read_mapping(stages, fix) if stages.is_file() else {}
    last = get_last_checkpoint(str(out / ".trainer")) if (out / ".trainer").is_dir() else None
    if "history" in saved:
        resumable = (out / "adapter").is_dir()
    else:
        resumable = (out / ".trainer" / "start").is_dir() and last is not None
    if not (config.is_file() and saved and resumable):
        raise RecipeError(f"{out} has no checkpoint to resume from (runs checkpoint only with train.eval_steps, "
                          "at the first check); run without --resume to start over")
    if not (isinstance(saved.get("metrics"), dict) and isinstance(saved.get("timings"), dict)):
        raise RecipeError(f"{stages} lacks the metrics and timings of the finished stages; {fix}")
    before = read_mapping(config, fix)
    changed = changed_keys(before, recipe)
    if changed:
        raise RecipeError(f"the recipe differs from the interrupted run's ({config}) in {', '.join(changed)}; "
                          "resume with the same recipe and overrides")
    if "history" in saved:
        check_adapter_folder(out / "adapter")
    else:
        check_adapter_folder(out / ".trainer" / "start")
        check_checkpoint(Path(last), fix)
    return saved


# What the Trainer reads back when it resumes from a checkpoint (the ZO trajectory is in the optimizer's state).
CHECKPOINT_FILES = ("adapter_config.json", SAFETENSORS_WEIGHTS_NAME, "trainer_state.json", "optimizer.pt",
                    "scheduler.pt")


def check_checkpoint(checkpoint: Path, fix: str) -> None:
    """Every file a resume reads from ``checkpoint`` is there and whole, and so is every other file it holds
    (the ZO trajectory, the RNG states)."""
    for name in CHECKPOINT_FILES:
        check_file(checkpoint / name, fix)
    for path in sorted(checkpoint.iterdir()):
        if path.name not in CHECKPOINT_FILES and path.is_file():
            check_file(path, fix)


@contextmanager
def _timed(stage: str, timings: dict):
    _log(f"{stage}: started")
    t0 = time.perf_counter()
    yield
    timings[stage] = time.perf_counter() - t0
    _log(f"{stage}: done in {timings[stage]:.0f} s")


# ------------------------------------------------------------------------------------------ outputs


def _atomic(path: Path, write) -> None:
    """``write(tmp)`` a sibling temporary path, then rename it to ``path``: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_text(path: Path, text: str) -> None:
    _atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_adapter(model, path: Path) -> None:
    """``model.save_pretrained`` into a temporary folder renamed to ``path`` (replacing an older one)."""
    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        if path.exists():
            shutil.rmtree(path)

    _atomic(path, write)


def write_outputs(out: Path, recipe: dict, metrics: dict, timings: dict, history: list[dict], device: str) -> None:
    write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_text(out / "timings.json", json.dumps(timings, indent=2) + "\n")
    _atomic(out / "loss_curve.png", lambda tmp: loss_figure(history).savefig(tmp, format="png", dpi=110))
    write_text(out / "report.md", report(recipe, metrics, timings, device))
    write_text(out / "DONE", time.strftime("%Y-%m-%d %H:%M:%S\n"))


def is_done(out: str | os.PathLike) -> bool:
    return (Path(out) / "DONE").is_file()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _log(msg: str) -> None:
    print(f"[zqat] {msg}", file=sys.stderr, flush=True)
