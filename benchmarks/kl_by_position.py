"""How far saved adapters are from the full-precision model, by corpus and by position in the window.

ZO training distils on short windows (train.seq_len, 128 tokens in the CPU recipes) and perplexity is measured
on 512-token windows: a training that brings the first positions closer to the full-precision model can move
the later ones away. For each corpus (the wiki test split, and the Lee news and Austen text no recipe trains
on), 512-token windows: the cross-entropy on the text, and KL(full precision || quantized) over the whole
vocabulary, averaged over all positions, the first 128 and the rest; and for each adapter after the first, the
change of its cross-entropy from the first's with the standard error of that paired difference over windows (a
change smaller than about two of them is not told apart from which windows were drawn). Prints tables and writes
JSON.

    python benchmarks/kl_by_position.py --recipe recipes/smollm2_w4a4_cpu.yaml --adapter init=PATH \
        --adapter trained=PATH --windows 16
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from zqat_peft.data import load_model_and_tokenizer, load_text
from zqat_peft.evaluation.perplexity import encode_joined, token_windows
from zqat_peft.pipeline import load_adapter
from zqat_peft.recipe import load_recipe

CORPORA = ("wiki", "lee", "austen")
SPLIT_AT = 128  # the CPU recipes' training window


@torch.no_grad()
def log_probs(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """[n, T, V] float32 next-token log-probabilities."""
    return torch.cat([model(input_ids=b).logits.float().log_softmax(-1) for b in windows.split(batch_size)])


@torch.no_grad()
def distances(model: torch.nn.Module, windows: torch.Tensor, reference: torch.nn.Module, batch_size: int = 4) -> dict:
    """Cross-entropy on the text and KL(reference || model) per position, averaged as the module docstring says.
    The reference's log-probabilities are computed a batch at a time beside the model's: held for every window
    they would take 0.1 GB a window, 15 GB for the 147 windows of the whole wiki test split."""
    ce, kl = [], []
    for i in range(0, len(windows), batch_size):
        ids = windows[i:i + batch_size]
        ref, lq = log_probs(reference, ids, batch_size), log_probs(model, ids, batch_size)
        ce.append(-lq[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1))
        kl.append((ref.exp() * (ref - lq)).sum(-1))
    ce, kl = torch.cat(ce), torch.cat(kl)
    return {"ce": float(ce.mean()), "ce_per_window": ce.mean(-1).tolist(), "kl": float(kl.mean()),
            f"kl_first_{SPLIT_AT}": float(kl[:, :SPLIT_AT].mean()), f"kl_after_{SPLIT_AT}": float(kl[:, SPLIT_AT:].mean())}


def print_paired_ce(rows: list[dict]) -> None:
    """Each adapter's cross-entropy change from the first adapter's, per corpus, with its paired standard error."""
    first = {r["corpus"]: torch.tensor(r["ce_per_window"]) for r in rows if r["adapter"] == rows[0]["adapter"]}
    print(f"\n| adapter | corpus | ce - {rows[0]['adapter']}'s | paired standard error |\n|---|---|---|---|")
    for r in rows:
        if r["adapter"] != rows[0]["adapter"]:
            diff = torch.tensor(r["ce_per_window"]) - first[r["corpus"]]
            r["ce_change"], r["ce_change_se"] = float(diff.mean()), float(diff.std() / len(diff) ** 0.5)
            print(f"| {r['adapter']} | {r['corpus']} | {r['ce_change']:+.4f} | {r['ce_change_se']:.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True, help="the recipe the adapters were trained with (base model)")
    parser.add_argument("--adapter", action="append", required=True, metavar="NAME=PATH")
    parser.add_argument("--windows", type=int, default=16, help="512-token windows per corpus")
    parser.add_argument("--corpora", nargs="+", default=list(CORPORA), choices=CORPORA)
    parser.add_argument("--out", default="benchmarks/results/kl_by_position.json")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    fp, tokenizer = load_model_and_tokenizer(recipe["model"])
    windows = {c: token_windows(encode_joined(tokenizer, load_text(c, "test")), 512, args.windows)
               for c in args.corpora}
    rows = []
    print(f"| adapter | corpus | ce | kl | kl first {SPLIT_AT} | kl after {SPLIT_AT} |\n|---|---|---|---|---|---|")
    for name, path in (a.split("=", 1) for a in args.adapter):
        model, _ = load_adapter(recipe, path, "cpu")
        for corpus, w in windows.items():
            d = distances(model, w, fp)
            rows.append({"adapter": name, "corpus": corpus, "windows": len(w), **d})
            print(f"| {name} | {corpus} | {d['ce']:.4f} | {d['kl']:.4f} | {d[f'kl_first_{SPLIT_AT}']:.4f} | "
                  f"{d[f'kl_after_{SPLIT_AT}']:.4f} |", flush=True)
    print_paired_ce(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
