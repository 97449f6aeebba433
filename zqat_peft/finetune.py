"""Fine-tuning on a two-answer task: BoolQ under MeZO's protocol.

The pieces the main job composes for ``task: boolq``:

- ``boolq_splits``: 1000 train / 500 validation / 1000 test questions drawn from BoolQ's validation split.
- ``answer_example``: prompt + answer tokens, the loss on the answer only (training, held-out loss).
- ``AnswerCollator``: left-pads a batch so every answer ends its row, and asks the model for the last
  positions' logits only (``logits_to_keep``).
- ``ChoiceLoss``: MeZO's classification loss (cross-entropy over the answers' logits), for the Trainer's
  ``compute_loss_func``.
- ``choice_example`` / ``choice_accuracy``: the test questions, each scored by one forward of its prompt.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .data import task_data_dir

BOOLQ_PROMPT = "{passage}\nQuestion: {question}?\nAnswer:"
ANSWERS = (" no", " yes")  # index = the label (BoolQ's `answer` as an int)


def boolq_splits(n_train: int, n_val: int, n_test: int, seed: int) -> dict[str, list[dict]]:
    """MeZO's protocol: disjoint train / validation / test questions drawn from BoolQ's validation split
    in an order fixed by ``seed``."""
    import datasets

    ds = datasets.load_from_disk(str(task_data_dir("boolq")))
    if n_train + n_val + n_test > len(ds):
        raise ValueError(f"finetune asks for {n_train + n_val + n_test} BoolQ questions; the split has {len(ds)}")
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
    rows = [ds[i] for i in order[:n_train + n_val + n_test]]
    return {"train": rows[:n_train], "validation": rows[n_train:n_train + n_val], "test": rows[n_train + n_val:]}


def answer_example(tokenizer, row: dict, max_length: int, answer: Optional[str] = None) -> dict[str, list[int]]:
    """Prompt + answer tokens (the passage cut from the left to fit ``max_length``); labels only on the answer."""
    answer = ANSWERS[int(row["answer"])] if answer is None else answer
    prompt = BOOLQ_PROMPT.format(passage=row["passage"], question=row["question"])
    n_prompt = len(tokenizer(prompt).input_ids)
    ids = tokenizer(prompt + answer).input_ids
    n_answer = max(1, len(ids) - n_prompt)
    ids = ids[-max_length:]
    return {"input_ids": ids, "labels": [-100] * (len(ids) - n_answer) + ids[-n_answer:]}


def choice_example(tokenizer, row: dict, max_length: int) -> dict[str, Any]:
    """The prompt and the token of each answer, for scoring all answers with one forward of the prompt.

    Raises if an answer is not exactly one token after the prompt (one forward would then not score it).
    """
    examples = [answer_example(tokenizer, row, max_length, a) for a in ANSWERS]
    prompts = [e["input_ids"][:-1] for e in examples]
    if any(sum(t != -100 for t in e["labels"]) != 1 for e in examples) or any(p != prompts[0] for p in prompts):
        raise ValueError(
            f"BoolQ scoring needs each answer {list(ANSWERS)} to be one token after the prompt; this tokenizer "
            "splits or merges them. Use a tokenizer whose answers are single tokens (LLaMA, OPT and SmolLM2 do)."
        )
    return {"input_ids": prompts[0], "choices": [e["input_ids"][-1] for e in examples], "label": int(row["answer"])}


def left_pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    n = max(len(s) for s in seqs)
    return torch.tensor([[value] * (n - len(s)) + list(s) for s in seqs])


def left_padded_inputs(ids: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` with every sequence ending at the last position."""
    return {"input_ids": left_pad(ids, pad_id), "attention_mask": left_pad([[1] * len(s) for s in ids], 0)}


class AnswerCollator:
    """Left-pads prompt + answer examples so every answer ends its row, and asks the model for the logits
    of the last positions only (``logits_to_keep``, labels cut to match): the loss reads the answer tokens
    alone, so the vocabulary-wide logits of the passage are never computed."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        keep = 1 + max(sum(t != -100 for t in e["labels"]) for e in examples)
        ids = [e["input_ids"] for e in examples]
        return {
            **left_padded_inputs(ids, self.pad_id),
            "labels": left_pad([e["labels"] for e in examples], -100)[:, -keep:],
            "logits_to_keep": keep,
        }


def answer_tokens(test: list[dict], trained: list[dict]) -> list[int]:
    """The answers' token ids, checked to be the same for every test question and to be the one labelled
    token of every training example (what ``ChoiceLoss`` assumes, checked here once, not in every pass)."""
    choices = test[0]["choices"]
    if any(e["choices"] != choices for e in test) or any(
        e["labels"][-1] not in choices or e["labels"][-2] != -100 for e in trained
    ):
        raise ValueError("the answers do not tokenize to the same single tokens in every question; "
                          "use finetune.loss=lm")
    return choices


class ChoiceLoss:
    """Cross-entropy over the answers' logits only, for the Trainer's ``compute_loss_func``; reads the logits
    that predict the last token of each row (``AnswerCollator`` puts the one-token answer there)."""

    def __init__(self, choices: list[int]):
        self.choices = torch.tensor(choices)

    def __call__(self, outputs, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        # every last label is one of the choices (answer_tokens checked the data): no check, no host sync here
        if self.choices.device != labels.device:  # once: not a host-to-device copy in every ZO pass
            self.choices = self.choices.to(labels.device)
        logits = outputs.logits[:, -2, self.choices].float()
        return torch.nn.functional.cross_entropy(logits, (labels[:, -1:] == self.choices).int().argmax(dim=1))


@torch.no_grad()
def choice_accuracy(model, examples: list[dict], batch_size: int, pad_id: int) -> float:
    """Share of questions whose right answer has the highest next-token log-probability after the prompt."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))  # little padding
    correct = 0
    for start in range(0, len(order), batch_size):
        batch = [examples[i] for i in order[start:start + batch_size]]
        ids = [e["input_ids"] for e in batch]
        inputs = {k: v.to(device) for k, v in left_padded_inputs(ids, pad_id).items()}
        logits = model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1]
        scores = logits.gather(1, torch.tensor([e["choices"] for e in batch], device=device))
        labels = torch.tensor([e["label"] for e in batch], device=device)
        correct += (scores.argmax(dim=1) == labels).sum().item()
    model.train(was_training)
    return correct / len(examples)
