"""ZO training settings against each other on one recipe: the initialized model is built once, then each
setting trains a fresh copy of it and is evaluated (wiki perplexity, the recipe's eval settings).

Settings are lists of recipe overrides; each ``--set`` is one setting, e.g.
``--set train.lr=1e-5 train.steps=100 --set train.lr=3e-6 train.steps=300``. The quant and calibration
sections and ``start_from`` must not change between settings (the init is shared; with ``start_from`` it is
that adapter), nor the training windows (train.loss, max_windows, data, seq_len; with ``train.loss=distill``
the full-precision targets are computed once).
Prints a table and writes JSON after each setting, so a sweep cut short keeps the settings it finished.
With ``--save-adapters DIR`` the initialized model is saved to DIR/init and each trained one to DIR/1,
DIR/2, ... with the setting's recipe (``config.yaml``), for ``zqat eval --adapter DIR/1/adapter --recipe
DIR/1/config.yaml`` later. While a setting trains, its Trainer checkpoints are kept in DIR/1/checkpoints
(each a loadable adapter, so a sweep cut short mid-setting still has its best checkpoint); they are removed
once the setting's adapter is saved.

    python benchmarks/zo_sweep.py --recipe recipes/demo.yaml --set train.lr=1e-5 --set train.lr=3e-6
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

import torch
import yaml

from zqat_peft import calibrate
from zqat_peft.pipeline import (add_generated_windows, add_teacher, evaluate, load_adapter, load_base, pick_device,
                               prepare_data, quantized_model, save_adapter, train, write_text)
from zqat_peft.recipe import calibrates, load_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--base", nargs="*", default=[], help="overrides applied to every setting")
    parser.add_argument("--set", nargs="+", action="append", required=True, metavar="KEY=VALUE")
    parser.add_argument("--out", default="benchmarks/results/zo_sweep.json")
    parser.add_argument("--save-adapters", metavar="DIR", help="save the init and every trained adapter here")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.base)
    settings = [load_recipe(args.recipe, [*args.base, *s]) for s in args.set]
    shared = ("loss", "max_windows", "data", "seq_len")  # the training windows (and their teacher) are shared
    for s in settings:
        if any(s[k] != recipe[k] for k in ("quant", "calibration", "start_from")):
            raise SystemExit("--set may change train/eval keys only: the initialized model is shared")
        if any(s["train"][k] != recipe["train"][k] for k in shared):
            raise SystemExit(f"--set may not change train.{{{','.join(shared)}}}: the training data is shared "
                             "(put them in --base)")
    device = pick_device()
    data = None
    if recipe["train"]["loss"] == "distill":
        fp_model, tokenizer = load_base(recipe, device)
        data = prepare_data(recipe, tokenizer)
        add_generated_windows(fp_model, tokenizer, recipe, data)
        add_teacher(fp_model, recipe, data)
        del fp_model
    if recipe["start_from"]:
        init_model, tokenizer = load_adapter(recipe, recipe["start_from"], device, trainable=True)
    else:
        init_model, tokenizer = quantized_model(recipe, device, recipe["quant"]["init"])
    if data is None:
        data = prepare_data(recipe, tokenizer)
    start = time.perf_counter()
    if calibrates(recipe):
        calibrate(init_model, data["calibration"], progress=False)
    results = {"meta": {"recipe": args.recipe, "base": args.base, "device": device,
                        "calibration_seconds": time.perf_counter() - start},
               "init": evaluate(init_model, tokenizer, recipe, data), "runs": []}
    saved = Path(args.save_adapters) if args.save_adapters else None
    if saved:
        save_run(init_model, recipe, saved / "init")
    for i, (overrides, s) in enumerate(zip(args.set, settings), start=1):
        model = copy.deepcopy(init_model)
        start = time.perf_counter()
        with checkpoint_dir(saved / str(i) / "checkpoints" if saved else None) as work:
            history = train(model, s, data, work, device)
            seconds = time.perf_counter() - start
            metrics = evaluate(model, tokenizer, s, data)
            if saved:
                save_run(model, s, saved / str(i))
        losses = [h["loss"] for h in history if "loss" in h]
        results["runs"].append({"overrides": overrides, "train_seconds": seconds, "metrics": metrics,
                                "first_loss": losses[0] if losses else None,
                                "last_loss": losses[-1] if losses else None,
                                # with train.eval_steps: the held-out loss per check (the best one is kept)
                                "eval_losses": {h["step"]: h["eval_loss"] for h in history if "eval_loss" in h}})
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        print(f"{' '.join(overrides):50s} wiki_ppl {metrics['wiki_ppl']:.3f} "
              f"(init {results['init']['wiki_ppl']:.3f}, x{metrics['wiki_ppl'] / results['init']['wiki_ppl']:.3f})"
              f"  {seconds:.0f} s", flush=True)
        # after every setting, so that a sweep cut short keeps what it finished
        write_results(results, Path(args.out))


@contextlib.contextmanager
def checkpoint_dir(keep: Optional[Path]) -> Iterator[Path]:
    """Where a setting's Trainer checkpoints go: ``keep`` until the setting is done (a temporary folder is
    gone once a stopped sweep exits), else a temporary folder."""
    if keep is None:
        with tempfile.TemporaryDirectory() as tmp:
            yield Path(tmp)
        return
    shutil.rmtree(keep, ignore_errors=True)  # an earlier, cut-short sweep's: the Trainer would rotate them
    keep.mkdir(parents=True)
    yield keep
    shutil.rmtree(keep)


def write_results(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


def save_run(model, recipe: dict, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    save_adapter(model, path / "adapter")
    write_text(path / "config.yaml", yaml.safe_dump(recipe, sort_keys=False))


if __name__ == "__main__":
    main()
