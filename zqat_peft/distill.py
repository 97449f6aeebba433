"""Training against the full-precision model's next-token distribution (``train.loss: distill``).

Cross-entropy on the training text pulls the quantized model toward that text (Wikipedia here), and what
it learns there need not carry to other text or to zero-shot tasks. The distillation target is the
full-precision model itself: its top-k next-token probabilities at every position of every training
window, computed once before quantization and kept as small tensors (k ids + k log-probabilities per
position), so the full-precision weights need not stay in memory while training.

- ``sampled_windows``: windows of text sampled from the full-precision model itself (LLM-QAT's data-free
  distillation): training on the model's own distribution rather than one corpus's.
- ``teacher_top_k``: the full-precision model's top-k tokens and log-probabilities for a set of windows.
- ``TeacherWindows``: token windows with those targets, as training / held-out examples.
- ``distillation_loss``: KL between the teacher's and the model's distributions over k + 1 outcomes: each of
  the teacher's top-k tokens, and "any other token" (the mass the teacher leaves outside its top k).
- ``DistillZOTrainer``: ZOTrainer whose loss is ``distillation_loss`` (training and held-out checks).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn
from transformers import GenerationConfig

from .zo import ZOTrainer

TEACHER_KEYS = ("teacher_ids", "teacher_logprobs")
TOP_K = 32  # SmolLM2-135M puts 84% of its next-token mass on its top 32 tokens on wiki (top 8: 72%, top 128: 91%)


@torch.no_grad()
def sampled_windows(model: nn.Module, n: int, seq_len: int, start_ids: Sequence[int], seed: int,
                    batch_size: int = 32, temperature: float = 1.0) -> torch.Tensor:
    """[n, seq_len] token windows (int64) sampled from ``model``: each starts with a token drawn uniformly from
    ``start_ids`` and goes on with tokens drawn from the model's next-token distribution at ``temperature`` (1:
    the full distribution, as LLM-QAT generates its distillation data; below 1: sharper, more fluent text), no
    top-k or top-p. End-of-text tokens are not drawn (every window is seq_len long). The same seed and batch_size
    give the same windows on the same machine and thread count; the global random state is left as it was."""
    if n < 1 or seq_len < 2 or not start_ids or not temperature > 0:
        raise ValueError(f"need n >= 1, seq_len >= 2, some start tokens and a temperature above 0; got {n}, "
                         f"{seq_len}, {len(start_ids)}, {temperature}")
    device = next(model.parameters()).device
    eos = model.config.eos_token_id  # one id, or several (Gemma 3, Llama 3.1 list their turn ends too)
    config = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                              max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1, eos_token_id=eos,
                              pad_token_id=eos[0] if isinstance(eos, list) else eos)
    starts = torch.as_tensor(list(start_ids))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        first = starts[torch.randint(len(starts), (n, 1))]
        windows = [model.generate(input_ids=batch.to(device), attention_mask=torch.ones_like(batch).to(device),
                                  generation_config=config).cpu() for batch in first.split(batch_size)]
    return torch.cat(windows)


@torch.no_grad()
def teacher_top_k(model: nn.Module, windows: torch.Tensor, k: int = TOP_K,
                  batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """For [n, T] token windows: ``(ids, logprobs)``, both [n, T, k], the model's k most likely next tokens
    at each position (int32) and their log-probabilities (float16), most likely first."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    device = next(model.parameters()).device
    ids, logprobs = [], []
    for batch in windows.split(batch_size):
        top, idx = model(input_ids=batch.to(device)).logits.float().log_softmax(-1).topk(k, dim=-1)
        ids.append(idx.to(torch.int32).cpu())
        logprobs.append(top.to(torch.float16).cpu())
    return torch.cat(ids), torch.cat(logprobs)


class TeacherWindows(torch.utils.data.Dataset):
    """Causal-LM windows with the teacher's top-k next-token targets at every position."""

    def __init__(self, windows: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor):
        if teacher_ids.shape[:2] != windows.shape or teacher_logprobs.shape != teacher_ids.shape:
            raise ValueError(f"teacher targets {tuple(teacher_ids.shape)} / {tuple(teacher_logprobs.shape)} do "
                             f"not match the windows {tuple(windows.shape)}")
        self.windows, self.teacher_ids, self.teacher_logprobs = windows, teacher_ids, teacher_logprobs

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.windows[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids,
                "teacher_ids": self.teacher_ids[i], "teacher_logprobs": self.teacher_logprobs[i]}


def distillation_loss(logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p || q) over k + 1 outcomes: the teacher's top-k tokens, and the rest of the
    vocabulary as one outcome (p's rest: the mass the teacher leaves outside its top k; q's: the model's mass
    outside those k tokens). 0 only when the model gives each top-k token and the rest the teacher's mass.
    The rest matters: without it a model lowers the loss by moving its tail mass onto the top k, which makes
    it overconfident and raises its cross-entropy on text whose next token is outside them.
    logits [B, T, V]; teacher tensors [B, T, k]."""
    logits = logits.float()
    log_q_top = logits.gather(-1, teacher_ids.long()) - logits.logsumexp(-1, keepdim=True)
    log_p_top = teacher_logprobs.float()
    # each rest from its k probabilities (no second pass over the vocabulary, which ran every forward); float16
    # targets can sum to a little over 1, and a float32 sum near 1 resolves a rest of about 1e-7 at best
    p_rest = (1 - log_p_top.exp().sum(-1)).clamp(min=0)
    q_rest = (1 - log_q_top.exp().sum(-1)).clamp(min=1e-7)
    top = (log_p_top.exp() * (log_p_top - log_q_top)).sum(-1)
    rest = torch.xlogy(p_rest, p_rest) - p_rest * q_rest.log()  # 0 where the teacher leaves no rest
    return (top + rest).mean()


class DistillZOTrainer(ZOTrainer):
    """ZOTrainer on ``distillation_loss``; the examples carry ``teacher_ids`` / ``teacher_logprobs``
    (``TeacherWindows``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # label columns are kept by the Trainer (not dropped as unknown to the model) and mark an
        # evaluation batch as one with a loss
        self.label_names = ["labels", *TEACHER_KEYS]

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Optional[torch.Tensor] = None):
        teacher_ids, teacher_logprobs = (inputs.pop(key) for key in TEACHER_KEYS)
        inputs.pop("labels", None)  # the model's own cross-entropy is not wanted
        outputs = model(**inputs)
        loss = distillation_loss(outputs.logits, teacher_ids, teacher_logprobs)
        return (loss, outputs) if return_outputs else loss
