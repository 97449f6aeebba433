"""Distillation to the full-precision model (zqat_peft.distill)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zqat_peft.distill import TeacherWindows, distillation_loss, sampled_windows, teacher_top_k

from .conftest import tiny_model


def test_distillation_loss_over_the_whole_vocabulary_is_the_kl():
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=gen), torch.randn(2, 5, 11, generator=gen)
    log_p = teacher.log_softmax(-1)
    ids = torch.arange(11).expand(2, 5, 11)
    expected = F.kl_div(student.log_softmax(-1), log_p, log_target=True, reduction="none").sum(-1).mean()
    assert distillation_loss(student, ids, log_p) == pytest.approx(expected.item(), rel=1e-5)
    assert distillation_loss(teacher, ids, log_p).abs() < 1e-6  # the teacher itself: no loss


def test_distillation_loss_on_the_top_k_is_zero_only_at_the_teachers_distribution():
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(3, 4, 50, generator=gen)
    top, ids = teacher.log_softmax(-1).topk(5, dim=-1)
    assert distillation_loss(teacher, ids, top).abs() < 1e-5  # the teacher itself, tail mass included
    assert distillation_loss(torch.randn(3, 4, 50, generator=gen), ids, top) > 0.1


def test_distillation_loss_does_not_reward_moving_the_tail_onto_the_top_k():
    # the old loss (the top k renormalized, the rest ignored) scored this overconfident model below the teacher
    gen = torch.Generator().manual_seed(3)
    teacher = torch.randn(3, 4, 50, generator=gen)
    top, ids = teacher.log_softmax(-1).topk(5, dim=-1)
    overconfident = teacher.scatter_add(-1, ids, torch.ones_like(top))  # tail mass moved onto the top 5
    all_on_top = torch.full_like(teacher, -1e4).scatter(-1, ids, top)  # the top 5 in p's proportions, no tail
    assert distillation_loss(overconfident, ids, top) > distillation_loss(teacher, ids, top) + 0.05
    assert distillation_loss(all_on_top, ids, top) > 1.0


def test_teacher_top_k_is_the_models_most_likely_next_tokens():
    model = tiny_model()
    windows = torch.randint(0, 256, (5, 12), generator=torch.Generator().manual_seed(2))
    ids, logprobs = teacher_top_k(model, windows, k=4, batch_size=2)
    assert ids.shape == logprobs.shape == (5, 12, 4)
    assert ids.dtype == torch.int32 and logprobs.dtype == torch.float16  # small: kept for every training window
    with torch.no_grad():
        expected, expected_ids = model(input_ids=windows).logits.log_softmax(-1).topk(4, dim=-1)
    assert torch.equal(ids, expected_ids.to(torch.int32))
    torch.testing.assert_close(logprobs.float(), expected, atol=2e-3, rtol=1e-3)

    data = TeacherWindows(windows, ids, logprobs)
    assert len(data) == 5 and torch.equal(data[3]["teacher_ids"], ids[3]) and torch.equal(data[3]["labels"], windows[3])
    with pytest.raises(ValueError, match="do not match the windows"):
        TeacherWindows(windows[:4], ids, logprobs)
    with pytest.raises(ValueError, match="k must be at least 1"):
        teacher_top_k(model, windows, k=0)


def test_sampled_windows_are_drawn_from_the_models_next_token_distribution():
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # a peaked distribution: sampling, greedy and uniform draws differ clearly
    state = torch.random.get_rng_state()
    windows = sampled_windows(model, 400, 3, start_ids=[7, 9], seed=0, batch_size=100)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global random state is left alone
    assert windows.shape == (400, 3) and windows.dtype == torch.int64
    assert set(windows[:, 0].tolist()) == {7, 9}
    assert torch.equal(windows, sampled_windows(model, 400, 3, start_ids=[7, 9], seed=0, batch_size=100))
    assert not torch.equal(windows, sampled_windows(model, 400, 3, start_ids=[7, 9], seed=1, batch_size=100))
    with torch.no_grad():
        log_p = model(input_ids=windows[:, :1]).logits[:, -1].log_softmax(-1)
    drawn = log_p.gather(-1, windows[:, 1:2]).squeeze(-1)  # log p of each sampled second token
    entropy = -(log_p.exp() * log_p).sum(-1)
    # a draw from p has E[log p(x)] = -H(p); greedy draws would sit above, uniform ones far below
    mean, expected = drawn.mean().item(), -entropy.mean().item()
    assert mean == pytest.approx(expected, abs=3 * drawn.std().item() / 20)  # 3 standard errors of 400 draws
    assert log_p.max(-1).values.mean() - mean > 0.3 and mean - log_p.mean() > 1.0


def test_sampled_windows_never_draw_an_end_of_text_token_of_a_model_that_lists_several():
    model = tiny_model()
    model.config.eos_token_id = [2, 3]  # as Gemma 3 and Llama 3.1 configs list them
    windows = sampled_windows(model, 64, 8, start_ids=[7], seed=0)
    # a near-uniform tiny model would draw these two about 3.5 times in 448 draws if they were not suppressed
    assert windows.shape == (64, 8) and not torch.isin(windows[:, 1:], torch.tensor([2, 3])).any()


def test_sampled_windows_at_a_low_temperature_follow_the_most_likely_tokens():
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # margins between the top two tokens far above 1e-3 of a logit
    cold = sampled_windows(model, 32, 6, start_ids=[7, 9], seed=0, temperature=1e-3)
    with torch.no_grad():
        greedy = model.generate(input_ids=cold[:, :1], attention_mask=torch.ones_like(cold[:, :1]), do_sample=False,
                                max_new_tokens=5, min_new_tokens=5, pad_token_id=model.config.eos_token_id)
    assert torch.equal(cold, greedy)
    assert not torch.equal(cold, sampled_windows(model, 32, 6, start_ids=[7, 9], seed=0))  # temperature 1


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_sampled_windows_refuse_a_temperature_that_is_not_positive(temperature):
    with pytest.raises(ValueError, match="a temperature above 0"):
        sampled_windows(tiny_model(), 4, 6, start_ids=[7], seed=0, temperature=temperature)
