"""What a run reports: the metrics table (one column per stage), the Markdown report, the loss curve."""

from __future__ import annotations

import math
from typing import Optional

import yaml

from .distill import TOP_K
from .recipe import GENERATED, held_out_corpora, train_corpora

STAGES = ("fp", "rtn", "init", "zeroqat")  # the columns of the metrics table, in the order a run makes them


def loss_figure(history: list[dict]):
    """The training loss (and the held-out loss, when measured) against the step, as a matplotlib Figure."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, Agg renders the PNG

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for key, label in (("loss", "training (mean of the two SPSA passes)"), ("eval_loss", "held-out")):
        points = [(e["step"], e[key]) for e in history if key in e and "step" in e]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=label)
    if len(ax.lines) > 1:
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("ZeroQAT training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def metrics_table(metrics: dict[str, dict[str, float]]) -> str:
    """A Markdown table: one row per metric, one column per stage."""
    stages = [s for s in STAGES if s in metrics] or list(metrics)
    names = list(dict.fromkeys(k for s in stages for k in metrics[s]))
    lines = ["| metric | " + " | ".join(stages) + " |", "|---" * (len(stages) + 1) + "|"]
    for name in names:
        cells = [format_value(metrics[s].get(name)) for s in stages]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_value(value: Optional[float]) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.2f}" if abs(value) >= 1.5 else f"{value:.4f}"


def outcome_lines(metrics: dict) -> str:
    """What a reader must not miss: training stopped, the start kept, or ZeroQAT no better than the init."""
    lines = []
    if metrics.get("zeroqat_stopped"):
        lines.append(f"**Training was stopped by the divergence guard** at {metrics['zeroqat_stopped']}.")
    if metrics.get("zeroqat_kept") == "start":
        lines.append("**ZeroQAT kept the starting model**: no later model had a lower held-out loss, so the "
                     "`zeroqat` column is the init.")
    init, trained = metrics.get("init", {}), metrics.get("zeroqat", {})
    worse = [k for k in trained if k.endswith("_ppl") and k in init and trained[k] >= init[k]]
    if worse:
        lines.append(f"**ZeroQAT is not better than the init** on {', '.join(worse)}.")
    return "".join("\n" + line for line in lines)


def sampled_text(train: dict) -> str:
    temperature = train["sample_temperature"]
    return "text sampled from the full-precision model" + (f" at temperature {temperature}" if temperature != 1 else "")


def held_out_check(recipe: dict) -> str:
    """The sentence on the held-out check that chose the kept checkpoint, for language modelling with one."""
    t = recipe["train"]
    if recipe["task"] is not None or not t["eval_steps"]:
        return ""
    held_out = held_out_corpora(recipe)
    text = sampled_text(t) if held_out == [GENERATED] else (
        f"the validation split of {' and '.join(held_out)}")
    return (f"\nEvery {t['eval_steps']} steps a held-out check on {t['eval_windows']} windows of {text}; the "
            "best model, the start included, is kept.")


def report(recipe: dict, metrics: dict, timings: dict, device: str) -> str:
    q, t = recipe["quant"], recipe["train"]
    bits = f"W{q['w_bits']}A{q['a_bits']}" + (f"KV{q['kv_bits']}" if q["kv_bits"] < 16 else "")
    steps = f"{t['steps']} ZO steps at batch {t['batch_size']}"
    if recipe["task"] is None:
        text = " and ".join(train_corpora(recipe))
        if t["data"] == GENERATED:
            text = sampled_text(t)
        steps += f" x {t['seq_len']} tokens of {text}"
        if t["loss"] == "distill":
            steps += f" (loss: KL to the full-precision model's top-{TOP_K} next tokens)"
    ev = recipe["eval"]
    tasks = ""
    if ev["tasks"]:
        docs = f"the first {ev['limit']} documents" if ev["limit"] else "every document"
        tasks = f"\nZero-shot: {docs} of each task's evaluation split"
        if isinstance(ev["limit"], int):  # a binomial standard error is at most 0.5 / sqrt(n)
            tasks += f"; each accuracy carries a standard error of up to {0.5 / math.sqrt(ev['limit']):.3f}"
        tasks += "."
    start = f"the adapter in {recipe['start_from']}" if recipe["start_from"] else (
        "the calibrated model" if q["init"] == "calibrate" else "the RTN model")
    time_rows = "\n".join(f"| {k} | {v:.1f} |" for k, v in timings.items())
    return f"""# ZeroQAT run `{recipe['name']}`

{recipe['model']}, {bits} group size {q['group_size']}, trainable {q['trainable']}, init {q['init']};
{steps}, {t['step']} step, lr {t['lr']}, eps {t['eps']}; device {device}.{held_out_check(recipe)}
Perplexity: {ev['split']} split, windows of {ev['seq_len']} tokens (at most {ev['max_windows'] or 'all'} per corpus).{tasks}
`init` is the model ZO training starts from ({start}).{outcome_lines(metrics)}

{metrics_table(metrics)}

![training loss](loss_curve.png)

## Timings (seconds)

| stage | seconds |
|---|---|
{time_rows}

## Settings

```yaml
{yaml.safe_dump(recipe, sort_keys=False).rstrip()}
```
"""
