"""Bad input, as a new user gives it: every recipe number out of its range, every file the project reads
truncated, an adapter of another model, a model or corpus that cannot be had. Each is one line (exit code 2 from
the command line) before any work starts: the heavy steps are replaced by stand-ins that record being reached."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from peft import LoraConfig, get_peft_model

from zqat_peft import ZeroQATConfig, ZOTrainer, ZOTrainingArguments, cli, pipeline
from zqat_peft.data import assets
from zqat_peft.recipe import RecipeError, default_recipe, load_recipe, valid_keys

from .conftest import tiny_batch, tiny_model

ROOT = Path(__file__).resolve().parent.parent


class Reached(Exception):
    """Raised by a stand-in for a heavy step: the bad input was not refused before it."""


def _never(name: str):
    def stand_in(*args, **kwargs):
        raise Reached(f"{name} was reached")

    return stand_in


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Fetching, running the job, loading a base model and evaluating all fail the test if reached."""
    for module, name in ((cli, "fetch"), (cli, "run"), (pipeline, "load_base"), (pipeline, "evaluate"),
                         (cli, "evaluate")):
        monkeypatch.setattr(module, name, _never(f"{module.__name__}.{name}"))


def _one_line_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zqat: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _truncate(path: Path) -> None:
    """Cut ``path`` in the middle, as an interrupted copy or a full disk leaves it. A YAML file is cut inside a
    key (a cut between two lines would still be YAML, of fewer keys)."""
    data = path.read_bytes()
    cut = len(data) // 2
    if path.suffix == ".yaml":
        # inside the key of an indented line after a key with a value (under a bare section header, a cut
        # key would read as the section's scalar value)
        cut = data.index(b"\n  ", cut)
        while data[:cut].rstrip().endswith(b":"):
            cut = data.index(b"\n  ", cut + 1)
        cut += 4
    path.write_bytes(data[:cut])


def _save_adapter(folder: Path, config=None, model=None) -> Path:
    model = get_peft_model(model or tiny_model(), config or ZeroQATConfig(w_bits=4, group_size=32))
    model.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------ recipe numbers

# For every numeric recipe key (and the booleans): a value out of its range, and words of the range it must name.
OUT_OF_RANGE = {
    "seed": (-1, "an integer in [0, 4294967295]"),
    "quant.group_size": (0, "an integer >= 1 or -1"),
    "quant.act_clip": (0, "a number in (0, 1]"),
    "quant.calib_epochs": (-1, "an integer >= 0"),
    "quant.calib_lr": (-0.01, "a number >= 0"),
    "quant.calib_smooth_lr": (-1, "a number >= 0"),
    "quant.calib_alpha": (1.5, "a number in [0, 1]"),
    "quant.calib_refine_epochs": (-1, "an integer >= 0"),
    "quant.calib_refine_lr": (-0.01, "a number >= 0"),
    "quant.gptq_damp": (0, "a number > 0"),
    "quant.gptq_block_size": (0, "an integer >= 1"),
    "quant.rotation_seed": (-1, "an integer in [0, 4294967295]"),
    "calibration.n_samples": (0, "an integer >= 1"),
    "calibration.seq_len": (1, "an integer >= 2"),
    "calibration.batch_size": (0, "an integer >= 1"),
    "train.seq_len": (1, "an integer >= 2"),
    "train.batch_size": (0, "an integer >= 1"),
    "train.steps": (0, "an integer >= 1"),
    "train.lr": (-1, "a number > 0"),
    "train.eps": (0, "a number > 0"),
    "train.num_queries": (0, "an integer >= 1"),
    "train.grad_clip": (0, "a number > 0 or null"),
    "train.weight_decay": (-0.1, "a number >= 0"),
    "train.warmup_steps": (-1, "an integer >= 0"),
    "train.logging_steps": (0, "an integer >= 1"),
    "train.max_windows": (0, "an integer >= 1 or null"),
    "train.eval_steps": (0, "an integer >= 1 or null"),
    "train.eval_windows": (0, "an integer >= 1"),
    "train.sample_temperature": (0, "a number > 0"),
    "eval.seq_len": (1, "an integer >= 2"),
    "eval.max_windows": (0, "an integer >= 1 or null"),
    "eval.batch_size": (0, "an integer >= 1"),
    "eval.limit": (0, "a number > 0 or null"),
    "eval.zero_shot_batch_size": (0, "an integer >= 1"),
    "finetune.n_train": (0, "an integer >= 1"),
    "finetune.n_val": (-1, "an integer >= 0"),
    "finetune.n_test": (0, "an integer >= 1"),
    "finetune.max_length": (1, "an integer >= 2"),
    "finetune.eval_batch_size": (0, "an integer >= 1"),
    "save_init": (3, "true or false"),
    "quant.symmetric": ("sometimes", "true or false"),
    "quant.smooth": (0, "true or false"),
    "quant.rotate": (1, "true or false"),
    "quant.online_hadamard": ("yes", "true or false"),
    "train.bf16": ("maybe", "true or false"),
}
# of the wrong kind: a fraction where a count is wanted, not a number, not finite
WRONG_KIND = [("train.steps", 2.5, "an integer >= 1"), ("train.batch_size", "eight", "an integer >= 1"),
              ("train.lr", float("nan"), "a number > 0"), ("train.eps", float("inf"), "a number > 0"),
              ("train.steps", True, "an integer >= 1"), ("quant.group_size", "64", "an integer >= 1 or -1")]
# these take a few listed values, which ZeroQATConfig checks
LISTED = {"quant.w_bits", "quant.a_bits", "quant.kv_bits"}


def test_every_numeric_recipe_key_has_a_range():
    from zqat_peft.recipe import BOOLEAN_KEYS, RANGES

    defaults = default_recipe()
    numeric = {k for k in valid_keys() if k not in LISTED and isinstance(_value(defaults, k), (int, float))
               and not isinstance(_value(defaults, k), bool)}
    assert numeric <= set(RANGES)
    assert set(OUT_OF_RANGE) == set(RANGES) | set(BOOLEAN_KEYS)  # every range is tried below


def _value(recipe: dict, key: str):
    section, _, sub = key.partition(".")
    return recipe[section][sub] if sub else recipe[section]


@pytest.mark.parametrize(("key", "value", "allowed"),
                         [(k, v, a) for k, (v, a) in OUT_OF_RANGE.items()] + WRONG_KIND,
                         ids=[*OUT_OF_RANGE, *(f"{k}={v!r}" for k, v, _ in WRONG_KIND)])
def test_a_recipe_value_out_of_range_is_refused_at_load_in_one_line(tmp_path, key, value, allowed):
    section, _, sub = key.partition(".")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({section: {sub: value}} if sub else {key: value}))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert "\n" not in message
    assert f"{key}={value!r}" in message  # the key and the value as given
    assert allowed in message  # what it takes


def test_negative_learning_rate_is_refused_before_the_job_starts(tmp_path, capsys, no_heavy_work):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run")}))
    code = cli.main(["train", "--recipe", str(recipe), "train.lr=-1"])
    _one_line_error(capsys, code, "train.lr=-1", "a number > 0")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------- adapter files


@pytest.fixture
def adapter(tmp_path) -> Path:
    return _save_adapter(tmp_path / "run" / "adapter")


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json", "../config.yaml"])
def test_eval_of_a_truncated_adapter_file_is_one_line_before_the_model_loads(adapter, capsys, no_heavy_work, name):
    if name == "../config.yaml":  # the run's resolved recipe, next to the adapter
        (adapter.parent / "config.yaml").write_text(yaml.safe_dump(load_recipe(None, ["name=run"]), sort_keys=False))
    path = (adapter / name).resolve()
    _truncate(path)
    code = cli.main(["eval", "--adapter", str(adapter)])
    _one_line_error(capsys, code, str(path.name), "truncated" if path.suffix == ".safetensors" else "not valid")


def test_eval_of_an_adapter_without_weights_or_of_another_method_is_one_line(tmp_path, capsys, no_heavy_work):
    lora = _save_adapter(tmp_path / "lora", LoraConfig(target_modules=["q_proj"]))
    _one_line_error(capsys, cli.main(["eval", "--adapter", str(lora)]), "'LORA' adapter, not a 'ZQAT' one")
    bare = _save_adapter(tmp_path / "bare")
    (bare / "adapter_model.safetensors").unlink()
    _one_line_error(capsys, cli.main(["eval", "--adapter", str(bare)]), "has no adapter weights")


@pytest.mark.parametrize("base", ["other shapes", "other architecture", "fewer layers"])
def test_an_adapter_of_another_model_is_refused_in_one_line(adapter, monkeypatch, base):
    import transformers

    def other_model(recipe, device):
        if base == "other architecture":
            return tiny_model("opt"), None
        config = transformers.LlamaConfig(vocab_size=256, hidden_size=64 if base == "other shapes" else 128,
                                          intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                                          num_hidden_layers=1 if base == "fewer layers" else 2)
        return transformers.AutoModelForCausalLM.from_config(config), None

    monkeypatch.setattr(pipeline, "load_base", other_model)
    with pytest.raises(ValueError, match="was not made for the model") as info:
        pipeline.load_adapter(load_recipe(None, ["name=run"]), adapter, "cpu")
    assert str(adapter) in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------------- a run to resume


@pytest.fixture(scope="module")
def interrupted_run_template(tmp_path_factory) -> Path:
    """A folder holding ``r.yaml`` and the folder ``run`` an interrupted ``zqat train --recipe r.yaml`` with
    train.eval_steps leaves behind: its recipe, the stages it finished, the starting adapter, a real ZOTrainer
    checkpoint. Built once; each test works on a copy."""
    root = tmp_path_factory.mktemp("interrupted")
    out = root / "run"
    recipe_file = root / "r.yaml"
    recipe_file.write_text(yaml.safe_dump({"output_dir": "run", "train": {"eval_steps": 2, "steps": 4}}))
    recipe = load_recipe(recipe_file)
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (out / pipeline.STAGES_FILE).write_text(json.dumps({"metrics": {"fp": {"wiki_ppl": 20.0}}, "timings": {"fp": 1.0}}))
    model = get_peft_model(tiny_model(), ZeroQATConfig(w_bits=4, group_size=32))
    args = ZOTrainingArguments(output_dir=str(out / ".trainer"), max_steps=2, save_strategy="steps", save_steps=2,
                               per_device_train_batch_size=2, report_to=[], use_cpu=True, learning_rate=1e-4)
    batch = tiny_batch(batch=4, seq=8)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(4)]
    trainer = ZOTrainer(model=model, args=args, train_dataset=rows)
    trainer.save_model(str(out / ".trainer" / "start"))
    trainer.train()
    return root


@pytest.fixture
def interrupted_run(interrupted_run_template, tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A copy of the template, the current folder; returns the recipe file and the run folder (relative)."""
    shutil.copytree(interrupted_run_template, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    return Path("r.yaml"), Path("run")


def test_an_intact_interrupted_run_is_resumed(interrupted_run, capsys, no_heavy_work):
    recipe_file, out = interrupted_run
    with pytest.raises(Reached, match="fetch"):  # past every check, on to the job
        cli.main(["train", "--recipe", str(recipe_file), "--resume"])


RUN_FILES = ["config.yaml", pipeline.STAGES_FILE, ".trainer/start/adapter_model.safetensors",
             ".trainer/checkpoint-2/trainer_state.json", ".trainer/checkpoint-2/optimizer.pt",
             ".trainer/checkpoint-2/scheduler.pt", ".trainer/checkpoint-2/adapter_model.safetensors",
             ".trainer/checkpoint-2/zo_trajectory.safetensors", ".trainer/checkpoint-2/rng_state.pth"]


@pytest.mark.parametrize("name", RUN_FILES)
def test_resume_with_a_truncated_run_file_is_one_line_naming_it(interrupted_run, capsys, no_heavy_work, name):
    recipe_file, out = interrupted_run
    _truncate(out / name)
    code = cli.main(["train", "--recipe", str(recipe_file), "--resume"])
    _one_line_error(capsys, code, str(out / name))


@pytest.mark.parametrize("name", [".trainer/checkpoint-2/optimizer.pt", ".trainer/checkpoint-2/trainer_state.json"])
def test_resume_with_a_missing_checkpoint_file_is_one_line_naming_it(interrupted_run, capsys, no_heavy_work, name):
    recipe_file, out = interrupted_run
    (out / name).unlink()  # the Trainer would go on without it: a fresh optimizer, a lost trajectory
    code = cli.main(["train", "--recipe", str(recipe_file), "--resume"])
    _one_line_error(capsys, code, str(out / name), "does not exist")


def test_a_truncated_recipe_file_is_one_line_naming_it(tmp_path, capsys, no_heavy_work):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(default_recipe(), sort_keys=False))
    _truncate(recipe)
    _one_line_error(capsys, cli.main(["train", "--recipe", str(recipe)]), str(recipe), "not valid YAML")


# ------------------------------------------------------------------------------------- cached assets


def _mark_complete(folder: Path, what: str) -> None:
    (folder / assets.MARKER).write_text(json.dumps({"asset": what, "version": assets._ASSET_VERSIONS[what]}))


def test_a_truncated_cached_corpus_is_one_line_naming_it(tmp_path):
    folder = assets.asset_path("wiki", tmp_path)
    folder.mkdir(parents=True)
    for split in ("train", "validation", "test"):
        lines = [json.dumps({"id": i, "text": f"document {i} of {split} " * 20}) for i in range(5)]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    _mark_complete(folder, "wiki")
    _truncate(folder / "train.jsonl")
    with pytest.raises(ValueError) as info:
        assets.load_text("wiki", "train", cache=tmp_path)
    assert str(folder / "train.jsonl") in str(info.value) and "zqat fetch wiki" in str(info.value)


def test_a_truncated_local_corpus_is_one_line_naming_it(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"document {i} " * 20}) for i in range(5)))
    _truncate(path)
    with pytest.raises(ValueError, match="mine.jsonl: line 3 is not a JSON record"):
        assets.load_text(str(path), "all")


def test_a_truncated_cached_model_is_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("ZQAT_CACHE", str(tmp_path))
    folder = assets.asset_path("model")
    tiny_model().save_pretrained(folder)
    _mark_complete(folder, "model")
    _truncate(folder / "model.safetensors")
    with pytest.raises(ValueError) as info:
        assets.load_model_and_tokenizer("smollm2-135m")
    assert str(folder / "model.safetensors") in str(info.value) and "zqat fetch model" in str(info.value)


def test_a_truncated_cached_task_is_one_line_naming_it(tmp_path):
    import datasets

    folder = assets.asset_path("tasks", tmp_path)
    datasets.Dataset.from_dict({"question": ["is it?"] * 64, "answer": [True] * 64}).save_to_disk(folder / "boolq")
    _mark_complete(folder, "tasks")
    arrow = next((folder / "boolq").glob("*.arrow"))
    _truncate(arrow)
    with pytest.raises(ValueError) as info:
        assets.task_data_dir("boolq", cache=tmp_path)
    assert str(arrow) in str(info.value) and "zqat fetch tasks" in str(info.value)


# ------------------------------------------------------------------------------ models out of reach


def test_an_unknown_model_with_the_hub_out_of_reach_fails_at_once_without_a_run_folder(tmp_path):
    """As a new user runs it: no minute of Hub retries, no run folder left behind."""
    out = tmp_path / "runs" / "mine"
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(yaml.safe_dump({"model": "no-such-org/no-such-model", "output_dir": str(out)}))
    # a Hub that refuses connections: the client would retry it five times over half a minute
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run([sys.executable, "-m", "zqat_peft.cli", "train", "--recipe", str(recipe)], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Retry" not in proc.stderr and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot load the model 'no-such-org/no-such-model'" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("override", ["model=no-such-org/no-such-model", "model=./no/such/folder",
                                      "train.data=no-such-org/no-such-dataset", "eval.corpora={wiki: ./nowhere.jsonl}"])
def test_a_model_or_corpus_that_cannot_be_had_is_refused_before_anything_is_fetched(
        tmp_path, capsys, monkeypatch, no_heavy_work, override):
    monkeypatch.setattr(assets, "hub_reachable", lambda timeout=3.0: False, raising=False)  # absent: no check
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run")}))
    code = cli.main(["train", "--recipe", str(recipe), override])
    _one_line_error(capsys, code, override.partition("=")[2].strip("{}").split(": ")[-1])
    assert not (tmp_path / "run").exists()


def test_a_job_whose_inputs_fail_to_load_leaves_no_run_folder(tmp_path, monkeypatch):
    out = tmp_path / "run"

    def unavailable(recipe, device):
        raise pipeline.AssetError("cannot load the model: gone")

    monkeypatch.setattr(pipeline, "load_base", unavailable)
    with pytest.raises(pipeline.AssetError):
        pipeline.run(load_recipe(None, [f"output_dir={out}"]))
    assert not out.exists()
