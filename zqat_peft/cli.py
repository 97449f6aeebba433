"""The ``zqat`` command: fetch assets, run a recipe, evaluate or export an adapter, run the demo.

    zqat fetch [model wiki lee austen tasks | a registered model name]
    zqat train --recipe recipes/NAME.yaml [--resume] [key=value ...]
    zqat eval --adapter runs/NAME/adapter [--recipe recipes/NAME.yaml] [key=value ...]
    zqat eval --quantized DIR [--recipe recipes/NAME.yaml] [key=value ...]
    zqat export --adapter runs/NAME/adapter [--format merged|gptq|compressed-tensors|gguf] --out DIR
    zqat demo [key=value ...]

Expected failures (an unknown recipe key, a missing file, a model that cannot be fetched here) end with
one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

import yaml
from transformers import AutoTokenizer

from .data import ASSETS, DEFAULT_MODEL, MODELS, fetch
from .export import ExportWarning, load_quantized, save_compressed_tensors, save_gguf, save_gptq, save_merged
from .files import CorruptFileError
from .pipeline import AssetError, evaluate, load_adapter, pick_device, prepare_eval_data, resume_state, run
from .recipe import DTYPES, check_adapter_folder, check_sources, load_recipe, output_dir, required_assets
from .report import metrics_table
from .zo import ZODivergenceError

EXIT_USAGE = 2
EXPORTERS = {"merged": save_merged, "gptq": save_gptq, "compressed-tensors": save_compressed_tensors, "gguf": save_gguf}
EXPORT_FORMATS = tuple(EXPORTERS)


class UsageError(Exception):
    """An expected failure, reported as one line."""


# What a user can cause and fix: reported in one line. Anything else is a bug and raises.
EXPECTED_ERRORS = (UsageError, ValueError, OSError, yaml.YAMLError, FloatingPointError, AssetError, ZODivergenceError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except EXPECTED_ERRORS as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return _fail("interrupted (a training run with train.eval_steps goes on from its last check with "
                     "zqat train --resume and the same recipe)", 130)


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    print(f"zqat: error: {' '.join(message.split())}", file=sys.stderr)
    return code


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zqat", description="ZeroQAT: quantization-aware training with zeroth-order gradients.")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fetch", help="download and prepare models, corpora and zero-shot task data")
    on_demand = " ".join(m for m in MODELS if m != DEFAULT_MODEL)
    f.add_argument("what", nargs="*", help=f"assets: model wiki lee austen tasks (default: all), or a model "
                                           f"fetched only on demand: {on_demand}")
    f.set_defaults(func=cmd_fetch)

    t = sub.add_parser("train", help="run a recipe: FP / RTN / init / ZeroQAT evaluation, into runs/NAME/")
    t.add_argument("--recipe", required=True, help="recipes/NAME.yaml (or just NAME)")
    t.add_argument("--resume", action="store_true",
                   help="go on with an interrupted run of the same recipe from its last checkpoint "
                        "(train.eval_steps) or, if training had finished, its trained adapter")
    t.add_argument("overrides", nargs="*", help="key=value recipe overrides, e.g. train.steps=50")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a saved adapter, or a GPTQ / compressed-tensors export")
    model = e.add_mutually_exclusive_group(required=True)
    model.add_argument("--adapter", help="an adapter folder, e.g. runs/NAME/adapter")
    model.add_argument("--quantized", help="a gptq or compressed-tensors export folder, loaded packed (its quantized "
                                           "layers never in full precision)")
    e.add_argument("--recipe", help="recipe for the model and the evaluation (default: the run's config.yaml; "
                                    "with --quantized: the defaults)")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    e.add_argument("overrides", nargs="*", help="key=value recipe overrides, e.g. eval.max_windows=8")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", help="write an adapter's model as a checkpoint inference runtimes load")
    x.add_argument("--adapter", required=True, help="an adapter folder, e.g. runs/NAME/adapter")
    x.add_argument("--format", choices=EXPORT_FORMATS, default="merged",
                   help="merged: plain float weights (default); gptq: transformers/GPTQModel/vLLM; "
                        "compressed-tensors: vLLM/transformers; gguf: llama.cpp (one .gguf file)")
    x.add_argument("--out", required=True, help="folder (for gguf: file) for the export (must not exist)")
    x.add_argument("--tokenizer-pre", default="default",
                   help="gguf only: llama.cpp's name of the tokenizer's pre-tokenizer (SmolLM2: smollm)")
    x.add_argument("--recipe", help="recipe naming the base model (default: the run's config.yaml)")
    x.set_defaults(func=cmd_export)

    d = sub.add_parser("demo", help="fetch what is needed, run recipes/demo.yaml and print the table")
    d.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    d.set_defaults(func=cmd_demo)
    return p


# ------------------------------------------------------------------------------------------ commands


def cmd_fetch(args: argparse.Namespace) -> None:
    try:
        paths = fetch(args.what or ASSETS)
    except RuntimeError as e:
        raise UsageError(str(e)) from e
    for name, path in paths.items():
        print(f"{name}: {path}")


def cmd_train(args: argparse.Namespace) -> None:
    _train(load_recipe(find_recipe(args.recipe), args.overrides), args.resume)


def cmd_demo(args: argparse.Namespace) -> None:
    _train(load_recipe(find_recipe("demo"), args.overrides))


def _train(recipe: dict, resume: bool = False) -> None:
    check_sources(recipe)  # before any asset is fetched
    if resume:
        resume_state(output_dir(recipe), recipe)  # nothing to resume: refused before any asset is fetched
    try:
        fetch(required_assets(recipe))
    except RuntimeError as e:
        raise UsageError(str(e)) from e
    result = run(recipe, resume)
    out = Path(result["output_dir"])
    print(metrics_table(result["metrics"]))
    print(f"\nwall time {result['timings']['total']:.0f} s; report: {out / 'report.md'}; adapter: {out / 'adapter'}")


def cmd_eval(args: argparse.Namespace) -> None:
    if args.quantized:
        recipe_file = find_recipe(args.recipe) if args.recipe else None
        recipe = load_recipe(recipe_file, [*args.overrides, f"model={args.quantized}"])
        check_sources(recipe)
        model = load_quantized(args.quantized, DTYPES[recipe["dtype"]], pick_device())
        tokenizer = AutoTokenizer.from_pretrained(args.quantized)
    else:
        recipe = adapter_recipe(args.adapter, args.recipe, args.overrides)
        check_sources(recipe)
        model, tokenizer = load_adapter(recipe, args.adapter, pick_device())
    metrics = evaluate(model, tokenizer, recipe, prepare_eval_data(recipe, tokenizer))
    label = "quantized" if args.quantized else "adapter"
    print(json.dumps(metrics, indent=2) if args.json else metrics_table({label: metrics}))


def cmd_export(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if out.exists():
        raise UsageError(f"{out} already exists; choose a new path for the export")
    recipe = adapter_recipe(args.adapter, args.recipe, ())
    model, tokenizer = load_adapter(recipe, args.adapter, "cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExportWarning)
        extra = {"tokenizer_pre": args.tokenizer_pre} if args.format == "gguf" else {}
        report = EXPORTERS[args.format](model, out, tokenizer=tokenizer, **extra)
    for warning in caught:
        print(f"zqat: warning: {warning.message}", file=sys.stderr)
    q = recipe["quant"]
    print(f"{report.summary()}; W{q['w_bits']} weights, group size {q['group_size']}")


# ------------------------------------------------------------------------------------------ helpers


def find_recipe(name: str) -> Path:
    """A recipe path as given, else ``recipes/NAME.yaml`` here or in the source checkout."""
    path = Path(name)
    if path.is_file():
        return path
    stem = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
        candidate = root / "recipes" / Path(stem).name
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"recipe file not found: {name}")


def adapter_recipe(adapter: str, recipe: Optional[str], overrides: Sequence[str]) -> dict:
    """The recipe to rebuild an adapter's base model with: ``--recipe``, else the run's ``config.yaml``
    next to the adapter, else the defaults with the base model named in ``adapter_config.json``."""
    config = check_adapter_folder(adapter)  # before anything is loaded for it
    if recipe is not None:
        return load_recipe(find_recipe(recipe), overrides)
    run_config = Path(adapter).parent / "config.yaml"
    if run_config.is_file():
        try:
            return load_recipe(run_config, overrides)
        except CorruptFileError as e:
            raise UsageError(f"{e}, or give the run's recipe with --recipe") from e
    result = load_recipe(None, overrides)
    if config.get("base_model_name_or_path") and not any(o.startswith("model=") for o in overrides):
        result["model"] = config["base_model_name_or_path"]
    for key in ("w_bits", "a_bits", "kv_bits", "group_size"):  # for export's messages
        result["quant"][key] = config.get(key, result["quant"][key])
    return result


if __name__ == "__main__":
    sys.exit(main())
