"""Rotation of the residual stream (QuaRot-style), fused into the weights of a LLaMA-style model.

An RMSNorm without its weight commutes with any orthogonal Q: ``rms(x Q) = rms(x)``. So after folding
each norm's weight into the linear layers that read its output, the whole residual stream can be
carried rotated, ``x -> x Q``: the embeddings become ``E Q``, every layer reading the stream ``W Q``,
every layer writing into it ``Q^T W`` (its bias ``b Q``), and the model computes the same function.
Outliers of single residual channels are spread over all of them, which is what makes per-token
4-bit activations usable. Nothing runs at inference beyond the model itself: the result is a plain
transformers model with new weights (norm weights all ones, the LM head untied from the embeddings).

Q is a random orthogonal matrix (QR of a Gaussian, seeded): hidden sizes such as 576 are not powers of
two, and a random orthogonal matrix spreads outliers as a randomized Hadamard does, at the cost of a
dense product where a Hadamard has a fast transform (irrelevant here: Q is fused, never applied online).

The input of down_proj (the SwiGLU product) has massive per-channel outliers that no residual rotation
reaches. ``fuse_down_proj_hadamard`` writes ``W H`` into every down_proj weight, H the orthogonal Hadamard
matrix of the intermediate size (zqat_peft.hadamard: 1536 = 12 x 128); the model is then exact only once
each down_proj multiplies its input by H at run time, which ZeroQAT's layer does before quantizing it
(``ZeroQATConfig(rotate=True, online_hadamard=True)``, QuaRot's online Hadamard). That one online transform
is the only runtime addition; H is deterministic (no random signs: the outliers it must spread sit in
fixed channels, and a Hadamard spreads any single channel evenly).
"""

from __future__ import annotations

import torch
from torch import nn

from .hadamard import apply_hadamard, hadamard_factors

# (norm, layers reading its output) inside each decoder block, and the layers writing into the stream
_BLOCK_READERS = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                  ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))
_BLOCK_WRITERS = ("self_attn.o_proj", "mlp.down_proj")


def random_orthogonal(size: int, seed: int = 0) -> torch.Tensor:
    """A random orthogonal matrix [size, size], float64 (Haar-distributed: QR with sign correction)."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(size, size, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fold the RMSNorm weights into the following linears and rotate the residual stream; in place.

    ``model`` is a plain LLaMA-style transformers model (LLaMA, Mistral, Qwen2: ``model.model.layers``
    with ``input_layernorm``/``post_attention_layernorm``, RMSNorms that multiply by their weight). Apply
    it before quantizing (``get_peft_model``). Returns the model, which computes the same logits up to
    float rounding.
    """
    inner, head = _llama_parts(model)
    embed = inner.embed_tokens
    q = random_orthogonal(embed.weight.shape[1], seed)
    if head.weight is embed.weight:  # the head reads the rotated, norm-folded stream: it needs its own copy
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
        model.config.tie_word_embeddings = False
    _set(embed.weight, embed.weight.double() @ q)
    for block in inner.layers:
        for norm_name, reader_names in _BLOCK_READERS:
            _fold_and_rotate_readers(block.get_submodule(norm_name), [block.get_submodule(n) for n in reader_names], q)
        for name in _BLOCK_WRITERS:
            _rotate_writer(block.get_submodule(name), q)
    _fold_and_rotate_readers(inner.norm, [head], q)
    return model


DOWN_PROJ = "mlp.down_proj"


@torch.no_grad()
def fuse_down_proj_hadamard(model: nn.Module) -> int:
    """Replace every down_proj weight W by W H (H the orthogonal Hadamard matrix of its input size); in place.

    The model computes the same function only once each down_proj's input is multiplied by H at run time
    (``x H (W H)^T = x W^T``). Returns the Hadamard size; raises ValueError (before changing anything) for a
    model that is not LLaMA-style or an intermediate size with no Hadamard matrix here.
    """
    inner, _ = _llama_parts(model)
    size = inner.layers[0].get_submodule(DOWN_PROJ).in_features
    factors = hadamard_factors(size)
    for block in inner.layers:
        layer = block.get_submodule(DOWN_PROJ)
        _set(layer.weight, apply_hadamard(layer.weight.double(), factors))
    return size


def _fold_and_rotate_readers(norm: nn.Module, readers: list[nn.Linear], q: torch.Tensor) -> None:
    gamma = norm.weight.double()
    for layer in readers:
        _set(layer.weight, (layer.weight.double() * gamma) @ q)
    _set(norm.weight, torch.ones_like(gamma))


def _rotate_writer(layer: nn.Linear, q: torch.Tensor) -> None:
    _set(layer.weight, q.t() @ layer.weight.double())
    if layer.bias is not None:
        _set(layer.bias, layer.bias.double() @ q)


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data.copy_(value.to(param.dtype))


def _llama_parts(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    inner = getattr(model, "model", None)
    head = getattr(model, "lm_head", None)
    layers = getattr(inner, "layers", None)
    ok = head is not None and layers is not None and hasattr(inner, "embed_tokens") and hasattr(inner, "norm")
    if ok:
        block = layers[0]
        names = [n for n, _ in _BLOCK_READERS] + [r for _, rs in _BLOCK_READERS for r in rs] + list(_BLOCK_WRITERS)
        ok = all(_has(block, n) for n in names) and type(block.input_layernorm).__name__.endswith("RMSNorm")
        ok = ok and "Gemma" not in type(block.input_layernorm).__name__  # Gemma's norm scales by 1 + weight
    if not ok:
        raise ValueError(
            f"rotate_model handles LLaMA-style models (LLaMA, Mistral, Qwen2), not {type(model).__name__}: it needs "
            "model.model.layers with RMSNorms input_layernorm/post_attention_layernorm, q/k/v/o_proj, "
            "gate/up/down_proj, model.model.norm and lm_head. Quantize this model without rotation."
        )
    return inner, head


def _has(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True
