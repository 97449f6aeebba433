"""Zero-shot accuracy of saved adapters on the same documents, each against the first, with the standard
error of the paired difference.

Two models scored on the same documents are compared only where they disagree, so their difference is known
better than from the ~0.02-0.03 standard error of each accuracy on a few hundred documents: this is the
check that a trained model's zero-shot accuracy did not fall below its initialization. Prints a table and writes JSON
(with every per-document score, 1 or 0 on each task's headline metric).

    python benchmarks/zero_shot_paired.py --recipe runs/NAME/config.yaml --adapter init=runs/NAME/init_adapter
        --adapter trained=runs/NAME/adapter --tasks hellaswag piqa arc_easy --limit 300
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from zqat_peft.evaluation import paired_difference, zero_shot_documents
from zqat_peft.pipeline import load_adapter, pick_device
from zqat_peft.recipe import load_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True, help="the recipe the adapters were trained with (base model, dtype)")
    parser.add_argument("--adapter", action="append", required=True, metavar="NAME=PATH",
                        help="an adapter to score; the first is the reference the others are compared with")
    parser.add_argument("--tasks", nargs="+", default=["hellaswag", "piqa", "arc_easy"])
    parser.add_argument("--limit", type=int, default=300, help="the first LIMIT documents of each task")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/zero_shot_paired.json")
    args = parser.parse_args()
    adapters = dict(parse_adapter(a) for a in args.adapter)
    if len(adapters) < 2:
        raise SystemExit("give at least two --adapter NAME=PATH with different names: a reference and one to compare")
    recipe = load_recipe(args.recipe)
    device = pick_device()
    scores, seconds = {}, {}
    for name, path in adapters.items():
        start = time.perf_counter()
        model, tokenizer = load_adapter(recipe, path, device)
        scores[name] = zero_shot_documents(model, tokenizer, args.tasks, limit=args.limit, batch_size=args.batch_size)
        seconds[name] = time.perf_counter() - start
        del model
    rows = compare(scores, args.tasks)
    print_table(rows, list(adapters))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": {"recipe": args.recipe, "adapters": adapters, "tasks": args.tasks,
                                        "limit": args.limit, "device": device, "seconds": seconds},
                               "rows": rows, "scores": scores}, indent=2))


def parse_adapter(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise SystemExit(f"--adapter takes NAME=PATH, got {text!r}")
    return name, path


def compare(scores: dict[str, dict[str, list[float]]], tasks: list[str]) -> list[dict]:
    """One row per task and one for the task average: each model's accuracy, and each model's difference
    from the first with its standard error (the average's: tasks are independent documents)."""
    reference, *others = scores
    rows = []
    for task in tasks:
        row = {"task": task, "documents": len(scores[reference][task]),
               "accuracy": {name: sum(s[task]) / len(s[task]) for name, s in scores.items()}, "difference": {}}
        for name in others:
            row["difference"][name] = paired_difference(scores[reference][task], scores[name][task])
        rows.append(row)
    average = {"task": "average", "documents": sum(r["documents"] for r in rows),
               "accuracy": {name: sum(r["accuracy"][name] for r in rows) / len(rows) for name in scores},
               "difference": {}}
    for name in others:
        diffs = [r["difference"][name] for r in rows]
        average["difference"][name] = (sum(d for d, _ in diffs) / len(rows),
                                       math.sqrt(sum(se**2 for _, se in diffs)) / len(rows))
    return rows + [average]


def print_table(rows: list[dict], names: list[str]) -> None:
    reference, *others = names
    header = ["task", "docs", *names, *(f"{n} - {reference}" for n in others)]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        cells = [row["task"], str(row["documents"]), *(f"{row['accuracy'][n]:.3f}" for n in names),
                 *(f"{row['difference'][n][0]:+.3f} +- {row['difference'][n][1]:.3f}" for n in others)]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
