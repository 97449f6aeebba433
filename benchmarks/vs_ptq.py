"""ZeroQAT's initialization against a ready PTQ (llm-compressor's GPTQ), one protocol for all.

SmolLM2-135M; every method gets the same calibration tokens (64 x 512 of the wiki train split) and is
evaluated by zqat_peft's own perplexity (the whole wiki test split, 512-token windows). Rows:

- ``rtn``: round to nearest, min-max ranges.
- ``gptq``: llm-compressor's GPTQModifier with its default settings (block 128, dampening 0.01,
  static act-order, min-max observer); ``gptq`` with ``observer=mse``: its MSE-searched ranges.
  W4A4: GPTQ on the per-channel weights, the inputs of every linear layer fake-quantized per token
  in the evaluation, as ZeroQAT does.
- ``init``: zqat_peft.calibrate, with ``rounding`` nearest or gptq (static act-order unless ``natural``; the
  master weight the ``rounded`` or the ``compensated`` one), ``clipping`` learned (the recipe's
  clipping epochs, `LEARNED_CLIP_EPOCHS`) or, with GPTQ, a grid search by input-weighted error alone (calib_epochs=0,
  zqat_peft.calibration.clipping; rows with ``mse-grid`` were measured when that search weighed every input
  alike); ``rotate``: the residual stream rotated first
  (with an online Hadamard before down_proj unless ``online_hadamard`` is False: ``init-rotate-no-hadamard``).
  Each setting's quantization settings (smoothing, which layers train) are those of its CPU recipe
  (``RECIPES``), with the calibration tokens above instead of the recipe's.
- ``zeroqat-X``: the ``init-X`` model (each init row with GPTQ rounding has one), then the training of the setting's CPU
  recipe (``--train-steps`` to shorten it); the row holds the init's figures too, and both models'
  perplexity on the first ``--other-windows`` test windows of the Lee news and Austen corpora, text the
  recipe never trains on. The init is kept under ``--models`` with a digest of the library code that made it
  (``INIT_CODE``); a row that finds one made by other code stops and says so.

llm-compressor pins other versions of transformers than the project, so it runs in an environment of its
own, as a subprocess (benchmarks/llmc_gptq.py) that writes back the quantized weights::

    python -m venv ../venvs/llmc
    ../venvs/llmc/bin/pip install torch==2.13.0   # first: the CPU wheel, not the default CUDA build
    ../venvs/llmc/bin/pip install llmcompressor

then name its Python with ``--llmc-python`` (or ``LLMC_PYTHON``); without one the gptq rows are skipped.
Rows are appended to ``--out`` as they finish (a rerun skips rows already there), a list of
``{"setting", "method", "wiki_ppl", ...}``::

    PYTHONPATH=. python benchmarks/vs_ptq.py --llmc-python ../venvs/llmc/bin/python --settings W3A16g64 W2A16g64
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import get_peft_model
from torch import nn

import zqat_peft
from zqat_peft import ZeroQATConfig, distill, pipeline
from zqat_peft.data import load_model_and_tokenizer, load_text
from zqat_peft.data.assets import resolve_model_path
from zqat_peft.evaluation import encode_joined, perplexity, token_windows
from zqat_peft.quant import fake_quantize_activation
from zqat_peft.recipe import GENERATED, load_recipe, samples_held_out

# name -> (the CPU recipe whose quantization settings and training the setting's rows use, overrides)
RECIPES = {
    "W2A16g64": ("recipes/smollm2_w2a16g64_cpu.yaml", []),
    "W3A16g64": ("recipes/smollm2_w3a16g64_cpu.yaml", []),
    "W4A16g64": ("recipes/smollm2_w3a16g64_cpu.yaml", ["quant.w_bits=4"]),
    "W4A4": ("recipes/smollm2_w4a4_cpu.yaml", []),
}
# the epochs of learned clipping of the "learned" rows (the CPU recipes' before GPTQ made them learn none)
LEARNED_CLIP_EPOCHS = {"W2A16g64": 4, "W3A16g64": 2, "W4A16g64": 2, "W4A4": 2}
# name -> the row's fixed keys
GPTQ = {"rounding": "gptq", "act_order": True}  # our GPTQ rounding, static act-order (as llm-compressor's)
METHODS = {
    "rtn": {"method": "rtn"},
    "gptq": {"method": "gptq", "observer": "minmax"},
    "gptq-mse": {"method": "gptq", "observer": "mse"},
    "init": {"method": "init", "rounding": "nearest", "clipping": "learned"},
    "init-gptq": {"method": "init", **GPTQ, "clipping": "learned"},
    "init-gptq-natural": {"method": "init", "rounding": "gptq", "act_order": False, "clipping": "learned"},
    "init-gptq-compensated": {"method": "init", **GPTQ, "clipping": "learned", "gptq_master": "compensated"},
    "init-gptq-grid": {"method": "init", **GPTQ, "clipping": "input-grid"},
    "init-gptq-grid-natural": {"method": "init", "rounding": "gptq", "act_order": False, "clipping": "input-grid"},
    "init-gptq-grid-compensated": {"method": "init", **GPTQ, "clipping": "input-grid", "gptq_master": "compensated"},
    "init-rotate": {"method": "init", "rounding": "nearest", "clipping": "learned", "rotate": True,
                    "online_hadamard": True},
    "init-rotate-no-hadamard": {"method": "init", "rounding": "nearest", "clipping": "learned", "rotate": True,
                                "online_hadamard": False},
    "init-rotate-gptq": {"method": "init", **GPTQ, "clipping": "learned", "rotate": True, "online_hadamard": True},
    "init-rotate-gptq-grid": {"method": "init", **GPTQ, "clipping": "input-grid", "rotate": True,
                                 "online_hadamard": True},
    "init-rotate-gptq-grid-no-hadamard": {"method": "init", **GPTQ, "clipping": "input-grid", "rotate": True,
                                          "online_hadamard": False},  # exportable to the integer formats
}
# a zeroqat row per GPTQ init row: "zeroqat-gptq-grid" trains the "init-gptq-grid" model
ZEROQAT_INIT = {f"zeroqat-{name[len('init-'):]}": name for name, keys in METHODS.items() if keys.get("rounding") == "gptq"}
METHODS.update({name: {**METHODS[init], "method": "zeroqat"} for name, init in ZEROQAT_INIT.items()})
OTHER_CORPORA = ("lee", "austen")
# the library code a saved init depends on (zqat_peft's folders and files): an init saved by other code is not
# this code's init, though its folder name (the recipe overrides) is the same
INIT_CODE = ("calibration", "quant", "tuner", "rotation.py", "hadamard.py")
INIT_CODE_STAMP = "init_code.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--settings", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--windows", type=int, default=None, help="512-token test windows (default: all)")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--llmc-python", default=os.environ.get("LLMC_PYTHON"),
                        help="the Python of an environment with llm-compressor (gptq rows)")
    parser.add_argument("--train-steps", type=int, default=None, help="zeroqat rows: fewer steps than the recipe's")
    parser.add_argument("--recipe-overrides", nargs="*", default=[],
                        help="key=value changes to the setting's recipe (init and zeroqat rows), e.g. quant.trainable=scales")
    parser.add_argument("--other-windows", type=int, default=64, help="zeroqat rows: Lee and Austen test windows")
    parser.add_argument("--out", default="benchmarks/results/vs_ptq.json")
    parser.add_argument("--models", default="benchmarks/results/vs_ptq_models",
                        help="where init and zeroqat rows keep their adapters (zeroqat rows start from the init's)")
    args = parser.parse_args()
    torch.manual_seed(0)

    model, tokenizer = load_model_and_tokenizer(args.model)
    windows = token_windows(encode_joined(tokenizer, load_text("wiki", "test")), 512, args.windows)
    others = {c: token_windows(encode_joined(tokenizer, load_text(c, "test")), 512, args.other_windows)
              for c in OTHER_CORPORA}
    train_ids = encode_joined(tokenizer, load_text("wiki", "train"))
    calib = zqat_peft.calibration_batches(train_ids, args.calib_samples, args.calib_seq_len, batch_size=1)
    del model
    out = Path(args.out)
    rows = json.loads(out.read_text()) if out.exists() else []
    common = {"model": args.model, "windows": len(windows), "calib_tokens": f"{args.calib_samples}x{args.calib_seq_len}",
              "threads": torch.get_num_threads()}
    for setting in args.settings:
        for name in args.methods:
            row = {"setting": setting, **METHODS[name], **common}
            if args.recipe_overrides:
                row["recipe_overrides"] = " ".join(args.recipe_overrides)
            if row["method"] == "zeroqat":
                row["train_steps"] = args.train_steps or load_setting_recipe(setting, args.recipe_overrides)["train"]["steps"]
            if any(_same_row(r, row) for r in rows):
                continue
            if row["method"] == "gptq" and not args.llmc_python:
                print(f"{setting} {name}: skipped (no --llmc-python)", flush=True)
                continue
            start = time.perf_counter()
            if row["method"] == "zeroqat":
                row.update(train_zeroqat(args, setting, name, calib, {"wiki": windows, **others}))
            else:
                quantized = build(args, setting, name, calib)
                if row["method"] == "init":
                    save_init(quantized, saved_model(args, setting, name))
                row["quantize_seconds"] = round(time.perf_counter() - start, 1)
                row["wiki_ppl"] = perplexity(quantized, windows)
            rows.append(row)
            _save(out, rows)
            seconds = row.get("quantize_seconds", row.get("train_seconds"))  # a zeroqat row: its training
            print(f"{setting:10s} {name:18s} wiki_ppl {row['wiki_ppl']:10.2f}  ({seconds:.0f} s)", flush=True)
    print_table(rows)


def _same_row(a: dict, b: dict) -> bool:
    keys = ("setting", "method", "observer", "rounding", "act_order", "clipping", "gptq_master", "rotate",
            "online_hadamard", "windows", "calib_tokens", "train_steps", "recipe_overrides")
    return all(a.get(k) == b.get(k) for k in keys)


def saved_model(args, setting: str, name: str) -> Path:
    """Where a row keeps its adapter: an init row's for the zeroqat row of the same settings, a zeroqat row's
    for the paired zero-shot check (benchmarks/zero_shot_paired.py)."""
    # an init does not depend on the training's settings: a zeroqat row with train.* overrides starts from it.
    # quant.modules_to_save is not one of them: the scale refinement refits the modules it names.
    overrides = [o for o in args.recipe_overrides if not (METHODS[name]["method"] == "init" and o.startswith("train."))]
    suffix = "".join(f"_{o.replace('=', '-')}" for o in overrides)
    return Path(args.models) / f"{setting}_{name}{suffix}"


def init_code_digest(package: Path = Path(zqat_peft.__file__).parent) -> str:
    """A digest of the library code an init depends on (``INIT_CODE``, every .py file under it, with its path)."""
    digest = hashlib.sha256()
    for part in INIT_CODE:
        files = sorted((package / part).rglob("*.py")) if (package / part).is_dir() else [package / part]
        for f in files:
            digest.update(f.relative_to(package).as_posix().encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:16]


def save_init(model: nn.Module, path: Path) -> None:
    """The init's adapter, with the digest of the code that made it (``check_init_code`` reads it back)."""
    pipeline.save_adapter(model, path)
    (path / INIT_CODE_STAMP).write_text(init_code_digest() + "\n")


def check_init_code(path: Path) -> None:
    """Refuse a saved init made by other calibration, quantization or tuner code: a zeroqat row would start from
    a model this code does not make, under the same folder name, and report that model's figures as its init."""
    stamp = path / INIT_CODE_STAMP
    if not stamp.exists():
        print(f"warning: {path} holds no {INIT_CODE_STAMP} (saved before inits were stamped): whether this code "
              "made it cannot be checked; it is used as it is", flush=True)
        return
    made_by, now = stamp.read_text().strip(), init_code_digest()
    if made_by != now:
        raise SystemExit(f"{path} was made by other code (digest {made_by} of {', '.join(INIT_CODE)}; this code's is "
                         f"{now}): its figures are not this code's init. Delete the folder to calibrate again, or "
                         "pass a fresh --models folder.")


def load_setting_recipe(setting: str, overrides: tuple[str, ...] = ()) -> dict:
    path, changes = RECIPES[setting]
    return load_recipe(Path(__file__).parent.parent / path, [*changes, *overrides])


def build(args, setting: str, name: str, calib: list[torch.Tensor]) -> nn.Module:
    """The quantized model of one row."""
    quant = load_setting_recipe(setting, args.recipe_overrides)["quant"]
    settings = {k: quant[k] for k in ("w_bits", "a_bits", "group_size")}
    method = METHODS[name]
    model, _ = load_model_and_tokenizer(args.model)
    if method["method"] == "gptq":
        return llmc_gptq(args, model, settings, method["observer"], calib)
    if method["method"] == "rtn":
        return get_peft_model(model, ZeroQATConfig(trainable="scales", **settings))
    changes = dict(init="calibrate", rounding=method["rounding"], gptq_act_order=method.get("act_order", False),
                   gptq_master=method.get("gptq_master", "rounded"), rotate=method.get("rotate", False),
                   online_hadamard=method.get("online_hadamard", True))
    changes["calib_epochs"] = 0 if method["clipping"] == "input-grid" else LEARNED_CLIP_EPOCHS[setting]
    config = ZeroQATConfig(**{**quant, **changes})
    return zqat_peft.calibrate(get_peft_model(model, config), calib, progress=False)


def train_zeroqat(args, setting: str, name: str, calib: list[torch.Tensor], windows: dict[str, torch.Tensor]) -> dict:
    """The figures of a zeroqat row: its init (the matching init row's model), then the recipe's training."""
    steps = []
    if args.train_steps:
        every = load_setting_recipe(setting, args.recipe_overrides)["train"]["eval_steps"]
        steps = [f"train.steps={args.train_steps}", f"train.eval_steps={min(every, args.train_steps)}"]
    recipe = load_setting_recipe(setting, (*args.recipe_overrides, f"name=vs_ptq_{setting}_{name}", *steps))
    fp, tokenizer = load_model_and_tokenizer(args.model)
    data = pipeline.prepare_data(recipe, tokenizer)
    if recipe["train"]["loss"] == "distill":
        add_generated_windows_kept(args, fp, tokenizer, recipe, data)
        add_teacher_kept(args, fp, recipe, data)
    del fp
    init_name = ZEROQAT_INIT[name]
    saved = saved_model(args, setting, init_name)
    if saved.exists():  # the init row's model: the same calibration tokens, no second calibration
        check_init_code(saved)
        model, _ = pipeline.load_adapter(recipe, saved, "cpu", trainable=True)
    else:
        model = build(args, setting, init_name, calib)
        save_init(model, saved)
    row = {f"init_{c}_ppl": perplexity(model, w) for c, w in windows.items()}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work_dir:
        history = pipeline.train(model, recipe, data, Path(work_dir), "cpu")
    row["train_seconds"] = round(time.perf_counter() - start, 1)
    row.update(pipeline.training_outcome(history))
    pipeline.save_adapter(model, saved_model(args, setting, name))  # for the paired zero-shot check
    row.update({f"{c}_ppl": perplexity(model, w) for c, w in windows.items()})
    row["lr"], row["step"], row["loss"] = recipe["train"]["lr"], recipe["train"]["step"], recipe["train"]["loss"]
    return row


def add_generated_windows_kept(args, fp: nn.Module, tokenizer, recipe: dict, data: dict) -> None:
    """pipeline.add_generated_windows (``train.data`` or ``train.eval_data``: generated), the windows kept under
    ``--models`` by the model, their number, length, seed and temperature: sampling 800 windows of 128 tokens
    takes 20 minutes of one thread."""
    t = recipe["train"]
    counts = {"train": pipeline.train_windows(t) if t["data"] == GENERATED else 0,
              "validation": t["eval_windows"] if samples_held_out(recipe) else 0}
    splits = [s for s, n in counts.items() if n]
    if not splits:
        return
    key = (f"{args.model} {counts['train']} {counts['validation']} x {t['seq_len']} seed {recipe['seed']} "
           f"temperature {t['sample_temperature']}")
    path = Path(args.models) / "generated" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    if path.exists():
        data.update({split: pipeline.TokenWindows(w) for split, w in torch.load(path).items()})
        return
    pipeline.add_generated_windows(fp, tokenizer, recipe, data)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({s: data[s].windows for s in splits}, path)


def add_teacher_kept(args, fp: nn.Module, recipe: dict, data: dict) -> None:
    """pipeline.add_teacher, its targets kept under ``--models`` by a digest of the model and the windows: the
    zeroqat rows of a setting train on the same windows, and the full-precision pass over them is a third of a
    W2 row's time on two cores."""
    splits = [s for s in ("train", "validation") if s in data]
    digest = hashlib.sha256(f"{args.model} top-{distill.TOP_K}".encode())
    for split in splits:
        digest.update(data[split].windows.numpy().tobytes())
    path = Path(args.models) / "teacher" / f"{digest.hexdigest()[:16]}.pt"
    if path.exists():
        for split, (ids, logprobs) in torch.load(path).items():
            data[split] = distill.TeacherWindows(data[split].windows, ids, logprobs)
        return
    pipeline.add_teacher(fp, recipe, data)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({s: (data[s].teacher_ids, data[s].teacher_logprobs) for s in splits}, path)


def llmc_gptq(args, model: nn.Module, settings: dict, observer: str, calib: list[torch.Tensor]) -> nn.Module:
    """``model`` with llm-compressor's GPTQ weights (run in its own environment); activations quantized per
    token at the inputs of the same layers when the setting quantizes them."""
    runner = Path(__file__).with_name("llmc_gptq.py")
    with tempfile.TemporaryDirectory() as tmp:
        ids_path, out_path = Path(tmp) / "calib.pt", Path(tmp) / "weights.pt"
        torch.save(torch.cat(calib), ids_path)
        cmd = [args.llmc_python, str(runner), str(resolve_model_path(args.model)), str(ids_path), str(out_path),
               "--bits", str(settings["w_bits"]), "--group-size", str(settings["group_size"])]
        if observer != "minmax":
            cmd += ["--observer", observer]
        subprocess.run(cmd, check=True, stdout=sys.stdout, stderr=sys.stderr)
        weights = torch.load(out_path)["weights"]
    for layer_name, weight in weights.items():
        model.get_submodule(layer_name).weight.data.copy_(weight)
    a_bits = settings.get("a_bits", 16)
    if a_bits < 16:
        for layer_name in weights:
            model.get_submodule(layer_name).register_forward_pre_hook(
                lambda module, inputs: (fake_quantize_activation(inputs[0], a_bits),))
    return model


def _save(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=2))
    tmp.replace(path)


def print_table(rows: list[dict]) -> None:
    print("| setting | method | variant | wiki_ppl | seconds |\n|---|---|---|---|---|")
    for r in rows:
        shown = ("observer", "rounding", "act_order", "clipping", "gptq_master", "rotate", "online_hadamard",
                 "train_steps")
        variant = ", ".join(f"{k}={r[k]}" for k in shown if k in r)
        seconds = r.get("quantize_seconds", r.get("train_seconds"))
        print(f"| {r['setting']} | {r['method']} | {variant} | {r['wiki_ppl']:.2f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
