"""Reference figures of the registered models: size, full-precision wiki perplexity, CPU forward time.

For each model: parameter count, token-level perplexity of the first 16 windows of 512 tokens of the
Wikipedia test split (the demo's evaluation subset; text joined with "\\n\\n") and the bits per character
it amounts to (comparable across tokenizers), and the median wall time
of a no-grad forward pass over a batch of 4 x 128 tokens (fp32, ``torch.get_num_threads()`` threads, after
one warm-up pass). The timed passes of all models are interleaved (one pass of each model per round), so
that their ratio to the first model holds even when the machine's load changes during the run. Models
that are not fetched yet are fetched first. Prints a table and writes JSON.

    python benchmarks/model_reference.py --out benchmarks/results/model_reference.json
    python benchmarks/model_reference.py --models smollm2-135m gemma3-270m
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from zqat_peft.data import MODELS, load_model_and_tokenizer, load_text, resolve_model_path
from zqat_peft.evaluation import encode_joined, perplexity, token_windows


def timed_forward(model: torch.nn.Module, ids: torch.Tensor) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    return time.perf_counter() - t0


def interleaved_forward_seconds(models: dict[str, torch.nn.Module], batch: int, seq_len: int,
                                repeats: int) -> dict[str, float]:
    """Median wall time of one forward over random token ids [batch, seq_len], per model, the models taking
    turns within each round."""
    gen = torch.Generator().manual_seed(0)
    ids = {name: torch.randint(0, m.config.vocab_size, (batch, seq_len), generator=gen) for name, m in models.items()}
    for name, model in models.items():
        timed_forward(model, ids[name])  # warm-up: first-call allocations
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            times[name].append(timed_forward(model, ids[name]))
    return {name: statistics.median(t) for name, t in times.items()}


def load_and_score(name: str, windows: int) -> tuple[torch.nn.Module, dict]:
    path = resolve_model_path(name)  # fetches a registered model on first use
    t0 = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(path)
    load_s = time.perf_counter() - t0
    marker = Path(path) / "_asset.json"
    info = json.loads(marker.read_text()) if marker.is_file() else {}
    test_windows = token_windows(encode_joined(tokenizer, load_text("wiki", "test")), 512, windows)
    ppl = perplexity(model, test_windows)
    # Per-token perplexities of tokenizers of different vocabularies do not compare; bits per character do.
    chars = len(tokenizer.decode(test_windows.flatten(), skip_special_tokens=True))
    return model, {
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "gguf_tensor_types": info.get("gguf_tensor_types"),
        "converted_bytes": info.get("bytes"),
        "load_s": load_s,
        "wiki_ppl_16x512": ppl,
        "wiki_bits_per_char": test_windows.numel() * math.log2(ppl) / chars,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), help="registered names or local folders")
    parser.add_argument("--windows", type=int, default=16, help="512-token test windows evaluated")
    parser.add_argument("--repeats", type=int, default=5, help="timed forward passes (median reported)")
    parser.add_argument("--out", default="benchmarks/results/model_reference.json")
    args = parser.parse_args()

    results = {"meta": {"threads": torch.get_num_threads(), "torch": torch.__version__, "windows": args.windows,
                        "repeats": args.repeats}}
    models = {}
    for name in args.models:
        models[name], results[name] = load_and_score(name, args.windows)
        print(f"{name}: {results[name]['architecture']}, {results[name]['parameters']:,} parameters, "
              f"wiki ppl {results[name]['wiki_ppl_16x512']:.2f}", flush=True)
    seconds = interleaved_forward_seconds(models, 4, 128, args.repeats)
    first = args.models[0]
    for name in args.models:
        results[name]["forward_4x128_s"] = seconds[name]
        results[name]["forward_vs_first"] = seconds[name] / seconds[first]

    print(f"\n| model | architecture | parameters | wiki ppl (16 x 512) | bits/char | forward 4 x 128 (s) | "
          f"vs {first} |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        r = results[name]
        print(f"| {name} | {r['architecture']} | {r['parameters']:,} | {r['wiki_ppl_16x512']:.2f} | "
              f"{r['wiki_bits_per_char']:.3f} | {r['forward_4x128_s']:.2f} | {r['forward_vs_first']:.2f}x |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
