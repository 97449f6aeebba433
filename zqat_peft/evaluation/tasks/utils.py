"""Loaders and document functions of zqat_peft's local lm-eval tasks (the YAML files in this folder).

lm-eval imports this file through the ``!function utils.<name>`` tags of the YAMLs. Each task's
``custom_dataset`` loader reads the validation split that :mod:`zqat_peft.data` keeps in its cache (a
``datasets.load_from_disk`` folder, see :func:`zqat_peft.data.task_data_dir`), so no task touches the
Hugging Face Hub. lm-eval calls a loader with the task's metadata as keyword arguments; the key
``zqat_cache`` (set through ``TaskManager(metadata=...)``) picks another cache folder than the default.

The document functions reproduce lm-eval's standard definitions of these tasks (HellaSwag's text cleaning,
WinoGrande's partial evaluation) so that scores stay comparable with published lm-eval numbers.
"""

from __future__ import annotations

import re

import datasets


def _load(task: str, zqat_cache=None, **_ignored) -> datasets.DatasetDict:
    from zqat_peft.data import task_data_dir

    # In memory: the splits are small, and `.map` (HellaSwag's process_docs) then writes no cache files
    # next to the arrow data.
    ds = datasets.load_from_disk(str(task_data_dir(task, cache=zqat_cache)), keep_in_memory=True)
    return datasets.DatasetDict({"validation": ds})


def load_piqa(**kwargs) -> datasets.DatasetDict:
    return _load("piqa", **kwargs)


def load_arc_easy(**kwargs) -> datasets.DatasetDict:
    return _load("arc_easy", **kwargs)


def load_arc_challenge(**kwargs) -> datasets.DatasetDict:
    return _load("arc_challenge", **kwargs)


def load_hellaswag(**kwargs) -> datasets.DatasetDict:
    return _load("hellaswag", **kwargs)


def load_winogrande(**kwargs) -> datasets.DatasetDict:
    return _load("winogrande", **kwargs)


def load_openbookqa(**kwargs) -> datasets.DatasetDict:
    return _load("openbookqa", **kwargs)


def load_boolq(**kwargs) -> datasets.DatasetDict:
    """google/boolq's columns (question, answer: bool, passage) and SuperGLUE's ``label`` (0 no, 1 yes)."""
    dd = _load("boolq", **kwargs)
    ds = dd["validation"]
    if "label" not in ds.column_names:
        ds = ds.add_column("label", [int(bool(a)) for a in ds["answer"]])
    dd["validation"] = ds
    return dd


# ------------------------------------------------------------------------------------------ HellaSwag


def hellaswag_clean(text: str) -> str:
    """HellaSwag text cleaning as in lm-eval: WikiHow's ``[title]`` marks become sentence breaks, other
    bracketed tags are dropped, double spaces are collapsed."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_doc(doc: dict) -> dict:
    context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {
        "query": hellaswag_clean(doc["activity_label"] + ": " + context),
        "choices": [hellaswag_clean(ending) for ending in doc["endings"]],
        "gold": int(doc["label"]),
    }


def _hellaswag_batch(batch: dict) -> dict:
    docs = [dict(zip(batch, row)) for row in zip(*batch.values())]
    out = [_hellaswag_doc(doc) for doc in docs]
    return {key: [o[key] for o in out] for key in ("query", "choices", "gold")}


def hellaswag_process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """lm-eval's HellaSwag documents: adds ``query`` (activity label and context, cleaned), ``choices``
    (the cleaned endings) and ``gold`` (the label as an int). Batched, as it runs on every evaluation."""
    return dataset.map(_hellaswag_batch, batched=True, batch_size=1000)


# ----------------------------------------------------------------------------------------- WinoGrande
# Partial evaluation: one context per option (the sentence up to the blank, option filled in), one shared
# continuation (the rest of the sentence); doc_to_text gives the index of the right context.


def winogrande_doc_to_text(doc: dict) -> int:
    return {"1": 0, "2": 1}[str(doc["answer"]).strip()]


def winogrande_doc_to_target(doc: dict) -> str:
    blank = doc["sentence"].index("_")
    return doc["sentence"][blank + 1:].strip()


def winogrande_doc_to_choice(doc: dict) -> list[str]:
    blank = doc["sentence"].index("_")
    prefix = doc["sentence"][:blank]
    return [prefix + doc["option1"], prefix + doc["option2"]]
