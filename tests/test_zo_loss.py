"""The chunked causal-LM loss (zqat_peft.zo.loss) and ZOTrainer's use of it."""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from zqat_peft import ZeroQATConfig, ZOTrainer, ZOTrainingArguments
from zqat_peft.zo import chunked_causal_lm_loss, chunked_loss_unsupported
from zqat_peft.zo import trainer as trainer_module

from .conftest import tiny_batch, tiny_model


def padded_batch(batch: int = 3, seq: int = 11) -> dict[str, torch.Tensor]:
    """Rows of different lengths: the padding's labels are -100 (and the whole last row but one token)."""
    inputs = tiny_batch(batch, seq)
    inputs["labels"][0, 7:] = -100
    inputs["labels"][2, 1:] = -100
    inputs["attention_mask"][0, 7:] = 0
    return inputs


def own_loss(model, inputs, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **kw).loss


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma", "opt", "gpt_neox", "phi"])
@pytest.mark.parametrize("chunk_tokens", [1, 4, 11, 7, 1000])  # 3 x 11 positions: 11 divides them, 4 and 7 do not
def test_chunked_loss_equals_the_models_loss(arch, chunk_tokens):
    model = tiny_model(arch)
    inputs = padded_batch()
    with torch.no_grad():
        chunked = chunked_causal_lm_loss(model, inputs, chunk_tokens)
    assert chunked.dtype == torch.float32 and chunked.shape == ()
    torch.testing.assert_close(chunked, own_loss(model, inputs), rtol=2e-6, atol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_chunked_loss_with_num_items_in_batch(arch):
    """The sum over the batch divided by the count given (a gradient-accumulation batch's), not the mean."""
    model, inputs = tiny_model(arch), padded_batch()
    with torch.no_grad():
        chunked = chunked_causal_lm_loss(model, {**inputs, "num_items_in_batch": torch.tensor(50)}, chunk_tokens=4)
    expected = own_loss(model, inputs, num_items_in_batch=torch.tensor(50))
    torch.testing.assert_close(chunked, expected, rtol=2e-6, atol=0)
    assert not torch.allclose(chunked, own_loss(model, inputs))  # 50 is not the count of this batch's labels


def test_chunked_loss_of_a_zeroqat_model_in_bfloat16():
    model = get_peft_model(tiny_model("llama", dtype=torch.bfloat16), ZeroQATConfig(w_bits=4, group_size=32))
    inputs = padded_batch()
    with torch.no_grad():
        chunked = chunked_causal_lm_loss(model, inputs, chunk_tokens=5)
    torch.testing.assert_close(chunked, own_loss(model, inputs), rtol=2e-6, atol=0)


def tiny_gemma2() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.Gemma2Config(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                       max_position_embeddings=128, final_logit_softcapping=1.0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # logits well beyond the cap, where capping changes the loss
    return model


class LogitScaledLlama(transformers.LlamaForCausalLM):
    """A subclass whose forward changes the logits: its loss is not lm_head's cross-entropy."""

    def forward(self, labels=None, **kwargs):
        logits = super().forward(**kwargs).logits * 0.5
        loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)


def unsupported_models() -> dict[str, transformers.PreTrainedModel]:
    scaled = LogitScaledLlama(tiny_model("llama").config)
    scaled.load_state_dict(tiny_model("llama").state_dict())
    return {"gemma2 soft-capping": tiny_gemma2(), "forward overridden": scaled.eval()}


@pytest.mark.parametrize("name", ["gemma2 soft-capping", "forward overridden"])
def test_unsupported_models_keep_their_own_loss(name, tmp_path):
    model = unsupported_models()[name]
    inputs = padded_batch()
    assert chunked_loss_unsupported(model) is not None
    with pytest.raises(ValueError, match="cannot reproduce"):
        chunked_causal_lm_loss(model, inputs, 4)
    # the head's plain cross-entropy is not these models' loss: the chunked path would be caught here
    with torch.no_grad():
        hidden = model.model(**{k: v for k, v in inputs.items() if k != "labels"}).last_hidden_state
        plain = torch.nn.functional.cross_entropy(model.lm_head(hidden)[:, :-1].flatten(0, 1),
                                                  inputs["labels"][:, 1:].flatten(), ignore_index=-100)
    expected = own_loss(model, inputs)
    assert not torch.allclose(plain, expected, rtol=1e-3)

    model.requires_grad_(True)
    trainer = ZOTrainer(model=model, args=zo_args(tmp_path))
    assert trainer.loss_chunk_tokens is None
    with torch.no_grad():
        assert torch.equal(trainer.compute_loss(model, dict(inputs)), expected)


def zo_args(tmp_path, **kw) -> ZOTrainingArguments:
    return ZOTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no", **kw)


class RecordingLoss:
    """Stands in for chunked_causal_lm_loss in the trainer and records its calls."""

    def __init__(self):
        self.chunk_tokens = []

    def __call__(self, model, inputs, chunk_tokens):
        self.chunk_tokens.append(chunk_tokens)
        return chunked_causal_lm_loss(model, inputs, chunk_tokens)


@pytest.mark.parametrize("options, used", [
    ({}, [256]), ({"zo_loss_chunk_tokens": 5}, [5]), ({"zo_loss_chunk_tokens": None}, []),
    ({"label_smoothing_factor": 0.1}, []),
])
def test_zo_trainer_computes_its_loss_chunked(options, used, tmp_path, monkeypatch):
    recorder = RecordingLoss()
    monkeypatch.setattr(trainer_module, "chunked_causal_lm_loss", recorder)
    model = get_peft_model(tiny_model("llama"), ZeroQATConfig(w_bits=4, group_size=32, trainable="scales"))
    trainer = ZOTrainer(model=model, args=zo_args(tmp_path, **options))
    inputs = padded_batch()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(inputs))
    assert recorder.chunk_tokens == used
    if not options.get("label_smoothing_factor"):
        torch.testing.assert_close(loss, own_loss(model, inputs), rtol=2e-6, atol=0)
    # evaluation asks for the outputs too: the model's own forward, logits included
    with torch.no_grad():
        _, outputs = trainer.compute_loss(model, dict(inputs), return_outputs=True)
    assert outputs.logits.shape == (3, 11, 256) and recorder.chunk_tokens == used


@pytest.mark.parametrize("chunk_tokens", [0, -3])
def test_zo_loss_chunk_tokens_must_be_positive(chunk_tokens, tmp_path):
    with pytest.raises(ValueError, match="zo_loss_chunk_tokens must be a positive"):
        zo_args(tmp_path, zo_loss_chunk_tokens=chunk_tokens)


class LargestFloatTensor(TorchDispatchMode):
    """The bytes of the largest floating-point tensor any operation allocates inside the block (views of
    its inputs, e.g. a weight's transpose, allocate nothing)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def test_the_chunked_loss_never_makes_a_tensor_the_size_of_the_float32_logits():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    inputs = tiny_batch(4, 64, vocab=32000)
    full_logits_bytes = 4 * 64 * 32000 * 4
    with torch.no_grad(), LargestFloatTensor() as own:
        model(**inputs).loss
    assert own.largest >= full_logits_bytes  # what the measure catches: the model's own loss
    with torch.no_grad(), LargestFloatTensor() as chunked:
        chunked_causal_lm_loss(model, inputs, chunk_tokens=16)
    assert chunked.largest <= 16 * 32000 * 4 < full_logits_bytes / 8


def test_zo_training_runs_the_chunked_loss_without_autograd(tmp_path, monkeypatch):
    grad_enabled = []

    def recording_loss(model, inputs, chunk_tokens):
        grad_enabled.append(torch.is_grad_enabled())
        loss = chunked_causal_lm_loss(model, inputs, chunk_tokens)
        assert loss.grad_fn is None
        return loss

    monkeypatch.setattr(trainer_module, "chunked_causal_lm_loss", recording_loss)
    model = get_peft_model(tiny_model("llama"), ZeroQATConfig(w_bits=4, group_size=32, trainable="full"))
    data = [{k: v[i] for k, v in padded_batch(4, 16).items()} for i in range(4)]
    args = zo_args(tmp_path, max_steps=2, per_device_train_batch_size=4, zo_loss_chunk_tokens=7, disable_tqdm=True)
    ZOTrainer(model=model, args=args, train_dataset=data).train()
    assert grad_enabled == [False] * 4  # two forwards per step
    assert all(p.grad is None for p in model.parameters())


def test_a_forward_replaced_on_the_instance_keeps_the_models_loss():
    model = get_peft_model(tiny_model("llama"), ZeroQATConfig(w_bits=4, group_size=32))
    assert chunked_loss_unsupported(model) is None
    model.forward = lambda **kw: None  # e.g. a spy, or a wrapper that changes the outputs
    assert "replaced" in chunked_loss_unsupported(model)
    model._original_forward = model.forward  # accelerate's autocast wrapper: its autocast is reproduced
    assert chunked_loss_unsupported(model) is None
