"""The main job (zqat_peft.pipeline), its recipes and report, and the zqat command line."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from zqat_peft import ZOTrainer, ZOTrainingArguments, cli, finetune, pipeline
from zqat_peft.recipe import (RecipeError, changed_keys, load_recipe, output_dir, quant_config,
                              required_assets, text_sources)
from zqat_peft.report import STAGES, metrics_table, report

from .conftest import tiny_model

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# ------------------------------------------------------------------------------------------ recipes


def test_recipe_file_and_overrides_update_the_defaults(tmp_path):
    path = _write(tmp_path / "mine.yaml", {"quant": {"w_bits": 3, "group_size": 64}, "train": {"steps": 7}})
    recipe = load_recipe(path, ["train.lr=2e-5", "eval.tasks=[piqa, boolq]", "quant.group_size=-1", "seed=3"])
    assert recipe["name"] == "mine"  # the file's name
    assert recipe["quant"]["w_bits"] == 3 and recipe["quant"]["group_size"] == -1
    assert recipe["train"]["steps"] == 7
    assert recipe["train"]["lr"] == 2e-5 and isinstance(recipe["train"]["lr"], float)  # not YAML 1.1's string
    assert recipe["eval"]["tasks"] == ["piqa", "boolq"] and recipe["seed"] == 3
    assert recipe["train"]["eps"] == load_recipe(None)["train"]["eps"]  # untouched keys keep defaults
    assert output_dir(recipe) == Path("runs") / "mine"


@pytest.mark.parametrize("where", ["file", "override"])
def test_unknown_key_is_one_line_listing_the_valid_keys(tmp_path, where):
    path = _write(tmp_path / "r.yaml", {"train": {"stepz": 3}} if where == "file" else {})
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["train.stepz=3"] if where == "override" else [])
    message = str(info.value)
    assert "'train.stepz'" in message and "train.steps" in message and "quant.w_bits" in message
    assert "\n" not in message


def test_bad_overrides_and_values_are_refused(tmp_path):
    with pytest.raises(RecipeError, match="key=value"):
        load_recipe(None, ["train.steps"])
    with pytest.raises(RecipeError, match="section"):
        load_recipe(None, ["quant=3"])
    with pytest.raises(ValueError, match="w_bits"):
        load_recipe(None, ["quant.w_bits=5"])
    with pytest.raises(RecipeError, match="task"):
        load_recipe(None, ["task=sst2"])
    with pytest.raises(RecipeError, match="eval.tasks"):
        load_recipe(None, ["eval.tasks=[piqa, no_such_task]"])
    with pytest.raises(FileNotFoundError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_a_saved_config_without_newer_keys_reads_as_their_defaults():
    recipe = load_recipe(None, ["train.lr=2e-5"])
    older = copy.deepcopy(recipe)
    del older["train"]["scheduler_kwargs"]  # a run's config.yaml written before the key existed
    assert changed_keys(older, recipe) == []
    assert changed_keys(older, load_recipe(None, ["train.lr=2e-5", "train.scheduler_kwargs={min_lr: 0}"])) == [
        "train.scheduler_kwargs"]


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_load(path):
    recipe = load_recipe(path)
    assert recipe["name"] == path.stem
    quant_config(recipe)


def test_demo_recipe_is_the_w3a16g64_calibrated_job():
    recipe = load_recipe(ROOT / "recipes" / "demo.yaml")
    q = recipe["quant"]
    assert (q["w_bits"], q["a_bits"], q["group_size"], q["trainable"], q["init"]) == (3, 16, 64, "full", "calibrate")
    assert recipe["model"] == "smollm2-135m" and not recipe["eval"]["tasks"]
    assert required_assets(recipe) == ["model", "wiki"]


def test_a_registered_model_other_than_the_default_is_a_required_asset():
    recipe = load_recipe(ROOT / "recipes" / "demo.yaml", ["model=Gemma3-270M"])
    assert required_assets(recipe) == ["wiki", "gemma3-270m"]
    assert required_assets(load_recipe(ROOT / "recipes" / "demo.yaml", ["model=some/hub-id"])) == ["wiki"]


# ------------------------------------------------------------------------------------------ outputs


def test_atomic_write_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "metrics.json"

    def half_written(tmp: Path) -> None:
        tmp.write_text("{")
        raise OSError("disk full")

    with pytest.raises(OSError):
        pipeline._atomic(target, half_written)
    assert list(tmp_path.iterdir()) == []
    pipeline.write_text(target, "{}")
    assert target.read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_failed_run_is_never_marked_done(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "DONE").write_text("an earlier run")
    monkeypatch.setattr(pipeline, "load_base", lambda recipe, device: (tiny_model(), None))
    monkeypatch.setattr(pipeline, "prepare_data", lambda recipe, tokenizer: {})

    def crash(model, tokenizer, recipe, data):
        raise RuntimeError("crash in the first evaluation")

    monkeypatch.setattr(pipeline, "evaluate", crash)
    recipe = load_recipe(None, [f"output_dir={out}"])
    with pytest.raises(RuntimeError, match="crash"):
        pipeline.run(recipe)
    assert not pipeline.is_done(out)
    assert yaml.safe_load((out / "config.yaml").read_text()) == recipe
    assert not (out / "metrics.json").exists() and not (out / "report.md").exists()


def test_metrics_table_has_a_row_per_metric_and_a_column_per_stage():
    table = metrics_table({"fp": {"wiki_ppl": 20.8, "piqa": 0.61}, "rtn": {"wiki_ppl": 68.5, "piqa": 0.55},
                                    "init": {"wiki_ppl": 58.7}, "zeroqat": {"wiki_ppl": 55.2}})
    lines = table.splitlines()
    assert lines[0] == "| metric | fp | rtn | init | zeroqat |"
    assert lines[2] == "| wiki_ppl | 20.80 | 68.50 | 58.70 | 55.20 |"
    assert lines[3] == "| piqa | 0.6100 | 0.5500 | - | - |"


def test_report_states_the_zero_shot_sampling_error():
    metrics = {"fp": {"wiki_ppl": 20.8, "piqa": 0.61}}
    limited = load_recipe(None, ["name=r", "eval.tasks=[piqa]", "eval.limit=100"])
    assert "first 100 documents" in (text := report(limited, metrics, {}, "cpu"))
    assert "standard error of up to 0.050" in text
    whole = load_recipe(None, ["name=r", "eval.tasks=[piqa]"])
    assert "every document" in report(whole, metrics, {}, "cpu")
    assert "Zero-shot" not in report(load_recipe(None, ["name=r"]), metrics, {}, "cpu")


# --------------------------------------------------------------------------------------------- CLI


def _zqat(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zqat_peft.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def _assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("zqat: error: ")
    for needle in needles:
        assert needle in last


def test_cli_unknown_key_and_missing_recipe_fail_in_one_line(tmp_path):
    path = _write(tmp_path / "r.yaml", {"train": {"steps": 1}})
    _assert_one_line_error(_zqat("train", "--recipe", str(path), "train.stepz=3", cwd=tmp_path),
                           "unknown recipe key 'train.stepz'", "valid keys")
    _assert_one_line_error(_zqat("train", "--recipe", "no_such_recipe.yaml", cwd=tmp_path),
                           "recipe file not found")


def test_cli_missing_adapter_fails_in_one_line(tmp_path, capsys):
    assert cli.main(["eval", "--adapter", str(tmp_path / "no_adapter")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zqat: error: ") and "no_adapter" in err and err.count("\n") == 1


def test_cli_unreachable_hub_model_fails_in_one_line_without_done(tmp_path):
    out = tmp_path / "hub_run"
    path = _write(tmp_path / "hub.yaml", {"model": "no-such-org/no-such-model", "output_dir": str(out),
                                          "eval": {"corpora": {}}})
    # Offline mode stands for "no network" without waiting for the Hub client's retries.
    proc = _zqat("train", "--recipe", str(path), cwd=tmp_path, HF_HUB_OFFLINE="1")
    _assert_one_line_error(proc, "cannot load the model 'no-such-org/no-such-model'")
    assert not pipeline.is_done(out)


# ------------------------------------------------------------------------- a tiny model, real data


def _real_assets(*names: str) -> bool:
    from zqat_peft.data import is_complete

    return all(is_complete(name) for name in names)


needs_model_and_wiki = pytest.mark.skipif(
    not _real_assets("model", "wiki"), reason="the real model and wiki are not fetched (run `zqat fetch model wiki`)"
)


@pytest.fixture(scope="module")
def tiny_local_model(tmp_path_factory) -> Path:
    """A randomly initialized 2-block Llama with SmolLM2's tokenizer, saved as a local folder: the whole
    job runs on it in seconds."""
    import transformers

    from zqat_peft.data import resolve_model_path

    tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_model_path())
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, tie_word_embeddings=True)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-smollm")
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@needs_model_and_wiki
def test_zqat_eval_quantized_evaluates_an_export_as_the_model_exported(tiny_local_model, tmp_path, capsys):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zqat_peft import ZeroQATConfig
    from zqat_peft.export import save_compressed_tensors

    tokenizer = AutoTokenizer.from_pretrained(tiny_local_model)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_local_model),
                           ZeroQATConfig(w_bits=4, group_size=32, trainable="scales")).eval()
    save_compressed_tensors(model, tmp_path / "ct", tokenizer=tokenizer)
    overrides = ["eval={corpora: {wiki: wiki}, seq_len: 64, max_windows: 2, batch_size: 2}"]
    recipe = load_recipe(None, overrides)
    expected = pipeline.evaluate(model, tokenizer, recipe, pipeline.prepare_eval_data(recipe, tokenizer))
    capsys.readouterr()
    assert cli.main(["eval", "--quantized", str(tmp_path / "ct"), "--json", *overrides]) == 0
    assert json.loads(capsys.readouterr().out) == expected

    assert cli.main(["eval", "--quantized", str(tiny_local_model), *overrides]) == 2  # a float checkpoint
    err = capsys.readouterr().err
    assert err.startswith("zqat: error: ") and "not a quantized checkpoint" in err and err.count("\n") == 1


@needs_model_and_wiki
@pytest.mark.parametrize("trainable", ["full", "scales"])
def test_calibrated_run_then_zqat_eval_and_export(tiny_local_model, tmp_path, capsys, trainable):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    overrides = [
        f"model={tiny_local_model}",
        f"quant={{w_bits: 3, a_bits: 8, group_size: 64, trainable: {trainable}, init: calibrate, calib_epochs: 1, "
        "smooth: false}",
        "calibration={n_samples: 4, seq_len: 64, batch_size: 2}",
        "train={steps: 2, batch_size: 2, seq_len: 32, logging_steps: 1}",
        "eval={corpora: {wiki: wiki}, seq_len: 64, max_windows: 2, batch_size: 2}",
    ]
    recipe = load_recipe(None, [*overrides, f"output_dir={out}", "save_init=true"])
    result = pipeline.run(recipe)
    metrics = result["metrics"]
    assert pipeline.is_done(out) and "calibration" in result["timings"]
    assert metrics["init"] != metrics["rtn"]  # calibrated

    capsys.readouterr()
    assert cli.main(["eval", "--adapter", str(out / "adapter"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["wiki_ppl"] == pytest.approx(metrics["zeroqat"]["wiki_ppl"], rel=1e-6)
    assert cli.main(["eval", "--adapter", str(out / "init_adapter"), "--json"]) == 0  # save_init: the start
    printed = json.loads(capsys.readouterr().out)
    assert printed["wiki_ppl"] == pytest.approx(metrics["init"]["wiki_ppl"], rel=1e-6)
    assert printed["wiki_ppl"] != pytest.approx(metrics["zeroqat"]["wiki_ppl"], rel=1e-6)

    merged_dir = tmp_path / "merged"
    assert cli.main(["export", "--adapter", str(out / "adapter"), "--out", str(merged_dir)]) == 0
    assert "activation quantization" in capsys.readouterr().err  # a_bits=8 is not part of the checkpoint
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not any("zqat" in name for name, _ in merged.named_parameters())
    for name, module in merged.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            groups = module.weight.detach().reshape(-1, 64)
            assert max(len(torch.unique(g)) for g in groups) <= 2 ** 3, name  # on the W3 g64 grid
    assert (merged_dir / "tokenizer.json").is_file()
    assert cli.main(["export", "--adapter", str(out / "adapter"), "--out", str(merged_dir)]) == 2

    # start_from the saved init: no RTN or calibration stage, the same start, the same training
    again = load_recipe(None, [*overrides, f"output_dir={tmp_path / 'again'}", f"start_from={out / 'init_adapter'}"])
    calibrating_on_lee = [*overrides, "calibration.data=lee"]
    assert "lee" in required_assets(load_recipe(None, calibrating_on_lee))
    assert "lee" not in required_assets(load_recipe(None, [*calibrating_on_lee, f"start_from={out / 'init_adapter'}"]))
    result = pipeline.run(again)
    assert "rtn" not in result["metrics"] and "calibration" not in result["timings"]
    for stage in ("init", "zeroqat"):
        assert result["metrics"][stage]["wiki_ppl"] == pytest.approx(metrics[stage]["wiki_ppl"], rel=1e-6)
    with pytest.raises(RecipeError, match="quant.w_bits 3 there, 4 here"):
        load_recipe(None, [*overrides, "quant.w_bits=4", f"start_from={out / 'init_adapter'}"])
    with pytest.raises(FileNotFoundError, match="start_from: no adapter"):
        load_recipe(None, [*overrides, f"start_from={tmp_path / 'nothing'}"])
    with pytest.raises(RecipeError, match="trained on the base model"):
        load_recipe(None, [*overrides, "model=smollm2-135m", f"start_from={out / 'init_adapter'}"])


def _train_with_held_out_checks(model_dir: Path, work: Path, steps: int, lr: float):
    """W3 RTN on the tiny model, ZO-trained with a held-out check every 2 steps; returns the model, its
    data, its weights at the start and the held-out loss per checked step."""
    recipe = load_recipe(None, [
        f"model={model_dir}", f"output_dir={work / 'run'}",
        "quant={w_bits: 3, group_size: 64, trainable: full, init: rtn}",
        f"train={{steps: {steps}, batch_size: 2, seq_len: 32, lr: {abs(lr)}, logging_steps: 1, eval_steps: 2, eval_windows: 4}}",
        "eval={corpora: {wiki: wiki}, seq_len: 64, max_windows: 2, batch_size: 2}",
    ])
    recipe["train"]["lr"] = lr  # a recipe refuses lr < 0 (gradient ascent); train() is given it past that check
    model, tokenizer = pipeline.quantized_model(recipe, "cpu", "rtn")
    data = pipeline.prepare_data(recipe, tokenizer)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    history = pipeline.train(model, recipe, data, work / "trainer", "cpu")
    return model, data, start, {e["step"]: e["eval_loss"] for e in history if "eval_loss" in e}


def test_a_warmup_as_long_as_training_is_refused():
    # the learning rate would never reach the recipe's lr: the run would train at a fraction of it, silently
    with pytest.raises(RecipeError, match=r"train.warmup_steps \(200\) is not below train.steps \(200\)"):
        load_recipe(None, ["train.steps=200", "train.warmup_steps=200"])
    assert load_recipe(None, ["train.steps=200", "train.warmup_steps=20"])["train"]["warmup_steps"] == 20


@needs_model_and_wiki
def test_eval_steps_keeps_the_checkpoint_with_the_best_held_out_loss(tiny_local_model, tmp_path):
    model, data, _, held_out = _train_with_held_out_checks(tiny_local_model, tmp_path, steps=6, lr=1.0)
    assert len(data["validation"]) == 4
    assert sorted(held_out) == [0, 2, 4, 6]  # 0: the starting model
    assert held_out[6] > min(held_out.values())  # lr 1.0 overshoots: the last step is not the best
    trainer_args = ZOTrainingArguments(output_dir=str(tmp_path / "eval"), report_to=[], use_cpu=True,
                                       per_device_eval_batch_size=2)
    final = ZOTrainer(model=model, args=trainer_args, eval_dataset=data["validation"]).evaluate()
    assert final["eval_loss"] == pytest.approx(min(held_out.values()), rel=1e-6)  # the best one was kept
    with pytest.raises(RecipeError, match="train.eval_steps"):
        load_recipe(None, ["train.eval_steps=0"])
    with pytest.raises(RecipeError, match=r"train.eval_steps \(300\) is larger than train.steps \(200\)"):
        load_recipe(None, ["train.steps=200", "train.eval_steps=300"])
    with pytest.raises(RecipeError, match="train.steps=.* is out of range: train.steps takes an integer >= 1"):
        load_recipe(None, ["train.steps=abc", "train.eval_steps=10"])
    with pytest.raises(RecipeError, match="finetune.loss"):
        load_recipe(None, ["finetune.loss=hinge"])
    with pytest.raises(RecipeError, match="save_init takes true or false"):
        load_recipe(None, ["save_init=yes please"])


@needs_model_and_wiki
def test_eval_steps_gives_back_the_start_when_no_checkpoint_beats_it(tiny_local_model, tmp_path):
    # lr < 0: gradient ascent. The random model's loss is near uniform: at lr -1 one batch's ascent step can
    # lower another batch's loss (it did at step 4); at -10 both checks sit 0.01-0.02 above the start, far above
    # float noise and far below the divergence guard's margin (log 1.5), which would stop the run.
    model, _, start, held_out = _train_with_held_out_checks(tiny_local_model, tmp_path, steps=4, lr=-10.0)
    assert held_out[0] < min(held_out[2], held_out[4])
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, start[name]), name  # the start came back, bit for bit


@needs_model_and_wiki
def test_scheduler_and_its_arguments_reach_the_trainer(tiny_local_model, tmp_path):
    recipe = load_recipe(None, [
        f"model={tiny_local_model}", "quant={w_bits: 3, group_size: 64, trainable: full, init: rtn}",
        "train={steps: 6, batch_size: 2, seq_len: 32, lr: 1.0, logging_steps: 1, scheduler: warmup_stable_decay}",
        "train.scheduler_kwargs={num_decay_steps: 2, min_lr_ratio: 0.25, decay_type: linear}",
    ])
    model, tokenizer = pipeline.quantized_model(recipe, "cpu", "rtn")
    history = pipeline.train(model, recipe, pipeline.prepare_data(recipe, tokenizer), tmp_path, "cpu")
    lrs = [e["learning_rate"] for e in history if "learning_rate" in e]
    # the rate each step used: four stable steps, then two decaying linearly from the full rate toward 0.25 of it
    assert lrs == pytest.approx([1.0, 1.0, 1.0, 1.0, 1.0, 0.625])
    with pytest.raises(RecipeError, match="train.scheduler must be one of .*warmup_stable_decay"):
        load_recipe(None, ["train.scheduler=step"])
    with pytest.raises(RecipeError, match="train.scheduler_kwargs must be a mapping"):
        load_recipe(None, ["train.scheduler_kwargs=300"])


def test_the_recipe_chooses_the_estimator(tmp_path, tiny_local_model):
    recipe = load_recipe(None, [
        f"model={tiny_local_model}", "quant={w_bits: 3, group_size: 64, trainable: scales, init: rtn}",
        "train={steps: 2, batch_size: 2, seq_len: 32, num_queries: 3, estimator: one_sided, eval_steps: null}",
    ])
    model, tokenizer = pipeline.quantized_model(recipe, "cpu", "rtn")
    forwards = []
    forward = model.forward
    model.forward = lambda *a, **kw: forwards.append(1) or forward(*a, **kw)
    pipeline.train(model, recipe, pipeline.prepare_data(recipe, tokenizer), tmp_path, "cpu")
    assert len(forwards) == 2 * (3 + 1)  # one unperturbed forward per step, not 2 x 3
    with pytest.raises(RecipeError, match="train.estimator must be one of"):
        load_recipe(None, ["train.estimator=central"])


def test_the_recipe_chooses_the_rounding_mask(tmp_path, tiny_local_model):
    recipe = load_recipe(None, [
        f"model={tiny_local_model}", "quant={w_bits: 3, group_size: 64, trainable: full, init: rtn}",
        "train={steps: 2, batch_size: 2, seq_len: 32, mask: rounding, logging_steps: 1, eval_steps: null}",
    ])
    model, tokenizer = pipeline.quantized_model(recipe, "cpu", "rtn")
    history = pipeline.train(model, recipe, pipeline.prepare_data(recipe, tokenizer), tmp_path, "cpu")
    fractions = [e["perturbed_fraction"] for e in history if "perturbed_fraction" in e]
    assert len(fractions) == 2 and all(0 < f < 0.5 for f in fractions)
    with pytest.raises(RecipeError, match="train.mask must be one of"):
        load_recipe(None, ["train.mask=sparse"])


@needs_model_and_wiki
def test_the_rtn_stage_of_a_gptq_recipe_rounds_to_nearest(tiny_local_model):
    # the RTN column of `zqat run` on a recipe with rounding: gptq (the W2/W3 CPU recipes) was refused, and
    # then on one with scale refinement
    recipe = load_recipe(None, [f"model={tiny_local_model}", "quant={w_bits: 2, group_size: 64, trainable: scales, "
                                "init: calibrate, rounding: gptq, calib_refine_epochs: 2}"])
    model, _ = pipeline.quantized_model(recipe, "cpu", "rtn")
    config = model.peft_config["default"]
    assert config.rounding == "nearest" and config.init == "rtn" and config.calib_refine_epochs == 0


@needs_model_and_wiki
def test_zo_trains_the_norms_of_modules_to_save_also_from_an_init_adapter(tiny_local_model, tmp_path):
    quant = "quant={w_bits: 2, group_size: 64, trainable: scales, init: rtn}"
    norms = "quant.modules_to_save=[input_layernorm, post_attention_layernorm, norm]"
    recipe = load_recipe(None, [f"model={tiny_local_model}", quant, norms, "train={steps: 2, batch_size: 2, "
                                "seq_len: 32, lr: 1e-1, eps: 1e-2, eval_steps: null}"])
    init, _ = pipeline.quantized_model(load_recipe(None, [f"model={tiny_local_model}", quant]), "cpu", "rtn")
    pipeline.save_adapter(init, tmp_path / "init")  # an init adapter without trained norms
    model, tokenizer = pipeline.load_adapter(recipe, tmp_path / "init", "cpu", trainable=True)
    norm_names = [n for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n]
    assert len(norm_names) == 2 * 2 + 1
    pipeline.train(model, recipe, pipeline.prepare_data(recipe, tokenizer), tmp_path / "work", "cpu")
    params = dict(model.named_parameters())
    assert all(not torch.equal(params[n], torch.ones_like(params[n])) for n in norm_names)  # trained from ones
    pipeline.save_adapter(model, tmp_path / "trained")
    reloaded, _ = pipeline.load_adapter(recipe, tmp_path / "trained", "cpu")
    assert all(torch.equal(dict(reloaded.named_parameters())[n], params[n]) for n in norm_names)

    other = load_recipe(None, [f"model={tiny_local_model}", quant, "quant.modules_to_save=[input_layernorm]"])
    with pytest.raises(RecipeError, match="set quant.modules_to_save to the adapter's"):
        pipeline.load_adapter(other, tmp_path / "trained", "cpu", trainable=True)


@needs_model_and_wiki
def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tiny_local_model, tmp_path, monkeypatch, capsys):
    def recipe(name: str, *more: str) -> dict:
        return load_recipe(None, [
            f"model={tiny_local_model}", f"output_dir={tmp_path / name}", "name=resumable",
            "quant={w_bits: 3, group_size: 64, trainable: lightweight, init: calibrate, calib_epochs: 1}",
            "calibration={n_samples: 4, seq_len: 64, batch_size: 2}",
            "train={steps: 6, batch_size: 2, seq_len: 32, lr: 1e-3, logging_steps: 1, eval_steps: 2, eval_windows: 4}",
            "eval={corpora: {wiki: wiki}, seq_len: 64, max_windows: 2, batch_size: 2}", *more,
        ])

    whole = pipeline.run(recipe("whole"))
    assert whole["metrics"]["zeroqat"] != whole["metrics"]["init"]  # training kept a checkpoint after the start

    step = ZOTrainer.training_step
    def stop_at_step_3(self, *args, **kwargs):
        if self.state.global_step == 3:
            raise RuntimeError("power cut")
        return step(self, *args, **kwargs)

    monkeypatch.setattr(ZOTrainer, "training_step", stop_at_step_3)
    with pytest.raises(RuntimeError, match="power cut"):
        pipeline.run(recipe("cut"))
    monkeypatch.setattr(ZOTrainer, "training_step", step)
    cut = tmp_path / "cut"
    assert not pipeline.is_done(cut) and (cut / ".trainer" / "checkpoint-2").is_dir()

    assert cli.main(["train", "--recipe", str(cut / "config.yaml"), "--resume", "train.lr=2e-3"]) == 2
    assert "differs from the interrupted run's" in capsys.readouterr().err  # and names the key:
    with pytest.raises(RecipeError, match="in train.lr;"):
        pipeline.resume_state(cut, recipe("cut", "train.lr=2e-3"))
    with pytest.raises(RecipeError, match="no checkpoint to resume from"):
        pipeline.run(recipe("never_started"), resume=True)

    before_training = json.loads((cut / pipeline.STAGES_FILE).read_text())["timings"]
    trained_before_cut = pipeline.checkpoint_training_seconds(cut / ".trainer")
    assert trained_before_cut > 0  # the two steps to checkpoint-2, recorded in it
    steps_taken = []
    def count(self, *args, **kwargs):
        steps_taken.append(self.state.global_step)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(ZOTrainer, "training_step", count)
    load_base, bases_loaded = pipeline.load_base, []
    def count_bases(*args, **kwargs):
        bases_loaded.append(1)
        return load_base(*args, **kwargs)

    monkeypatch.setattr(pipeline, "load_base", count_bases)
    clock_init, clocks_made = pipeline.TrainingClock.__init__, []
    def record_clock(self, seconds=0.0):
        clocks_made.append(seconds)
        clock_init(self, seconds)

    monkeypatch.setattr(pipeline.TrainingClock, "__init__", record_clock)
    read_seconds = pipeline.checkpoint_training_seconds
    monkeypatch.setattr(pipeline, "checkpoint_training_seconds", lambda work_dir: read_seconds(work_dir) + 1e4)
    resumed = pipeline.run(recipe("cut"), resume=True)
    assert steps_taken == [2, 3, 4, 5]  # from the checkpoint at step 2, not from the start
    assert len(bases_loaded) == 1  # the saved start's base only: no full-precision model without distill
    assert resumed["metrics"] == whole["metrics"]  # bit for bit: the same trajectory from the same start
    for stage in ("fp", "rtn", "calibration", "init"):  # measured before the cut, not again
        assert resumed["timings"][stage] == before_training[stage], stage
    assert 0 < resumed["timings"]["train"] - (trained_before_cut + 1e4) < 600  # the steps before the cut count too
    assert clocks_made == [trained_before_cut + 1e4]  # goes on from the checkpoint's count: a second cut loses nothing
    assert resumed["timings"]["total"] >= sum(t for k, t in resumed["timings"].items() if k != "total")
    assert pipeline.is_done(cut) and not (cut / pipeline.STAGES_FILE).exists() and not (cut / ".trainer").exists()
    with pytest.raises(RecipeError, match="holds a finished run"):
        pipeline.run(recipe("cut"), resume=True)

    # cut during the final evaluation: the trained adapter is already saved, so only that evaluation is redone
    evaluate, evaluations = pipeline.evaluate, []
    def cut_at_the_fourth(*args, **kwargs):  # fp, rtn, init, then zeroqat
        evaluations.append(len(evaluations))
        if len(evaluations) == 4:
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(pipeline, "evaluate", cut_at_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(recipe("late_cut"))
    late = tmp_path / "late_cut"
    assert (late / "adapter").is_dir() and not (late / ".trainer").exists() and not pipeline.is_done(late)
    steps_taken.clear(), bases_loaded.clear()
    resumed = pipeline.run(recipe("late_cut"), resume=True)
    assert steps_taken == [] and len(evaluations) == 5  # no training, one evaluation
    assert len(bases_loaded) == 1  # the trained adapter's base only
    assert resumed["metrics"] == whole["metrics"]  # the saved adapter evaluates as the model in memory did
    assert pipeline.is_done(late) and (late / "loss_curve.png").is_file()


@needs_model_and_wiki
def test_distill_trains_on_the_full_precision_models_targets(tiny_local_model, tmp_path):
    from zqat_peft.distill import TeacherWindows, distillation_loss, teacher_top_k

    recipe = load_recipe(None, [
        f"model={tiny_local_model}", f"output_dir={tmp_path / 'run'}",
        "quant={w_bits: 3, group_size: 64, trainable: full, init: rtn}",
        "train={loss: distill, steps: 4, batch_size: 2, seq_len: 32, logging_steps: 1, eval_steps: 2, eval_windows: 4}",
        "eval={corpora: {wiki: wiki}, seq_len: 64, max_windows: 2, batch_size: 2}",
    ])
    fp_model, tokenizer = pipeline.load_base(recipe, "cpu")
    data = pipeline.prepare_data(recipe, tokenizer)
    assert len(data["train"]) == 4 * 2  # one pass: each window needs a full-precision forward first
    model, _ = pipeline.quantized_model(recipe, "cpu", "rtn")
    with pytest.raises(ValueError, match="add_teacher"):
        pipeline.train(model, recipe, data, tmp_path / "trainer", "cpu")

    pipeline.add_teacher(fp_model, recipe, data)
    assert isinstance(data["train"], TeacherWindows) and isinstance(data["validation"], TeacherWindows)
    windows = data["validation"].windows
    assert torch.equal(data["validation"].teacher_ids, teacher_top_k(fp_model, windows)[0])
    with torch.no_grad():
        at_start = distillation_loss(model(input_ids=windows).logits, data["validation"].teacher_ids,
                                     data["validation"].teacher_logprobs)
    history = pipeline.train(model, recipe, data, tmp_path / "trainer", "cpu")
    held_out = {e["step"]: e["eval_loss"] for e in history if "eval_loss" in e}
    assert sorted(held_out) == [0, 2, 4]
    assert held_out[0] == pytest.approx(at_start.item(), rel=1e-5)  # the checks measure the KL, not the CE

    with pytest.raises(RecipeError, match="train.loss must be one of"):
        load_recipe(None, ["train.loss=mse"])
    with pytest.raises(RecipeError, match="train.loss=distill is for language modelling"):
        load_recipe(None, ["train.loss=distill", "task=boolq"])
    with pytest.raises(RecipeError, match="train.max_windows takes an integer >= 1 or null"):
        load_recipe(None, ["train.max_windows=0"])


@pytest.mark.skipif(not _real_assets("model", "tasks"), reason="the model's tokenizer and BoolQ are not fetched")
def test_boolq_fine_tuning_path(tiny_local_model, tmp_path):
    from transformers import AutoTokenizer

    recipe = load_recipe(None, [
        f"model={tiny_local_model}", f"output_dir={tmp_path / 'boolq'}", "task=boolq",
        "quant={w_bits: 4, group_size: 64, trainable: lightweight, init: rtn}",
        "train={steps: 2, batch_size: 2, logging_steps: 1}",
        "finetune={n_train: 6, n_val: 6, n_test: 6, max_length: 96, eval_batch_size: 4, loss: choices}",
        "eval.corpora={}",
    ])
    splits = pipeline.task_splits(recipe)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [6, 6, 6]
    questions = [row["question"] for split in splits.values() for row in split]
    assert len(set(questions)) == len(questions)  # disjoint
    assert pipeline.task_splits(recipe) == splits  # fixed by the seed

    tokenizer = AutoTokenizer.from_pretrained(tiny_local_model)
    example = finetune.answer_example(tokenizer, splits["train"][0], max_length=96, answer=" yes")
    assert len(example["input_ids"]) <= 96
    answer = [t for t in example["labels"] if t != -100]
    assert tokenizer.decode(answer) == " yes" and example["labels"][-len(answer):] == answer
    choice = finetune.choice_example(tokenizer, splits["train"][0], max_length=96)
    assert choice["input_ids"] == example["input_ids"][:-1] and choice["choices"][1] == answer[0]

    # the held-out questions are evaluated shortest first (less padding), not in the split's order
    held_out = pipeline.prepare_data({**recipe, "train": {**recipe["train"], "eval_steps": 1}}, tokenizer)["validation"]
    in_split_order = [len(finetune.answer_example(tokenizer, row, 96)["input_ids"]) for row in splits["validation"]]
    assert [len(e["input_ids"]) for e in held_out] == sorted(in_split_order) != in_split_order

    metrics = pipeline.run(recipe)["metrics"]
    for stage in STAGES:
        assert list(metrics[stage]) == ["boolq_acc"] and 0.0 <= metrics[stage]["boolq_acc"] <= 1.0


# ------------------------------------------------------------------------------- the real model


@needs_model_and_wiki
def test_end_to_end_on_the_real_model(tmp_path):
    from peft import PeftModel

    from zqat_peft.data import load_model_and_tokenizer

    out = tmp_path / "tiny"
    recipe = load_recipe(None, [
        "name=tiny", f"output_dir={out}",
        "quant={w_bits: 4, a_bits: 16, group_size: 64, trainable: lightweight, init: rtn}",
        "train={steps: 3, batch_size: 2, seq_len: 64, logging_steps: 1}",
        "eval={corpora: {wiki: wiki}, seq_len: 128, max_windows: 2, batch_size: 2, tasks: []}",
    ])
    result = pipeline.run(recipe)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == result["metrics"] and list(metrics) == ["fp", "rtn", "init", "zeroqat", "zeroqat_kept"]
    assert metrics["zeroqat_kept"] == "last"  # no held-out checks, no divergence: the trained model is the result
    assert metrics["init"] == metrics["rtn"]  # init: rtn
    assert metrics["fp"]["wiki_ppl"] < metrics["rtn"]["wiki_ppl"] < 1e3
    for name in ("config.yaml", "metrics.json", "timings.json", "loss_curve.png", "report.md", "DONE",
                 "adapter/adapter_config.json"):
        assert (out / name).is_file(), name
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "| wiki_ppl |" in (out / "report.md").read_text()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers

    # A fresh base model with the saved adapter scores exactly what the run measured.
    base, tokenizer = load_model_and_tokenizer()
    loaded = PeftModel.from_pretrained(base, str(out / "adapter"))
    again = pipeline.evaluate(loaded, tokenizer, recipe, pipeline.prepare_eval_data(recipe, tokenizer))
    assert again["wiki_ppl"] == pytest.approx(metrics["zeroqat"]["wiki_ppl"], rel=1e-6)


def _word_corpora(folder: Path, words: tuple[str, ...]) -> list[str]:
    """One text file per word, each line made of that word only (so a window's corpus shows in its tokens)."""
    paths = []
    for word in words:
        path = folder / f"{word}.txt"
        path.write_text("\n".join(f"{word} {word} {word} line {i}" for i in range(400)) + "\n")
        paths.append(str(path))
    return paths


def test_training_on_several_corpora_alternates_their_windows(tiny_local_model, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_local_model)
    corpora = _word_corpora(tmp_path, ("alpha", "omega"))
    recipe = load_recipe(None, [f"model={tiny_local_model}", f"train.data=[{corpora[0]}, {corpora[1]}]",
                                "train={seq_len: 16, batch_size: 2, steps: 3, eval_steps: 3, eval_windows: 4}",
                                "eval={corpora: {wiki: wiki}, seq_len: 16, max_windows: 1}"])
    assert [s for s in text_sources(recipe) if s != "wiki"] == corpora
    windows = pipeline.alternating_windows(tokenizer, recipe["train"]["data"], "train", 16, 5)
    alpha, omega = (tokenizer(w).input_ids[-1] for w in (" alpha", " omega"))
    from_alpha = [(w == alpha).any().item() and not (w == omega).any().item() for w in windows]
    assert windows.shape == (5, 16) and from_alpha == [True, False, True, False, True]
    data = pipeline.prepare_data(recipe, tokenizer)
    assert len(data["validation"]) == 4
    assert [(w["input_ids"] == alpha).any().item() for w in data["validation"]] == [True, False, True, False]


def test_the_held_out_check_reads_train_eval_data_not_the_training_corpus(tiny_local_model, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_local_model)
    corpora = _word_corpora(tmp_path, ("alpha", "omega"))
    recipe = load_recipe(None, [f"model={tiny_local_model}", f"train.data={corpora[0]}",
                                f"train.eval_data={corpora[1]}",
                                "train={seq_len: 16, batch_size: 2, steps: 3, eval_steps: 3, eval_windows: 4}",
                                "eval={corpora: {wiki: wiki}, seq_len: 16, max_windows: 1}"])
    assert corpora[1] in text_sources(recipe)  # fetched and checked like the training corpus
    data = pipeline.prepare_data(recipe, tokenizer)
    alpha, omega = (tokenizer(w).input_ids[-1] for w in (" alpha", " omega"))
    assert all((w["input_ids"] == alpha).any().item() for w in data["train"])
    assert len(data["validation"]) == 4
    assert all((w["input_ids"] == omega).any().item() and not (w["input_ids"] == alpha).any().item()
               for w in data["validation"])


@pytest.mark.parametrize("eval_data, loss, message", [
    ("generated", "ce", "train.eval_data: generated .* needs train.loss: distill"),
    ("[wiki, generated]", "distill", "train.eval_data: generated .* alone"),
    ("[]", "distill", "train.eval_data must be null"),
])
def test_a_held_out_check_on_text_it_cannot_score_is_refused(eval_data, loss, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, [f"train.eval_data={eval_data}", f"train.loss={loss}"])


def test_a_held_out_check_on_generated_text_samples_only_the_held_out_windows(tiny_local_model, tmp_path):
    recipe = load_recipe(None, [
        f"model={tiny_local_model}", "train.eval_data=generated",
        "quant={w_bits: 4, group_size: 64, trainable: scales, init: rtn}",
        "train={loss: distill, steps: 2, batch_size: 2, seq_len: 16, logging_steps: 1, eval_steps: 2, eval_windows: 3}",
        "eval={corpora: {wiki: wiki}, seq_len: 64, max_windows: 2, batch_size: 2}",
    ])
    fp_model, tokenizer = pipeline.load_base(recipe, "cpu")
    data = pipeline.prepare_data(recipe, tokenizer)
    corpus_windows = data["train"].windows.clone()
    assert "validation" not in data
    model, _ = pipeline.quantized_model(recipe, "cpu", "rtn")
    pipeline.add_teacher(fp_model, recipe, data)
    with pytest.raises(ValueError, match="needs held-out windows: .*add_generated_windows"):
        pipeline.train(model, recipe, data, tmp_path / "trainer", "cpu")
    data = pipeline.prepare_data(recipe, tokenizer)
    pipeline.add_generated_windows(fp_model, tokenizer, recipe, data)
    assert torch.equal(data["train"].windows, corpus_windows)  # the training windows stay the corpus's
    held_out = data["validation"].windows
    assert held_out.shape == (3, 16) and not set(held_out[:, 0].tolist()) & set(tokenizer.all_special_ids)
    pipeline.add_teacher(fp_model, recipe, data)
    history = pipeline.train(model, recipe, data, tmp_path / "trainer", "cpu")
    assert [e["step"] for e in history if "eval_loss" in e] == [0, 2]
    assert "held-out check on 3 windows of text sampled from the full-precision model" in report(recipe, {}, {}, "cpu")


def test_a_sample_temperature_without_sampled_windows_is_refused():
    with pytest.raises(RecipeError, match="train.sample_temperature .* neither train.data nor train.eval_data"):
        load_recipe(None, ["train.sample_temperature=0.8"])
    recipe = load_recipe(None, ["train.sample_temperature=0.8", "train.eval_data=generated", "train.loss=distill"])
    assert recipe["train"]["sample_temperature"] == 0.8


@pytest.mark.parametrize("data", ["[]", "[wiki, 3]", "''"])
def test_train_data_that_names_no_corpus_is_refused(data):
    with pytest.raises(RecipeError, match="train.data must be a corpus name or a non-empty list"):
        load_recipe(None, [f"train.data={data}"])


@pytest.mark.parametrize("data, loss", [("generated", "ce"), ("[wiki, generated]", "distill"),
                                        ("[generated]", "distill")])
def test_generated_training_data_without_distillation_or_in_a_list_is_refused(data, loss):
    with pytest.raises(RecipeError, match="train.data: generated .* needs train.loss: distill .* alone"):
        load_recipe(None, [f"train.data={data}", f"train.loss={loss}"])


def test_generated_training_data_is_sampled_from_the_full_precision_model(tiny_local_model, tmp_path):
    from zqat_peft.distill import TeacherWindows

    recipe = load_recipe(None, [
        f"model={tiny_local_model}", f"output_dir={tmp_path / 'run'}", "train.data=generated",
        "quant={w_bits: 4, group_size: 64, trainable: scales, init: rtn}",
        "train={loss: distill, steps: 3, batch_size: 2, seq_len: 16, logging_steps: 1, eval_steps: 3, eval_windows: 4}",
        "eval={corpora: {wiki: wiki}, seq_len: 64, max_windows: 2, batch_size: 2}",
    ])
    assert "generated" not in text_sources(recipe)  # not a corpus to fetch
    fp_model, tokenizer = pipeline.load_base(recipe, "cpu")
    data = pipeline.prepare_data(recipe, tokenizer)
    assert "train" not in data and "validation" not in data
    model, _ = pipeline.quantized_model(recipe, "cpu", "rtn")
    with pytest.raises(ValueError, match="call add_generated_windows"):
        pipeline.train(model, recipe, data, tmp_path / "trainer", "cpu")
    pipeline.add_generated_windows(fp_model, tokenizer, recipe, data)
    train, held_out = data["train"].windows, data["validation"].windows
    assert train.shape == (3 * 2, 16) and held_out.shape == (4, 16)
    assert not set(train[:, 0].tolist()) & set(tokenizer.all_special_ids)
    assert not any(torch.equal(w, h) for w in train for h in held_out)  # the held-out windows: another seed
    cold = {**recipe, "train": {**recipe["train"], "sample_temperature": 0.05}}
    cold_data = {}
    pipeline.add_generated_windows(fp_model, tokenizer, cold, cold_data)
    assert torch.equal(cold_data["train"].windows[:, 0], train[:, 0])  # the same seed: the same first tokens
    assert not torch.equal(cold_data["train"].windows, train)  # drawn at the recipe's temperature
    assert "at temperature 0.05" in report(cold, {}, {}, "cpu")
    pipeline.add_teacher(fp_model, recipe, data)
    assert isinstance(data["train"], TeacherWindows)
    history = pipeline.train(model, recipe, data, tmp_path / "trainer", "cpu")
    assert [e["step"] for e in history if "eval_loss" in e] == [0, 3]
    report_text = (Path(pipeline.run(recipe)["output_dir"]) / "report.md").read_text()
    assert "tokens of text sampled from the full-precision model" in report_text
