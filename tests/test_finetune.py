"""Fine-tuning on BoolQ (zqat_peft.finetune): the collator, the losses and the accuracy on a tiny model."""

from __future__ import annotations

import pytest
import torch

from zqat_peft import finetune

from .conftest import tiny_model


def _answer_examples(lengths: list[int], vocab: int = 256) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * (n - 1) + ids[-1:]})
    return examples


def test_answer_collator_loss_equals_the_full_logits_loss():
    model = tiny_model().eval()
    examples = _answer_examples([5, 12, 9])
    batch = finetune.AnswerCollator(pad_id=0)(examples)
    assert batch["logits_to_keep"] == 2 and batch["labels"].shape == (3, 2)
    with torch.no_grad():
        out = model(**batch)
        assert out.logits.shape[:2] == (3, 2)  # the passage's logits are never computed
        full = [model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]])).loss
                for e in examples]
    torch.testing.assert_close(out.loss, torch.stack(full).mean(), rtol=1e-5, atol=1e-5)


def test_choice_accuracy_scores_each_question_by_its_next_token():
    model = tiny_model().eval()
    examples = [{"input_ids": e["input_ids"], "choices": [7, 42], "label": i % 2}
                for i, e in enumerate(_answer_examples([4, 11, 6, 9, 3]))]
    with torch.no_grad():
        right = 0
        for e in examples:  # one at a time, no padding
            logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0, -1]
            right += int(logits[e["choices"]].argmax().item() == e["label"])
    assert finetune.choice_accuracy(model, examples, batch_size=2, pad_id=0) == right / len(examples)


def test_choice_loss_is_the_cross_entropy_over_the_answers():
    model = tiny_model().eval()
    examples = _answer_examples([5, 12, 9])
    for e, answer in zip(examples, [7, 42, 7]):  # the answers: token 7 or token 42
        e["input_ids"][-1] = e["labels"][-1] = answer
    batch = finetune.AnswerCollator(pad_id=0)(examples)
    labels = batch.pop("labels")
    with torch.no_grad():
        loss = finetune.ChoiceLoss([7, 42])(model(**batch), labels)
        expected = []
        for e in examples:
            logits = model(input_ids=torch.tensor([e["input_ids"][:-1]])).logits[0, -1, [7, 42]]
            expected.append(-logits.log_softmax(-1)[int(e["labels"][-1] == 42)])
    torch.testing.assert_close(loss, torch.stack(expected).mean(), rtol=1e-5, atol=1e-5)
    test = [{"input_ids": [1], "choices": [7, 42], "label": 0}]
    assert finetune.answer_tokens(test, examples) == [7, 42]
    with pytest.raises(ValueError, match="single tokens"):
        finetune.answer_tokens([{**test[0], "choices": [7, 8]}], examples)  # 42 is not an answer


class _CharTokenizer:
    """One token per character: " yes" is four tokens."""

    def __call__(self, text: str):
        return type("Encoding", (), {"input_ids": [ord(c) for c in text]})()


def test_choice_example_refuses_answers_of_several_tokens():
    row = {"passage": "Water is wet.", "question": "is water wet", "answer": True}
    with pytest.raises(ValueError, match="one token after the prompt"):
        finetune.choice_example(_CharTokenizer(), row, max_length=64)
