"""Exporting a ZeroQAT model to the checkpoint formats inference runtimes load.

``save_gptq`` (transformers + GPTQModel, vLLM), ``save_compressed_tensors`` (vLLM, transformers),
``save_gguf`` (llama.cpp) and ``save_merged`` (plain float weights) each write a complete folder (or, for
GGUF, one file) from the model's codes, scales and zero points; ``load_quantized`` reads a GPTQ or
compressed-tensors folder back into a packed ZeroQAT model.
"""

from .compressed_tensors import save_compressed_tensors
from .gguf import save_gguf
from .gptq import save_gptq
from .load import load_quantized
from .merged import save_merged
from .report import ExportReport
from .weights import ExportWarning, QuantizedLinear, quantized_linear

__all__ = [
    "ExportReport", "ExportWarning", "QuantizedLinear", "load_quantized", "quantized_linear", "save_compressed_tensors",
    "save_gguf", "save_gptq", "save_merged",
]
