"""GGUF files (llama.cpp, ollama) of Llama-architecture ZeroQAT models, written with the ``gguf`` package.

Quantized layers go into Q4_1: per block of 32 input columns an fp16 scale ``d``, an fp16 offset ``m`` and 32
4-bit codes, dequantized as ``d * q + m``. Our 2/3/4-bit codes ``u`` with scale ``s`` and zero point ``z``
(``w = s * (u - z)``) fit with ``q = u``, ``d = fp16(s)``, ``m = fp16(-s * z)`` whenever the group size is a
multiple of 32 (each block repeats its group's ``d, m``). The codes are exact; the only error is the float16
rounding of ``d`` and ``m``, at most ``|q| * |s - d| + |s z + m|`` per weight, which ``q4_1_weight_error``
measures. 8-bit codes have no exact GGUF type and are refused.

Everything else is written as llama.cpp's converter writes a Llama model: names (``token_embd``,
``blk.N.attn_q`` ...), the query/key rows permuted from transformers' rotary layout to GGML's, norms and
embeddings unquantized, and the hyperparameters and GPT-2-style BPE tokenizer as metadata.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from .report import ExportReport
from .weights import (
    QuantizedLinear, base_model, float_tensors, quantized_linears, refuse_input_transforms, warn_dropped_activation_quantization,
)

Q4_1_BLOCK = 32
Q4_1_BITS = (2, 3, 4)
# transformers' Llama module names -> GGUF tensor names (llama.cpp's tensor map for LLM_ARCH_LLAMA)
_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def q4_1_params(q: QuantizedLinear) -> tuple[Tensor, Tensor]:
    """float16 (d, m) per block of 32 input columns, each [out, in/32]."""
    if q.bits not in Q4_1_BITS:
        raise ValueError(f"{q.bits}-bit codes have no exact GGUF type (Q4_1 holds 2-4 bits); export with format 'gptq'")
    if q.group_size % Q4_1_BLOCK:
        raise ValueError(f"Q4_1 blocks are 32 columns: group size {q.group_size} is not a multiple of 32")
    d = q.scale.half()
    m = (-q.scale * q.zero.float()).half()
    repeat = q.group_size // Q4_1_BLOCK
    return d.repeat_interleave(repeat, dim=1), m.repeat_interleave(repeat, dim=1)


def q4_1_blocks(q: QuantizedLinear) -> np.ndarray:
    """uint8 [out, in/32 * 20]: per block d (fp16), m (fp16), then qs[j] = q[j] | q[j+16] << 4."""
    d, m = q4_1_params(q)
    out_features, in_features = q.codes.shape
    codes = q.codes.reshape(out_features, in_features // Q4_1_BLOCK, Q4_1_BLOCK).to(torch.uint8)
    qs = codes[..., :16] | (codes[..., 16:] << 4)
    header = torch.stack([d, m], dim=-1).contiguous().view(torch.uint8)  # [out, blocks, 4], little-endian fp16
    return torch.cat([header, qs], dim=-1).reshape(out_features, -1).numpy()


def q4_1_weight(q: QuantizedLinear) -> Tensor:
    """The weight llama.cpp computes from the Q4_1 blocks (``d * q + m`` in float32), [out, in]."""
    d, m = q4_1_params(q)
    out_features, in_features = q.codes.shape
    codes = q.codes.float().reshape(out_features, in_features // Q4_1_BLOCK, Q4_1_BLOCK)
    return (codes * d.float().unsqueeze(-1) + m.float().unsqueeze(-1)).reshape(out_features, in_features)


def q4_1_weight_error(q: QuantizedLinear) -> float:
    """Largest difference between llama.cpp's Q4_1 weight and ours."""
    return float((q4_1_weight(q) - q.dequantize()).abs().max())


def permute_rotary_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the output rows of q/k from transformers' rotary layout (halves) to GGML's (interleaved pairs)."""
    shape = rows.shape
    head_dim = shape[0] // n_head
    return rows.reshape(n_head, 2, head_dim // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def gguf_name(name: str) -> str:
    """The GGUF name of a transformers Llama tensor name (without its ``.weight``/``.bias`` suffix)."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    parts = name.split(".")
    if parts[:2] != ["model", "layers"] or ".".join(parts[3:]) not in _LAYER_NAMES:
        raise ValueError(f"{name}: not a tensor of a Llama model that GGUF's llama architecture names")
    return f"blk.{parts[2]}.{_LAYER_NAMES['.'.join(parts[3:])]}"


def _float_array(tensor: Tensor) -> np.ndarray:
    """Norms in float32 (llama.cpp wants 1-D tensors in F32); other float tensors in their own dtype."""
    if tensor.dim() == 1 or tensor.dtype == torch.float32:
        return tensor.float().numpy()
    if tensor.dtype == torch.float16:
        return tensor.numpy()
    raise ValueError(f"a {tensor.dtype} tensor has no lossless GGUF type here; load the model in float32 or float16")


def save_gguf(
    model: nn.Module, out_file: str | os.PathLike, tokenizer: Optional[Any] = None, tokenizer_pre: str = "default",
) -> ExportReport:
    """Write one GGUF file (Q4_1 quantized layers) of a Llama-architecture ZeroQAT model.

    ``tokenizer``: the model's tokenizer (a GPT-2-style byte-level BPE, as SmolLM2's). ``tokenizer_pre``: the
    name llama.cpp gives its pre-tokenizer (``"smollm"`` for SmolLM2; llama.cpp's converter finds it from a
    hash of the tokenizer's output).
    """
    import gguf

    base = base_model(model)
    config = base.config
    if config.model_type != "llama":
        raise ValueError(f"GGUF export writes the llama architecture; this model is {config.model_type!r}")
    if tokenizer is None:
        raise ValueError("a GGUF file carries its tokenizer: pass the model's tokenizer")
    out = Path(out_file)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new file for the export")
    layers = quantized_linears(model)
    refuse_input_transforms(layers, "GGUF")
    for q in layers.values():
        q4_1_params(q)  # refuse what Q4_1 cannot hold before writing anything
    dropped = warn_dropped_activation_quantization(model)
    error = max(q4_1_weight_error(q) for q in layers.values())

    writer = gguf.GGUFWriter(str(out) + ".tmp", "llama")
    _add_hyperparameters(writer, config)
    _add_tokenizer(writer, tokenizer, tokenizer_pre, config.vocab_size)
    n_head, n_kv_head = config.num_attention_heads, config.num_key_value_heads
    for name, tensor in float_tensors(model).items():
        module, kind = name.rsplit(".", 1)
        writer.add_tensor(f"{gguf_name(module)}.{kind}", _float_array(tensor))
    for name, q in layers.items():
        blocks = q4_1_blocks(q)
        if name.endswith("q_proj"):
            blocks = permute_rotary_rows(blocks, n_head)
        elif name.endswith("k_proj"):
            blocks = permute_rotary_rows(blocks, n_kv_head)
        writer.add_tensor(f"{gguf_name(name)}.weight", blocks, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
        if q.bias is not None:
            raise ValueError(f"{name} has a bias, which GGUF's llama architecture has no tensor for")
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(str(out) + ".tmp", out)
    finally:
        Path(str(out) + ".tmp").unlink(missing_ok=True)
    return ExportReport(out, "gguf (Q4_1)", dropped, error)


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type {rope['rope_type']!r} is not written to GGUF here; only plain RoPE is")
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _add_hyperparameters(writer, config) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(writer, tokenizer, tokenizer_pre: str, vocab_size: int) -> None:
    """GPT-2-style BPE: tokens by id (padded to the model's vocabulary), their types, merges, special ids."""
    import gguf

    vocab = tokenizer.get_vocab()
    by_id = {i: token for token, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    special = set(tokenizer.all_special_tokens)
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if token in special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        if not (Path(folder) / "tokenizer.json").is_file():
            raise ValueError("GGUF export needs a fast (tokenizer.json) byte-level BPE tokenizer")
        gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer)
