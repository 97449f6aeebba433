"""The relative (scale-free) ZO step and the divergence guard."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from zqat_peft import ZOTrainer, ZOTrainingArguments, cli, replay_trajectory
from zqat_peft.recipe import RecipeError, load_recipe
from zqat_peft.zo import DivergenceGuard, ZOOptimizer, normalized_gradients, spsa_losses, zo_parameters

from .test_zo import RepeatedBatch, batch_loss, one_direction_llama, trained_state, zo_args, zqat_llama


class ScaledMLP(nn.Module):
    """tanh(x (W1 / k)^T) (W2 / k)^T: storing k times the weights of the k=1 model gives the same function, so
    a scale-free step on it must move its weights k times as far."""

    def __init__(self, k: float, loss_scale: float = 1.0):
        super().__init__()
        torch.manual_seed(0)
        self.k, self.loss_scale = k, loss_scale
        self.w1 = nn.Parameter(torch.randn(16, 8, dtype=torch.float64) * k)
        self.w2 = nn.Parameter(torch.randn(1, 16, dtype=torch.float64) * k)
        self.x = torch.randn(32, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def forward(self) -> torch.Tensor:
        h = torch.tanh(self.x @ (self.w1 / self.k).T)
        return self.loss_scale * ((h @ (self.w2 / self.k).T - 1.0) ** 2).mean()


def updates(model: ScaledMLP, step: str, steps: int = 5) -> dict[str, torch.Tensor]:
    """What `steps` ZO steps change in the weights."""
    params = zo_parameters(model)
    before = {p.name: p.param.detach().clone() for p in params}
    optimizer = ZOOptimizer(params, lr=1e-2, eps=1e-3, step=step)
    for _ in range(steps):
        (seed,) = optimizer.seeds
        pos, neg = spsa_losses(params, model, seed, optimizer.eps)
        optimizer.accumulate((pos.double() - neg.double()).reshape(1))
        optimizer.step()
    return {p.name: p.param.detach() - before[p.name] for p in params}


def test_the_relative_step_scales_with_the_weights_and_ignores_the_loss_scale():
    base = updates(ScaledMLP(k=1.0), "relative")
    tenfold_weights = updates(ScaledMLP(k=10.0), "relative")
    tenfold_loss = updates(ScaledMLP(k=1.0, loss_scale=10.0), "relative")
    for name, delta in base.items():
        assert delta.abs().max() > 0
        # equal up to the float32 rounding of the noise's scale (the control below is off by 100x)
        tol = dict(rtol=1e-4, atol=1e-4 * float(delta.abs().max()))
        torch.testing.assert_close(tenfold_weights[name], 10 * delta, **tol)
        torch.testing.assert_close(tenfold_loss[name], delta, **tol)


def test_the_absolute_step_is_not_scale_free():
    """The control for the test above: plain SPSA moves 10x-larger weights 10x less, and a 10x loss 10x more."""
    base = updates(ScaledMLP(k=1.0), "absolute")
    tenfold_weights = updates(ScaledMLP(k=10.0), "absolute", steps=1)
    tenfold_loss = updates(ScaledMLP(k=1.0, loss_scale=10.0), "absolute", steps=1)
    first = updates(ScaledMLP(k=1.0), "absolute", steps=1)
    for name in base:
        tol = dict(rtol=1e-4, atol=1e-4 * float(first[name].abs().max()))
        torch.testing.assert_close(tenfold_weights[name], first[name] / 10, **tol)
        torch.testing.assert_close(tenfold_loss[name], first[name] * 10, **tol)


def test_normalized_gradients_are_unit_free_and_clipped():
    coefs, moment = normalized_gradients([4.0], 0.0, 0, beta=0.99, clip=3.0)
    assert coefs == [pytest.approx(1.0)] and moment == pytest.approx(0.01 * 16)  # bias-corrected: its own RMS
    assert normalized_gradients([-40.0], 0.0, 0, beta=0.99, clip=3.0)[0] == [pytest.approx(-1.0)]  # no loss unit
    # after many steps of g ~ 4 (second moment 16), a 100x outlier moves the weights 3 running RMS, not 100
    coefs, _ = normalized_gradients([400.0], 16.0, 1000, beta=0.9, clip=3.0)
    assert coefs == [3.0]
    assert normalized_gradients([0.0], 0.0, 0, beta=0.99, clip=3.0)[0] == [0.0]


def test_relative_resume_and_replay_are_bit_exact(tmp_path):
    data = RepeatedBatch()
    full = zqat_llama("full")
    ZOTrainer(model=full, args=zo_args(tmp_path / "a", max_steps=6, zo_step="relative"), train_dataset=data).train()

    part = zqat_llama("full")
    args = zo_args(tmp_path / "b", max_steps=6, save_strategy="steps", save_steps=3, zo_step="relative")
    ZOTrainer(model=part, args=args, train_dataset=data).train()
    resumed = zqat_llama("full")
    trainer = ZOTrainer(model=resumed, args=args, train_dataset=data)
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    expected, got = trained_state(full), trained_state(resumed)
    assert any(not torch.equal(expected[n], trained_state(zqat_llama("full"))[n]) for n in expected)
    assert all(torch.equal(expected[n], got[n]) for n in expected)
    # the resumed run's scales are the recorded ones (measured on the start), not the checkpoint's weights' RMS
    recorded = trainer.zo_optimizer.trajectory.ref_scales
    assert [p.scale for p in trainer.zo_optimizer.zo_params] == recorded
    start_rms = [float(p.detach().double().pow(2).mean().sqrt()) for n, p in zqat_llama("full").named_parameters()
                 if p.requires_grad]
    assert recorded == start_rms

    replayed = replay_trajectory(zqat_llama("full"), tmp_path / "b" / "checkpoint-6")
    again = trained_state(replayed)
    assert all(torch.equal(expected[n], again[n]) for n in expected)


def test_the_normalization_state_is_saved_and_loaded():
    model = zqat_llama("full")
    params = zo_parameters(model)
    optimizer = ZOOptimizer(params, lr=1e-3, step="relative")
    batch = RepeatedBatch().batch
    for _ in range(3):
        (seed,) = optimizer.seeds
        pos, neg = spsa_losses(params, lambda: model(**batch).loss, seed, optimizer.eps)
        optimizer.accumulate((pos.double() - neg.double()).reshape(1))
        optimizer.step()
    state = optimizer.state_dict()
    fresh = ZOOptimizer(zo_parameters(zqat_llama("full")), lr=1e-3, step="relative")
    fresh.load_state_dict(state)
    assert optimizer.norm_moment > 0 and optimizer.norm_count == 3
    assert (fresh.norm_moment, fresh.norm_count) == (optimizer.norm_moment, optimizer.norm_count)
    assert fresh.grad_rms == optimizer.grad_rms
    absolute = ZOOptimizer(zo_parameters(zqat_llama("full")), lr=1e-3, step="absolute")
    with pytest.raises(ValueError, match="zo_step 'relative'"):
        absolute.load_state_dict(state)


# ----- the divergence guard -------------------------------------------------------------------------


def held_out_args(tmp_path, **kw):
    return zo_args(tmp_path, max_steps=60, learning_rate=1e-2, zo_step="relative", eval_strategy="steps",
                   eval_steps=5, save_strategy="steps", save_steps=5, save_total_limit=1, load_best_model_at_end=True,
                   metric_for_best_model="eval_loss", greater_is_better=False, per_device_eval_batch_size=4, **kw)


def rising_loss(model) -> None:
    """Make every forward's loss grow with the number of forwards so far, as a diverging run's does. (The tiny
    models start at a loss near log(vocab) and their quantized weights saturate, so even a 1000x lr does not
    make them diverge: measured 4.10 -> 4.24 in 30 steps.)"""
    orig, calls = model.forward, [0]

    def forward(*a, **kw):
        calls[0] += 1
        out = orig(*a, **kw)
        out.loss = out.loss * (1.0 + 0.05 * calls[0])
        return out

    model.forward = forward


def test_a_diverging_run_ends_with_the_start_and_a_warning(tmp_path):
    model, data = one_direction_llama()
    start_weights = trained_state(model)
    rising_loss(model)
    held_out = RepeatedBatch(n=4, seq=16, length=4)
    held_out.batch = data.batch
    trainer = ZOTrainer(model=model, args=held_out_args(tmp_path), train_dataset=data, eval_dataset=held_out)
    trainer.evaluate()  # the start, step 0
    with pytest.warns(UserWarning, match="diverged"):
        trainer.train()
    guard = trainer.divergence_guard
    assert guard.stopped is not None and "held-out" in guard.stopped and guard.restored == "start"
    assert trainer.state.global_step < 60
    assert all(torch.equal(start_weights[n], p) for n, p in trained_state(model).items())


def test_without_held_out_data_the_guard_watches_the_training_loss(tmp_path):
    model, data = one_direction_llama()
    start_weights = trained_state(model)
    rising_loss(model)
    trainer = ZOTrainer(model=model, args=zo_args(tmp_path, max_steps=60, learning_rate=1e-2, zo_step="relative"),
                        train_dataset=data)
    with pytest.warns(UserWarning, match="diverged"):
        trainer.train()
    guard = trainer.divergence_guard
    assert guard.stopped is not None and "training loss" in guard.stopped and guard.restored == "start"
    assert trainer.state.global_step < 60
    assert all(torch.equal(start_weights[n], p) for n, p in trained_state(model).items())


def test_a_healthy_run_is_not_stopped(tmp_path):
    model, data = one_direction_llama()
    start = batch_loss(model, data.batch)
    trainer = ZOTrainer(model=model, args=zo_args(tmp_path, max_steps=40, learning_rate=1e-2, zo_step="relative"),
                        train_dataset=data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        trainer.train()
    assert trainer.divergence_guard.stopped is None and trainer.state.global_step == 40
    assert batch_loss(model, data.batch) < start


def test_the_guard_can_be_switched_off_and_checks_its_margins(tmp_path):
    trainer = ZOTrainer(model=zqat_llama(), args=zo_args(tmp_path, zo_divergence_guard=False),
                        train_dataset=RepeatedBatch())
    assert trainer.divergence_guard is None
    with pytest.raises(ValueError, match="margins must be positive"):
        DivergenceGuard(eval_margin=0.0)


# ----- the rounding mask ----------------------------------------------------------------------------


def masked_steps(mask: str, steps: int = 3, eps: float = 5e-3):
    """A W3 tiny LLaMA after `steps` relative ZO steps with the given mask: (its SPSA losses, its start, the
    trained weights, the optimizer)."""
    from peft import get_peft_model

    from zqat_peft import ZeroQATConfig
    from .conftest import tiny_model

    model = get_peft_model(tiny_model("llama"), ZeroQATConfig(w_bits=3, group_size=32, trainable="full"))
    params = zo_parameters(model)
    start = trained_state(model)
    optimizer = ZOOptimizer(params, lr=1e-2, eps=eps, step="relative", mask=mask)
    batch = RepeatedBatch().batch
    losses = []
    for _ in range(steps):
        (seed,) = optimizer.seeds
        pos, neg = spsa_losses(params, lambda: model(**batch).loss, seed, optimizer.eps)
        losses.append((pos.item(), neg.item()))
        optimizer.accumulate((pos.double() - neg.double()).reshape(1))
        optimizer.step()
    return losses, start, trained_state(model), optimizer


def test_the_rounding_mask_leaves_the_loss_difference_exact_and_moves_only_the_weights_it_can_change():
    """The masked-out elements are those no perturbation of the step can move across a rounding boundary (or to
    their group's range), so the SPSA losses are the unmasked run's bit for bit; only the update differs: the
    unmasked run moves every element, the masked one leaves most of them where they were."""
    plain_losses, start, plain, _ = masked_steps("none", steps=1)
    masked_losses, _, masked, optimizer = masked_steps("rounding", steps=1)
    assert masked_losses == plain_losses
    assert 0.05 < optimizer.last_masked_fraction < 0.5  # the test below shows the feature is on
    moved_plain = sum(int((plain[n] != start[n]).sum()) for n in start)
    moved_masked = sum(int((masked[n] != start[n]).sum()) for n in start)
    total = sum(t.numel() for t in start.values())
    assert moved_plain > 0.999 * total  # (an update below half an ulp leaves a few where they were)
    assert moved_masked == pytest.approx(optimizer.last_masked_fraction * total, rel=1e-3)
    for name in start:  # where the masked run moved an element, it moved it as the unmasked run did
        moved = masked[name] != start[name]
        assert torch.equal(masked[name][moved], plain[name][moved])


def test_rounding_margin_bounds_the_moves_that_leave_the_quantized_weight_unchanged():
    from zqat_peft.quant import fake_quantize_weight, rounding_margin, weight_qparams
    from zqat_peft.zo.estimator import rounding_reach

    torch.manual_seed(0)
    w = torch.randn(16, 128) * 0.05
    for bits in (2, 3, 4):
        margin = rounding_margin(w, *weight_qparams(w, bits, 64, symmetric=False), bits)
        quantized = fake_quantize_weight(w, bits, 64, False)
        # every element moved at once by up to a third of the reach of a perturbation: unchanged
        d = 1e-3
        small = margin >= rounding_reach(d, 1.0)
        u = (torch.rand_like(w) * 2 - 1) * d * 3.4
        assert torch.equal(fake_quantize_weight(w + u * small, bits, 64, False), quantized)
        # an element moved just past its margin, towards its boundary or its group's range, changes it
        inside = (margin > 1e-4) & (margin < 1e-2)
        rows, cols = inside.nonzero()[:20].unbind(1)
        for r, c in zip(rows.tolist(), cols.tolist()):
            changed = [not torch.equal(fake_quantize_weight(w.index_put((torch.tensor([r]), torch.tensor([c])),
                                                                        w[r, c] + sign * margin[r, c] * 1.01),
                                                            bits, 64, False), quantized) for sign in (1, -1)]
            assert any(changed)


def test_masked_resume_and_replay_are_bit_exact_and_a_different_mask_is_refused(tmp_path):
    data = RepeatedBatch()
    kw = dict(zo_step="relative", zo_mask="rounding", zo_eps=5e-3)
    full = zqat_llama("full")
    ZOTrainer(model=full, args=zo_args(tmp_path / "a", max_steps=6, **kw), train_dataset=data).train()
    args = zo_args(tmp_path / "b", max_steps=6, save_strategy="steps", save_steps=3, **kw)
    ZOTrainer(model=zqat_llama("full"), args=args, train_dataset=data).train()
    resumed = zqat_llama("full")
    ZOTrainer(model=resumed, args=args, train_dataset=data).train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    expected = trained_state(full)
    unmasked = zqat_llama("full")
    ZOTrainer(model=unmasked, args=zo_args(tmp_path / "c", max_steps=6, zo_step="relative", zo_eps=5e-3),
              train_dataset=data).train()
    assert any(not torch.equal(expected[n], trained_state(unmasked)[n]) for n in expected)  # the mask acted
    assert all(torch.equal(expected[n], trained_state(resumed)[n]) for n in expected)
    replayed = trained_state(replay_trajectory(zqat_llama("full"), tmp_path / "b" / "checkpoint-6"))
    assert all(torch.equal(expected[n], replayed[n]) for n in expected)
    other = zo_args(tmp_path / "b", max_steps=6, save_strategy="steps", save_steps=3, zo_step="relative", zo_eps=5e-3)
    with pytest.raises(ValueError, match="zo_mask 'rounding'"):
        ZOTrainer(model=zqat_llama("full"), args=other, train_dataset=data).train(
            resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    with pytest.raises(ValueError, match="zo_mask must be one of"):
        zo_args(tmp_path / "d", zo_mask="sparse")
    with pytest.raises(ValueError, match="no trained parameter is one"):  # it would silently mask nothing
        ZOOptimizer(zo_parameters(zqat_llama("scales")), lr=1e-3, mask="rounding")


def test_left_unset_lr_and_eps_are_the_relative_step_that_carried_over_between_models(tmp_path):
    """The defaults of the Python API and of a recipe are the demo's relative lr and eps (measured to improve three
    model families unchanged); before, an unset lr was TrainingArguments' Adam step 5e-5 (a recipe's, the old
    absolute 1e-5): 20-100 times smaller as a fraction of each tensor's RMS."""
    demo = load_recipe(Path(__file__).parents[1] / "recipes" / "demo.yaml")["train"]
    assert demo["step"] == "relative"
    args = ZOTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    assert (args.zo_step, args.learning_rate, args.zo_eps) == ("relative", demo["lr"], demo["eps"])
    train = load_recipe(None)["train"]
    assert (train["step"], train["lr"], train["eps"]) == ("relative", demo["lr"], demo["eps"])
    optimizer = ZOOptimizer(zo_parameters(zqat_llama("scales")))
    assert (optimizer.param_groups[0]["lr"], optimizer.eps) == (demo["lr"], demo["eps"])


def test_the_absolute_step_without_an_lr_is_refused(tmp_path, capsys):
    """Plain SPSA's lr depends on the model's scales: none is assumed (the relative step's 1e-3 would be ~1000x
    MeZO's), in the Python API, the optimizer and a recipe, before anything loads."""
    with pytest.raises(ValueError, match="absolute ZO step .* has no default learning rate"):
        ZOTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, zo_step="absolute")
    with pytest.raises(ValueError, match="no default learning rate"):
        ZOOptimizer(zo_parameters(zqat_llama("scales")), step="absolute")
    with pytest.raises(RecipeError, match="train.step: absolute needs train.lr"):
        load_recipe(None, ["train.step=absolute"])
    assert load_recipe(None, ["train.step=absolute", "train.lr=1e-6"])["train"]["eps"] == 1e-3  # MeZO's eps
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  step: absolute\n")
    assert cli.main(["train", "--recipe", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.step: absolute needs train.lr" in err[0], err
