"""A causal-LM loss computed a chunk of tokens at a time, never holding the whole float32 logits.

transformers' causal-LM loss upcasts the [B, T, V] logits to float32 and ``cross_entropy`` writes a float32
log-softmax of the same size: at LLaMA-2 shape (V = 32000) and 16 x 128 tokens that is 0.5-0.6 GiB on top of
the logits, most of a ZO step's transient memory. A ZO forward needs only the scalar loss, so the head and
the cross-entropy can run over at most ``chunk_tokens`` positions at a time: the transient is then
``chunk_tokens x V`` (model dtype + two float32 copies) instead of ``B x T x V``.

The result is the model's own loss (transformers' ``ForCausalLMLoss``: labels shifted left, ignore_index
-100, mean over the counted tokens or sum / ``num_items_in_batch`` when given) to float32 rounding. Only
models whose forward is known to be exactly ``loss_function(lm_head(decoder(...).last_hidden_state))`` are
computed this way; ``chunked_loss_unsupported`` says why any other model (logit soft-capping, a logit
scale, an unknown head) must keep its own forward.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torch.nn import functional as F

IGNORE_INDEX = -100

# transformers' *ForCausalLM classes whose forward is `logits = lm_head(<decoder>(...).last_hidden_state)`
# then `loss_function(logits, labels, ...)`, nothing in between (read in transformers 5.x), with the attribute
# path of the decoder that forward calls. Gemma 2/3 (soft-capping), Cohere (logit_scale), Granite
# (logits_scaling) and every class not listed keep their own forward.
CAUSAL_LMS_WITH_PLAIN_HEAD = {
    "LlamaForCausalLM": "model", "MistralForCausalLM": "model", "Qwen2ForCausalLM": "model",
    "Qwen3ForCausalLM": "model", "GemmaForCausalLM": "model", "PhiForCausalLM": "model",
    "Phi3ForCausalLM": "model", "Olmo2ForCausalLM": "model", "OPTForCausalLM": "model.decoder",
    "GPTNeoXForCausalLM": "gpt_neox",
}
# Keys of a causal LM's forward that belong to the loss, not to the decoder.
_LOSS_KEYS = ("labels", "shift_labels", "num_items_in_batch")


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (``get_base_model``), else ``model`` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def chunked_loss_unsupported(model: nn.Module) -> Optional[str]:
    """Why ``chunked_causal_lm_loss`` cannot reproduce ``model``'s own loss, or None when it can."""
    config = getattr(model, "active_peft_config", None)
    if config is not None and config.is_prompt_learning:
        return "a prompt-learning peft model adds virtual tokens in its own forward"
    base = causal_lm_of(model)
    verified = _verified_class(base)
    if verified is None:
        return (f"{type(base).__name__} is not one of the causal LMs whose logits are known to be lm_head(last "
                f"hidden state) with no soft-capping or scaling ({', '.join(sorted(CAUSAL_LMS_WITH_PLAIN_HEAD))})")
    if type(base).forward is not verified.forward:
        return f"{type(base).__name__} replaces {verified.__name__}.forward"
    replaced = [m for m in (model, getattr(model, "base_model", model), base) if _forward_replaced(m)]
    if replaced:
        return f"the forward of its {type(replaced[0]).__name__} is replaced on the instance"
    if base._forward_hooks or base._forward_pre_hooks or hasattr(base, "_hf_hook"):
        return f"{type(base).__name__} has hooks on its forward"
    from transformers.loss.loss_utils import ForCausalLMLoss

    if base.loss_function is not ForCausalLMLoss:
        return f"{type(base).__name__}'s loss_function is {base.loss_function!r}, not ForCausalLMLoss"
    return None


def _forward_replaced(module: nn.Module) -> bool:
    """A forward set on the instance, other than accelerate's mixed-precision wrapper (which keeps the
    original as ``_original_forward``; its autocast is the caller's to reproduce, as ZOTrainer does)."""
    return "forward" in vars(module) and "_original_forward" not in vars(module)


def _verified_class(base: nn.Module) -> Optional[type]:
    for klass in type(base).__mro__:
        if klass.__name__ in CAUSAL_LMS_WITH_PLAIN_HEAD and klass.__module__.startswith("transformers.models."):
            return klass
    return None


def chunked_causal_lm_loss(model: nn.Module, inputs: dict[str, Any], chunk_tokens: int) -> torch.Tensor:
    """``model(**inputs).loss`` for a causal LM, with the head and cross-entropy run over at most
    ``chunk_tokens`` positions at a time (in a fixed order: the same inputs give the same bits).

    inputs: the model's forward keywords, with ``labels`` [B, T] (or ``shift_labels``) and optionally
    ``num_items_in_batch``. Returns a float32 scalar. Raises ValueError for a model whose loss this cannot
    reproduce (``chunked_loss_unsupported``)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}.")
    reason = chunked_loss_unsupported(model)
    if reason is not None:
        raise ValueError(f"The chunked loss cannot reproduce this model's loss: {reason}. Use model(**inputs).loss.")
    if "labels" not in inputs and "shift_labels" not in inputs:
        raise ValueError("chunked_causal_lm_loss needs labels (or shift_labels) in the inputs.")
    if inputs.get("logits_to_keep", 0) != 0:
        raise ValueError("logits_to_keep drops positions from the loss; pass it to the model's own forward instead.")
    base = causal_lm_of(model)
    decoder_inputs = {k: v for k, v in inputs.items() if k not in _LOSS_KEYS and k != "logits_to_keep"}
    hidden = _decoder(base)(**decoder_inputs).last_hidden_state
    labels = _shifted_labels(inputs)
    return chunked_cross_entropy(hidden, base.get_output_embeddings(), labels, chunk_tokens,
                                 inputs.get("num_items_in_batch"))


def _decoder(base: nn.Module) -> nn.Module:
    module = base
    for attr in CAUSAL_LMS_WITH_PLAIN_HEAD[_verified_class(base).__name__].split("."):
        module = getattr(module, attr)
    return module


def _shifted_labels(inputs: dict[str, Any]) -> torch.Tensor:
    """The target of each position, as ForCausalLMLoss takes it: ``shift_labels`` when given, else the
    labels moved one position left with IGNORE_INDEX at the end of each row."""
    if inputs.get("shift_labels") is not None:
        return inputs["shift_labels"]
    return F.pad(inputs["labels"], (0, 1), value=IGNORE_INDEX)[..., 1:]


def chunked_cross_entropy(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk_tokens: int,
                          num_items_in_batch: Optional[torch.Tensor | int] = None) -> torch.Tensor:
    """Cross-entropy of ``head(hidden)`` (upcast to float32) against ``labels``, chunk by chunk.

    hidden [..., H] in the model's dtype; labels [...] (IGNORE_INDEX: not counted). The mean over counted
    labels, or the sum / ``num_items_in_batch`` when given; a float32 scalar (the chunk sums are added in
    float32, like the terms of one sum: the chunking moves the result by float32 rounding only)."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    if labels.numel() != hidden.shape[0]:
        raise ValueError(f"{labels.numel()} labels for {hidden.shape[0]} positions.")
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_tokens):
        logits = head(hidden[start:start + chunk_tokens]).float()
        targets = labels[start:start + chunk_tokens].to(logits.device)
        total = total + F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        del logits  # freed before the next chunk's are made
    if num_items_in_batch is None:
        count = (labels != IGNORE_INDEX).sum()
    else:
        count = torch.as_tensor(num_items_in_batch)
    return total / count.to(total.device)
