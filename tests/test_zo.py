"""The zeroth-order engine and ZOTrainer."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import TrainerCallback

from zqat_peft import ZeroQATConfig, ZOTrainer, ZOTrainingArguments, replay_trajectory
from zqat_peft.zo import (ZODivergenceError, Trajectory, one_sided_losses, perturbed, projected_gradient, spsa_losses,
                          zo_parameters)
from zqat_peft.zo.optimizer import RELATIVE_EPS, RELATIVE_LR
from zqat_peft.noise import zo_noise

from .conftest import tiny_batch, tiny_model


class RepeatedBatch(torch.utils.data.Dataset):
    """The same few sequences, over and over."""

    def __init__(self, n: int = 4, seq: int = 16, length: int = 10_000, seed: int = 1):
        self.batch = tiny_batch(n, seq, seed=seed)
        self.n, self.length = n, length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        return {k: v[i % self.n] for k, v in self.batch.items()}


def zqat_llama(mode: str = "full", **kw):
    config = ZeroQATConfig(w_bits=4, group_size=32, trainable=mode, **kw)
    return get_peft_model(tiny_model("llama"), config)


def zo_args(tmp_path, **kw) -> ZOTrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=10, learning_rate=1e-3,
        lr_scheduler_type="constant", logging_steps=5, save_strategy="no", report_to=[], seed=0,
        disable_tqdm=True, use_cpu=True, dataloader_num_workers=0,
        zo_step="absolute",  # these tests check plain SPSA; the relative step has tests/test_zo_step.py
    )
    defaults.update(kw)
    return ZOTrainingArguments(**defaults)


def trained_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def batch_loss(model, batch) -> float:
    with torch.no_grad():
        return model(**batch).loss.item()


# ----- the perturbation --------------------------------------------------------------------------


def test_perturbation_is_applied_inside_the_forward_and_leaves_no_drift():
    model = zqat_llama()
    params = zo_parameters(model)
    before = trained_state(model)
    batch = tiny_batch()
    clean = model(**batch).loss
    loss_pos, loss_neg = spsa_losses(params, lambda: model(**batch).loss, seed=7, eps=1e-2)
    assert loss_pos != clean and loss_neg != clean
    after = trained_state(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_perturbed_forward_equals_forward_of_explicitly_perturbed_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(5, 8)
    params = zo_parameters(model)
    with perturbed(params, seed=3, scale=0.1):
        got = model(x)
    for p in params:
        p.param.data += 0.1 * zo_noise(3, p.key, p.param.shape)
    assert torch.allclose(got, model(x), atol=1e-6)


@pytest.mark.parametrize("a_bits", [16, 8])
def test_zqat_layers_apply_the_perturbation_in_their_forward_bit_for_bit(a_bits):
    """ZQATLinear takes the noise into its own fake quantization (no perturbed copy): the perturbed loss
    equals, bit for bit, the loss of a copy whose weights were explicitly perturbed, and the layers hold
    no noise after the block, even when the forward raised."""
    import copy

    from zqat_peft.noise import add_scaled_noise_
    from zqat_peft.tuner.layer import ZQATLayer

    model = zqat_llama(a_bits=a_bits)
    layers = [m for m in model.modules() if isinstance(m, ZQATLayer)]
    batch = tiny_batch()
    params = zo_parameters(model)
    with perturbed(params, seed=11, scale=3e-2):
        got = model(**batch).loss
    explicit = copy.deepcopy(model)
    for p in zo_parameters(explicit):
        add_scaled_noise_(p.param.data, 11, p.key, 3e-2)
    with torch.no_grad():
        assert torch.equal(got, explicit(**batch).loss)
    assert not any(layer.zqat_weight_noise for layer in layers)
    def fail(module, args, output):
        assert module.zqat_weight_noise  # the noise is set while the layer runs
        raise KeyboardInterrupt

    handle = layers[0].register_forward_hook(fail)
    with pytest.raises(KeyboardInterrupt):
        with perturbed(params, seed=11, scale=3e-2):
            model(**batch)
    handle.remove()
    assert not any(layer.zqat_weight_noise for layer in layers)
    with torch.no_grad():
        assert torch.equal(model(**batch).loss, zqat_llama(a_bits=a_bits)(**batch).loss)


def test_zqat_layer_takes_noise_for_its_master_weight_only():
    from zqat_peft.noise import WeightNoise
    from zqat_peft.tuner.layer import ZQATLayer

    layer = next(m for m in zqat_llama().modules() if isinstance(m, ZQATLayer))
    noise = WeightNoise(1, 2, 1e-3)
    assert not layer.set_weight_noise(layer.zqat_clip_lower, "default", noise)
    assert not layer.set_weight_noise(layer.zqat_weight, "other", noise)
    assert layer.set_weight_noise(layer.zqat_weight, "default", noise)
    assert layer.zqat_weight_noise == {"default": noise}
    with pytest.raises(ValueError, match="finite"):
        WeightNoise(1, 2, float("nan"))


def test_parameter_read_outside_its_forward_is_an_error():
    class ReadsChildWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 4)

        def forward(self, x):
            return x @ self.inner.weight.t()

    model = ReadsChildWeight()
    with pytest.raises(RuntimeError, match="inner.weight"):
        with perturbed(zo_parameters(model), seed=0, scale=0.1):
            model(torch.randn(2, 4))


def test_nothing_trainable_is_an_error():
    model = nn.Linear(4, 4).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        zo_parameters(model)


# ----- the estimator ------------------------------------------------------------------------------


def test_estimator_mean_points_along_the_true_gradient():
    """On a quadratic, the mean of g * z over many seeds matches the true gradient's direction."""
    torch.manual_seed(0)
    dim = 16
    a = torch.randn(dim, dim) / math.sqrt(dim)
    b = torch.randn(dim)
    model = nn.Linear(dim, 1, bias=False)
    params = zo_parameters(model)
    w = params[0].param
    true_grad = a.t() @ (a @ w.detach().reshape(-1) - b)
    estimate = torch.zeros(dim)
    eps = 1e-3
    n = 3000
    for seed in range(n):
        with perturbed(params, seed, eps):
            lp = _quadratic_through_module(model, a, b)
        with perturbed(params, seed, -eps):
            ln = _quadratic_through_module(model, a, b)
        g = (lp - ln) / (2 * eps)
        estimate += g * zo_noise(seed, params[0].key, (dim,))
    estimate /= n
    cosine = torch.nn.functional.cosine_similarity(estimate, true_grad, dim=0)
    assert cosine > 0.9, cosine


def test_one_sided_estimate_points_along_the_true_gradient():
    """The one-sided difference against one shared unperturbed loss, over eps (not 2 eps), is unbiased too."""
    torch.manual_seed(0)
    dim = 16
    a, b = torch.randn(dim, dim) / math.sqrt(dim), torch.randn(dim)
    model = nn.Linear(dim, 1, bias=False)
    params = zo_parameters(model)
    true_grad = a.t() @ (a @ params[0].param.detach().reshape(-1) - b)
    eps, seeds = 1e-3, range(3000)
    base, probes = one_sided_losses(params, lambda: _quadratic_through_module(model, a, b), seeds, eps)
    estimate = sum(projected_gradient(float(probe - base), eps, estimator="one_sided")
                   * zo_noise(seed, params[0].key, (dim,)) for seed, probe in zip(seeds, probes)) / len(seeds)
    assert torch.nn.functional.cosine_similarity(estimate, true_grad, dim=0) > 0.9
    assert 0.8 < estimate.norm() / true_grad.norm() < 1.25  # the right length: divided by eps, not 2 eps


def _quadratic_through_module(model: nn.Linear, a, b):
    # the module's forward computes a @ w (as a linear layer applied to a's rows)
    return 0.5 * ((model(a).reshape(-1) - b) ** 2).sum()


# ----- ZOTrainer ----------------------------------------------------------------------------------


def one_direction_llama(dtype: torch.dtype = torch.float32):
    """A 10K-weight LLaMA (master weights in `dtype`) and a batch with one dominant direction: ZO progress
    per step shrinks with the number of trained weights and grows with a low-rank loss landscape."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    base = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    # peft upcasts adapter weights to float32 unless told not to
    model = get_peft_model(base, ZeroQATConfig(w_bits=4, group_size=32, trainable="full"), autocast_adapter_dtype=False)
    data = RepeatedBatch(n=4, seq=16)
    data.batch = {"input_ids": torch.full((4, 16), 7), "attention_mask": torch.ones(4, 16, dtype=torch.long),
                  "labels": torch.full((4, 16), 7)}
    return model, data


def test_training_lowers_the_loss_of_a_repeated_batch(tmp_path):
    model, data = one_direction_llama()
    start = batch_loss(model, data.batch)
    trainer = ZOTrainer(model=model, args=zo_args(tmp_path, max_steps=100, learning_rate=1e-3), train_dataset=data)
    trainer.train()
    end = batch_loss(model, data.batch)
    assert end < start - 0.2, (start, end)
    assert all(p.grad is None for p in model.parameters())


def test_no_autograd_graph_is_built(tmp_path):
    model = zqat_llama("full")
    grad_enabled, losses = [], []
    orig = model.forward

    def forward(*a, **kw):
        grad_enabled.append(torch.is_grad_enabled())
        out = orig(*a, **kw)
        losses.append(out.loss)
        return out

    model.forward = forward
    trainer = ZOTrainer(model=model, args=zo_args(tmp_path, max_steps=3), train_dataset=RepeatedBatch())
    trainer.train()
    assert grad_enabled == [False] * 6  # two forwards per step, each without autograd
    assert all(l.grad_fn is None and not l.requires_grad for l in losses)
    assert all(p.grad is None for p in model.parameters())


def test_resume_and_replay_are_bit_exact(tmp_path):
    data = RepeatedBatch()
    full = zqat_llama("lightweight")
    ZOTrainer(model=full, args=zo_args(tmp_path / "a", max_steps=6), train_dataset=data).train()

    part = zqat_llama("lightweight")
    args = zo_args(tmp_path / "b", max_steps=6, save_strategy="steps", save_steps=3)
    ZOTrainer(model=part, args=args, train_dataset=data).train()
    resumed = zqat_llama("lightweight")
    ZOTrainer(model=resumed, args=args, train_dataset=data).train(
        resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3")
    )
    expected = trained_state(full)
    got = trained_state(resumed)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[n], got[n]) for n in expected)

    replayed = replay_trajectory(zqat_llama("lightweight"), tmp_path / "b" / "checkpoint-6")
    again = trained_state(replayed)
    assert all(torch.equal(expected[n], again[n]) for n in expected)
    assert (tmp_path / "b" / "checkpoint-6" / "zo_trajectory.safetensors").stat().st_size < 20_000


def test_one_sided_steps_share_one_unperturbed_forward(tmp_path):
    """q probes cost q + 1 forwards, and each recorded gradient is (L(p + eps z) - L(p)) / eps on the batch."""
    model = zqat_llama("scales")
    start = zqat_llama("scales")
    calls = []
    orig = model.forward
    model.forward = lambda *a, **kw: calls.append(1) or orig(*a, **kw)
    args = zo_args(tmp_path, max_steps=2, zo_num_queries=3, zo_estimator="one_sided")
    trainer = ZOTrainer(model=model, args=args, train_dataset=RepeatedBatch())
    trainer.train()
    assert len(calls) == 2 * (3 + 1)  # the two-point estimator would take 2 * 6
    zo = trainer.zo_optimizer
    params, batch = zo_parameters(start), RepeatedBatch().batch
    base = batch_loss(start, batch)
    for seed, recorded in zip(zo.trajectory.seeds[0], zo.trajectory.grads[0]):
        with perturbed(params, seed, zo.eps):
            probe = batch_loss(start, batch)
        assert recorded == pytest.approx((probe - base) / zo.eps, rel=1e-3, abs=1e-3)


def test_an_unknown_estimator_is_refused(tmp_path):
    with pytest.raises(ValueError, match="zo_estimator must be one of"):
        zo_args(tmp_path, zo_estimator="three_point")


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    """Micro-batches of a window share the step's seeds and average their loss differences, so the
    projected gradient is the one of the whole batch (up to float rounding of the loss). Only the
    first step is compared: afterwards rounding-level weight differences flip quantization roundings."""
    data = RepeatedBatch()
    big = ZOTrainer(model=zqat_llama("lightweight"), train_dataset=data,
                    args=zo_args(tmp_path / "a", max_steps=1, per_device_train_batch_size=4))
    big.train()
    accumulated = ZOTrainer(model=zqat_llama("lightweight"), train_dataset=data,
                            args=zo_args(tmp_path / "b", max_steps=1, per_device_train_batch_size=2,
                                         gradient_accumulation_steps=2))
    accumulated.train()
    (g_big,), (g_acc,) = big.zo_optimizer.trajectory.grads[0], accumulated.zo_optimizer.trajectory.grads[0]
    assert g_big != 0 and abs(g_big - g_acc) <= 1e-3 * abs(g_big)
    assert big.zo_optimizer.trajectory.seeds == accumulated.zo_optimizer.trajectory.seeds


def test_several_queries_and_logging(tmp_path):
    logged = []

    class Collect(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            logged.append(dict(logs))

    model = zqat_llama("scales")
    trainer = ZOTrainer(model=model, args=zo_args(tmp_path, max_steps=4, logging_steps=2, zo_num_queries=3,
                                                  warmup_steps=2, lr_scheduler_type="linear"),
                        train_dataset=RepeatedBatch(), callbacks=[Collect()])
    trainer.train()
    step_logs = [entry for entry in logged if "loss" in entry]
    assert step_logs and all("projected_grad" in e and "learning_rate" in e for e in step_logs)
    assert all("grad_norm" not in e for e in step_logs)
    assert len(trainer.zo_optimizer.trajectory.seeds[0]) == 3
    lrs = trainer.zo_optimizer.trajectory.lrs
    assert lrs[0] < lrs[1]  # warmup


def test_every_perturbed_pass_sees_the_labels(tmp_path):
    seen = []

    def loss_func(outputs, labels, num_items_in_batch=None):
        seen.append(labels is not None)
        return nn.functional.cross_entropy(outputs.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    trainer = ZOTrainer(model=zqat_llama("scales"), args=zo_args(tmp_path, max_steps=2),
                        train_dataset=RepeatedBatch(), compute_loss_func=loss_func)
    trainer.train()
    assert seen == [True] * 4  # two passes per step


def test_lora_models_train_too(tmp_path):
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = trained_state(model)
    ZOTrainer(model=model, args=zo_args(tmp_path, max_steps=3), train_dataset=RepeatedBatch()).train()
    after = trained_state(model)
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_nonfinite_losses_skip_updates_then_stop(tmp_path):
    model = zqat_llama("lightweight")
    before = trained_state(model)
    orig = model.forward

    def nan_forward(*a, **kw):
        out = orig(*a, **kw)
        out.loss = out.loss * float("nan")
        return out

    model.forward = nan_forward
    trainer = ZOTrainer(model=model, args=zo_args(tmp_path, max_steps=20, zo_max_nonfinite_steps=3),
                        train_dataset=RepeatedBatch())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ZODivergenceError, match="3 steps in a row"):
            trainer.train()
    assert sum("NaN/inf" in str(w.message) for w in caught) >= 2
    after = trained_state(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


# ----- refused settings ---------------------------------------------------------------------------


def test_fp16_is_refused_with_a_suggestion(tmp_path):
    with pytest.raises(ValueError, match="bf16"):
        zo_args(tmp_path, fp16=True)


def test_max_grad_norm_is_refused(tmp_path):
    with pytest.raises(ValueError, match="zo_grad_clip"):
        zo_args(tmp_path, max_grad_norm=1.0)


def test_plain_training_arguments_are_refused(tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="ZOTrainingArguments"):
        ZOTrainer(model=zqat_llama(), args=TrainingArguments(output_dir=str(tmp_path), report_to=[]))


def test_model_with_nothing_trainable_is_refused(tmp_path):
    model = tiny_model("llama").requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        ZOTrainer(model=model, args=zo_args(tmp_path), train_dataset=RepeatedBatch())


def test_two_processes_end_with_bit_identical_weights(tmp_path):
    """accelerate launch with 2 CPU processes (gloo): each evaluates its shard with the same seeds and
    only the loss differences are all-reduced. (accelerate's --cpu flag means one process; its
    torchrun launcher, --multi_gpu, starts the two CPU processes, which use_cpu=True keeps on gloo.)"""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("zo_multiprocess_script.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", str(script), str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    w0 = torch.load(tmp_path / "weights-rank0.pt")
    w1 = torch.load(tmp_path / "weights-rank1.pt")
    assert w0.keys() == w1.keys() and all(torch.equal(w0[n], w1[n]) for n in w0)
    assert torch.load(tmp_path / "grads-rank0.pt") == torch.load(tmp_path / "grads-rank1.pt")
    x0, x1 = torch.load(tmp_path / "inputs-rank0.pt"), torch.load(tmp_path / "inputs-rank1.pt")
    assert any(not torch.equal(a, b) for a, b in zip(x0, x1)), "both processes saw the same batches"
    start = trained_state(zqat_llama("lightweight"))
    assert any(not torch.equal(w0[n], start[n]) for n in w0)
    # The all-reduced step is the one-process step on the two ranks' batches together: at every step's
    # starting weights, one process's projected gradient on the doubled batch equals the recorded one, up
    # to the float32 rounding of the losses (a few ulps of L, divided by 2 eps).
    trajectory = Trajectory.from_state_dict(torch.load(tmp_path / "trajectory-rank0.pt"))
    model = zqat_llama("lightweight")
    params = zo_parameters(model)
    for step, (a, b) in enumerate(zip(x0, x1)):
        ids = torch.cat([a, b])
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        (seed,), (recorded,) = trajectory.seeds[step], trajectory.grads[step]
        loss_pos, loss_neg = spsa_losses(params, lambda: model(**batch).loss, seed, trajectory.eps)
        one_process = (loss_pos.double() - loss_neg.double()).item() / (2 * trajectory.eps)
        rounding = 4 * torch.finfo(torch.float32).eps * loss_pos.item() / (2 * trajectory.eps)
        assert abs(recorded) > 5 * rounding and abs(one_process - recorded) <= rounding, (step, one_process, recorded)
        replay_trajectory(model, Trajectory(**{**trajectory.state_dict(), **_one_step(trajectory, step)}))


def _one_step(trajectory: Trajectory, step: int) -> dict:
    """The fields of `trajectory` that hold per-step records, cut to step `step` alone."""
    return {k: getattr(trajectory, k)[step : step + 1] for k in ("seeds", "grads", "lrs", "weight_decays")}


def test_uncalibrated_model_is_refused(tmp_path):
    model = get_peft_model(tiny_model("llama"), ZeroQATConfig(init="calibrate"))
    with pytest.raises(ValueError, match="not calibrated"):
        ZOTrainer(model=model, args=zo_args(tmp_path), train_dataset=RepeatedBatch())


# ----- half-precision master weights -------------------------------------------------------------


def test_bf16_master_weights_learn_at_a_recipe_learning_rate(tmp_path):
    """At lr 1e-6 (the 7B recipes') lr * g * z is below half a bf16 ulp of most weights: rounded to nearest,
    most of every update is lost (the loss falls 0.004 in these 300 steps; float32 masters: 0.018).
    Rounded stochastically, bf16 masters learn as float32 masters do on average, and replay bit for bit."""
    model, data = one_direction_llama(torch.bfloat16)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
    start = batch_loss(model, data.batch)
    args = zo_args(tmp_path, max_steps=300, learning_rate=1e-6, save_strategy="steps", save_steps=300)
    ZOTrainer(model=model, args=args, train_dataset=data).train()
    assert start - batch_loss(model, data.batch) > 0.01
    replayed = replay_trajectory(one_direction_llama(torch.bfloat16)[0], tmp_path / "checkpoint-300")
    expected, got = trained_state(model), trained_state(replayed)
    assert all(got[n].dtype == torch.bfloat16 and torch.equal(expected[n], got[n]) for n in expected)


# ----- what the perturbed forwards compute ---------------------------------------------------------


def test_zo_forwards_build_no_kv_cache(tmp_path):
    """Trainer sets the model's config.use_cache to args.use_cache (False by default), but with
    use_cache=True, or a config changed later, a ZO forward must still build no cache: it never reuses one."""
    model = zqat_llama("lightweight")
    caches = []
    orig = model.forward

    def forward(*a, **kw):
        out = orig(*a, **kw)
        caches.append(out.past_key_values)
        return out

    model.forward = forward
    ZOTrainer(model=model, args=zo_args(tmp_path / "a", max_steps=2, use_cache=True), train_dataset=RepeatedBatch()).train()
    assert model.config.use_cache and caches == [None] * 4

    class NoCacheArgument(nn.Module):  # a forward without use_cache is called without it
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(256, 8), nn.Linear(8, 256)

        def forward(self, input_ids, attention_mask=None, labels=None):
            logits = self.head(self.embed(input_ids))
            return {"loss": nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())}

    plain = NoCacheArgument()
    before = trained_state(plain)
    ZOTrainer(model=plain, args=zo_args(tmp_path / "b", max_steps=2), train_dataset=RepeatedBatch()).train()
    assert any(not torch.equal(before[n], p) for n, p in trained_state(plain).items())


def test_loss_difference_is_taken_after_upcasting(tmp_path):
    """bf16 losses 1 + 2**-7 and 2**-9 are exact in bf16, but their difference needs 9 significant bits,
    one more than bf16 has: subtracted in bf16 it is rounded."""
    high, low = 1.0 + 2.0**-7, 2.0**-9
    losses = iter([high, low])

    def bf16_loss(outputs, labels, num_items_in_batch=None):
        return torch.tensor(next(losses), dtype=torch.bfloat16)

    trainer = ZOTrainer(model=zqat_llama("scales"), args=zo_args(tmp_path, max_steps=1), train_dataset=RepeatedBatch(),
                        compute_loss_func=bf16_loss)
    trainer.train()
    assert trainer.zo_optimizer.trajectory.grads == [[(high - low) / (2 * 1e-3)]]


# ----- weight decay --------------------------------------------------------------------------------


def _constant_loss(outputs, labels, num_items_in_batch=None):
    """g is exactly 0 at every step: only weight decay can move a parameter."""
    return outputs.logits.sum() * 0 + 1.0


def test_weight_decay_spares_quantization_parameters_biases_and_norms(tmp_path):
    lr, wd, steps = 1e-2, 0.5, 2
    scales = zqat_llama("scales")
    start = trained_state(scales)
    ZOTrainer(model=scales, args=zo_args(tmp_path / "a", max_steps=steps, learning_rate=lr, weight_decay=wd),
              train_dataset=RepeatedBatch(), compute_loss_func=_constant_loss).train()
    after = trained_state(scales)
    assert all(torch.equal(start[n], after[n]) for n in start)  # quantization scales never decay

    opt = tiny_model("opt")  # every parameter trainable: weights, biases, layer norms
    start = trained_state(opt)
    ZOTrainer(model=opt, args=zo_args(tmp_path / "b", max_steps=steps, learning_rate=lr, weight_decay=wd),
              train_dataset=RepeatedBatch(), compute_loss_func=_constant_loss).train()
    after = trained_state(opt)
    norms = {f"{name}.{p}" for name, m in opt.named_modules() if isinstance(m, nn.LayerNorm) for p in ("weight", "bias")}
    spared = {n for n in start if n.endswith(".bias") or n in norms}
    assert spared and len(spared) < len(start)
    for n in start:
        expected = start[n] if n in spared else start[n] * (1 - lr * wd) * (1 - lr * wd)
        assert torch.equal(after[n], expected), n


def test_weight_decay_replays_bit_for_bit_across_a_skipped_step(tmp_path):
    model = zqat_llama("full")
    passes = []
    orig = model.forward

    def forward(*a, **kw):  # the second step's two passes give NaN: that step is skipped
        out = orig(*a, **kw)
        passes.append(None)
        if len(passes) in (3, 4):
            out.loss = out.loss * float("nan")
        return out

    model.forward = forward
    args = zo_args(tmp_path, max_steps=4, weight_decay=0.1, save_strategy="steps", save_steps=4)
    trainer = ZOTrainer(model=model, args=args, train_dataset=RepeatedBatch())
    with pytest.warns(UserWarning, match="NaN/inf"):
        trainer.train()
    trajectory = trainer.zo_optimizer.trajectory
    assert trajectory.grads[1] == [0.0] and trajectory.weight_decays == [0.1, 0.0, 0.1, 0.1]
    replayed = replay_trajectory(zqat_llama("full"), tmp_path / "checkpoint-4")
    expected, got = trained_state(model), trained_state(replayed)
    assert all(torch.equal(expected[n], got[n]) for n in expected)


# ----- the projected gradient ----------------------------------------------------------------------


def test_zo_grad_clip_bounds_the_projected_gradient(tmp_path):
    free = ZOTrainer(model=zqat_llama("scales"), args=zo_args(tmp_path / "a", max_steps=1), train_dataset=RepeatedBatch())
    free.train()
    ((g,),) = free.zo_optimizer.trajectory.grads
    clip = abs(g) / 2
    clipped = ZOTrainer(model=zqat_llama("scales"), args=zo_args(tmp_path / "b", max_steps=3, zo_grad_clip=clip),
                        train_dataset=RepeatedBatch())
    clipped.train()
    grads = [q for step in clipped.zo_optimizer.trajectory.grads for q in step]
    assert grads[0] == math.copysign(clip, g)
    assert all(abs(q) <= clip for q in grads)


# ----- resume and replay ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode,estimator_kw", [("lightweight", {}),
                                                ("scales", dict(zo_estimator="one_sided", zo_step="relative"))])
def test_resume_with_accumulation_and_several_queries_is_bit_exact(tmp_path, mode, estimator_kw):
    data = RepeatedBatch()
    kw = dict(max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2, zo_num_queries=2, **estimator_kw)
    full = zqat_llama(mode)
    ZOTrainer(model=full, args=zo_args(tmp_path / "a", **kw), train_dataset=data).train()
    args = zo_args(tmp_path / "b", save_strategy="steps", save_steps=2, **kw)
    ZOTrainer(model=zqat_llama(mode), args=args, train_dataset=data).train()
    resumed = zqat_llama(mode)
    ZOTrainer(model=resumed, args=args, train_dataset=data).train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    expected, got = trained_state(full), trained_state(resumed)
    assert expected.keys() == got.keys() and all(torch.equal(expected[n], got[n]) for n in expected)
    start = trained_state(zqat_llama(mode))
    assert all(not torch.equal(start[n], got[n]) for n in start)
    replayed = trained_state(replay_trajectory(zqat_llama(mode), tmp_path / "b" / "checkpoint-4"))
    assert all(torch.equal(expected[n], replayed[n]) for n in expected)


@pytest.mark.parametrize("change,setting", [({"zo_eps": 2e-3}, "zo_eps"), ({"zo_num_queries": 2}, "zo_num_queries"),
                                            ({"seed": 1}, "seed"), ({"zo_estimator": "one_sided"}, "zo_estimator")])
def test_resume_with_changed_zo_settings_is_refused(tmp_path, change, setting):
    data = RepeatedBatch()
    kw = dict(max_steps=2, save_strategy="steps", save_steps=1)
    ZOTrainer(model=zqat_llama("scales"), args=zo_args(tmp_path, **kw), train_dataset=data).train()
    trainer = ZOTrainer(model=zqat_llama("scales"), args=zo_args(tmp_path, **kw, **change), train_dataset=data)
    with pytest.raises(ValueError, match=setting):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


def test_resume_and_replay_errors(tmp_path, monkeypatch):
    from zqat_peft.zo import ZOOptimizer

    args = zo_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    trainer = ZOTrainer(model=zqat_llama("scales"), args=args, train_dataset=RepeatedBatch())
    trainer.train()
    checkpoint = tmp_path / "checkpoint-2"
    with pytest.raises(ValueError, match="differ"):  # other trainable parameters
        replay_trajectory(zqat_llama("full"), checkpoint)
    with pytest.raises(ValueError, match="2 recorded steps"):
        replay_trajectory(zqat_llama("scales"), checkpoint, steps=3)
    with pytest.raises(FileNotFoundError, match="zo_trajectory"):
        replay_trajectory(zqat_llama("scales"), tmp_path / "nothing-here")
    monkeypatch.setattr("zqat_peft.zo.trajectory.NOISE_VERSION", "zqat-noise-v0")
    trainer.zo_optimizer.trajectory.save(tmp_path)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="zqat-noise-v0"):
        replay_trajectory(zqat_llama("scales"), tmp_path)
    optimizer = ZOOptimizer(zo_parameters(zqat_llama("scales")), lr=1e-3, step="absolute")
    with pytest.raises(ValueError, match="not written by ZOOptimizer"):
        optimizer.load_state_dict(torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=1.0).state_dict())
    other = ZOOptimizer(zo_parameters(zqat_llama("full")), lr=1e-3, step="absolute")
    with pytest.raises(ValueError, match="different trainable parameters"):
        other.load_state_dict(trainer.zo_optimizer.state_dict())


# ----- refused models and options ------------------------------------------------------------------


def test_trainer_without_arguments_uses_default_zo_arguments(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = ZOTrainer(model=zqat_llama("scales"), train_dataset=RepeatedBatch())
    assert isinstance(trainer.args, ZOTrainingArguments) and trainer.args.output_dir == "tmp_trainer"
    trainer.create_optimizer()
    # the relative step's defaults, not TrainingArguments' Adam lr
    assert (trainer.args.learning_rate, trainer.zo_optimizer.eps) == (RELATIVE_LR, RELATIVE_EPS)
    assert trainer.zo_optimizer.param_groups[0]["lr"] == RELATIVE_LR


@pytest.mark.parametrize("option", [{"optim": "sgd"}, {"optim_args": "momentum=0.9"}, {"adam_beta1": 0.5},
                                    {"adam_beta2": 0.9}, {"adam_epsilon": 1e-6}, {"optim_target_modules": ["q_proj"]}])
def test_optimizer_options_are_refused(tmp_path, option):
    (name,) = option
    with pytest.raises(ValueError, match=name):
        zo_args(tmp_path, **option)


def test_optimizer_cls_and_kwargs_is_refused(tmp_path):
    with pytest.raises(ValueError, match="optimizer_cls_and_kwargs"):
        ZOTrainer(model=zqat_llama("scales"), args=zo_args(tmp_path), train_dataset=RepeatedBatch(),
                  optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 1e-3}))


def test_cpu_offloaded_model_is_refused(tmp_path):
    """accelerate's offload hooks load each weight from their own copy before the forward, over the
    perturbed one: both passes would see the same weights and g would always be 0."""
    from accelerate import cpu_offload

    model = cpu_offload(zqat_llama("full"), execution_device=torch.device("cpu"))
    with pytest.raises(ValueError, match="offloaded"):
        zo_parameters(model)
    with pytest.raises(ValueError, match="offloaded"):
        ZOTrainer(model=model, args=zo_args(tmp_path), train_dataset=RepeatedBatch())


@pytest.mark.parametrize("flag", ["is_deepspeed_enabled", "is_fsdp_enabled"])
def test_deepspeed_and_fsdp_are_refused(tmp_path, monkeypatch, flag):
    create = ZOTrainer.create_accelerator_and_postprocess

    def create_with_sharding(self):
        create(self)
        setattr(self, flag, True)

    monkeypatch.setattr(ZOTrainer, "create_accelerator_and_postprocess", create_with_sharding)
    with pytest.raises(ValueError, match="DeepSpeed and FSDP"):
        ZOTrainer(model=zqat_llama("scales"), args=zo_args(tmp_path), train_dataset=RepeatedBatch())


def test_a_truncated_trajectory_file_is_one_line_naming_it(tmp_path):
    from zqat_peft.files import CorruptFileError
    from zqat_peft.zo import Trajectory

    trajectory = Trajectory(1e-3, 1, ["w"])
    trajectory.append([1], [0.5], 1e-5, 0.0)
    path = trajectory.save(tmp_path)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(CorruptFileError, match=str(path)):
        Trajectory.load(tmp_path)
