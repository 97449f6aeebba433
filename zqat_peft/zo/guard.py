"""DivergenceGuard: stop a ZO run whose loss runs away, and end it with the best model seen, not the last.

A ZO step too large for a model (another family, another bit width) does not fail: the loss climbs and the
run would save a model far worse than its start. The guard watches two signals:

- the held-out loss (each evaluation, the step-0 one included): it stops when the loss is more than
  ``eval_margin`` above the best so far. The held-out windows are fixed, so this loss has no sampling noise
  between evaluations; what moves it is training. The margin, log(1.5) (perplexity x1.5), is many times
  what a healthy run moves it by between two evaluations (benchmarks/RESULTS.md) and far below a
  diverging run's jump;
- the training loss (the mean of each step's two SPSA losses): it stops when the mean of the last
  ``window`` steps is more than ``train_margin`` above the mean of the first ``window``. Each step sees
  another batch, so this signal is noisier and its margin wider, log(2).

On stopping it warns and says why (``stopped``). The best model comes back as follows: with
``load_best_model_at_end`` the Trainer loads the best checkpoint; if the start was better than every
checkpoint (or there is none) and ``keep_start`` is on, the guard restores the trainable weights it copied
to the CPU when training began (``restored``). With ``keep_start=False`` (e.g. when the caller saved the
start itself) it only stops and warns.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Optional

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class DivergenceGuard(TrainerCallback):
    def __init__(self, eval_margin: float = math.log(1.5), train_margin: float = math.log(2.0), window: int = 10,
                 keep_start: bool = True) -> None:
        if eval_margin <= 0 or train_margin <= 0:
            raise ValueError(f"DivergenceGuard margins must be positive, got {eval_margin} and {train_margin}.")
        if window < 1:
            raise ValueError(f"DivergenceGuard window must be at least 1 step, got {window}.")
        self.eval_margin = eval_margin
        self.train_margin = train_margin
        self.window = window
        self.keep_start = keep_start
        self.start_eval_loss: Optional[float] = None  # the held-out loss at step 0, when measured
        self.best_eval_loss: Optional[float] = None
        self.step_losses: list[float] = []
        self.stopped: Optional[str] = None  # why training was stopped, if it was
        self.restored: Optional[str] = None  # "start" when the guard put the starting weights back
        self._start_weights: Optional[list[torch.Tensor]] = None

    # ------------------------------------------------------------------ signals

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.step_losses = []
        if self.keep_start and model is not None:
            self._start_weights = [p.detach().to("cpu", copy=True) for p in _trainable(model)]

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        loss = getattr(getattr(optimizer, "optimizer", optimizer), "last_loss", None)
        if loss is None or not math.isfinite(loss):
            return
        self.step_losses.append(loss)
        n = self.window
        if len(self.step_losses) >= 2 * n:
            first = sum(self.step_losses[:n]) / n
            recent = sum(self.step_losses[-n:]) / n
            if recent > first + self.train_margin:
                self._stop(control, state.global_step,
                           f"the training loss (mean of the last {n} steps) {recent:.4f} is more than "
                           f"{self.train_margin:.3f} above the first {n} steps' {first:.4f}")

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        loss = (metrics or {}).get("eval_loss")
        if loss is None:
            return
        if state.global_step == 0:
            self.start_eval_loss = loss
        if not math.isfinite(loss):
            self._stop(control, state.global_step, f"the held-out loss is {loss}")
        elif self.best_eval_loss is not None and loss > self.best_eval_loss + self.eval_margin:
            self._stop(control, state.global_step,
                       f"the held-out loss {loss:.4f} is more than {self.eval_margin:.3f} above the best so far "
                       f"{self.best_eval_loss:.4f}")
        elif self.best_eval_loss is None or loss < self.best_eval_loss:
            self.best_eval_loss = loss

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.stopped is None or self._start_weights is None or model is None:
            return
        best_checkpoint = args.load_best_model_at_end and state.best_model_checkpoint is not None
        start_was_best = (self.start_eval_loss is not None and state.best_metric is not None
                          and self.start_eval_loss <= state.best_metric)
        if not best_checkpoint or start_was_best:
            with torch.no_grad():
                for p, start in zip(_trainable(model), self._start_weights):
                    p.copy_(start)
            self.restored = "start"
            logger.warning("Divergence guard: restored the weights training started from.")
        self._start_weights = None

    # ------------------------------------------------------------------ helpers

    def _stop(self, control, step: int, why: str) -> None:
        if self.stopped is not None:
            return
        self.stopped = f"step {step}: {why}"
        control.should_training_stop = True
        warnings.warn(f"ZO training diverged and was stopped at {self.stopped}. The best model is kept, not the "
                      "last; lower the learning rate (or zo_eps) to train further.", stacklevel=2)
        logger.warning("Divergence guard stopped training at %s", self.stopped)


def _trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
