"""llm-compressor's GPTQ on given calibration tokens; writes the quantized linear weights (dequantized).

Run by benchmarks/vs_ptq.py with the Python of an environment that has llm-compressor (its version pins
differ from the project's, so it lives apart; see vs_ptq.py). Imports nothing from zqat_peft.

    python benchmarks/llmc_gptq.py MODEL_DIR CALIB.pt OUT.pt --bits 3 --group-size 64 [--observer mse]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("calibration", help="a .pt file holding a [n, seq_len] tensor of token ids")
    parser.add_argument("out", help="where to write {linear name: quantized weight [out, in]}")
    parser.add_argument("--bits", type=int, required=True)
    parser.add_argument("--group-size", type=int, default=-1, help="-1: per output channel")
    parser.add_argument("--observer", default=None, help="weight observer (default: llm-compressor's own)")
    args = parser.parse_args()

    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    ids = torch.load(args.calibration)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    weights = dict(num_bits=args.bits, type="int", symmetric=False,
                   strategy="group" if args.group_size > 0 else "channel")
    if args.group_size > 0:
        weights["group_size"] = args.group_size
    if args.observer:
        weights["observer"] = args.observer
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights))
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    start = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=ids.shape[1],
            num_calibration_samples=ids.shape[0])
    seconds = time.perf_counter() - start
    quantized = {name: m.weight.detach().float().clone() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and hasattr(m, "weight_scale")}
    torch.save({"weights": quantized, "seconds": seconds}, args.out)
    print(f"llm-compressor GPTQ: {len(quantized)} layers in {seconds:.0f} s")


if __name__ == "__main__":
    main()
