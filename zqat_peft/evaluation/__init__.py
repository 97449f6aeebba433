"""Evaluation: paper-style perplexity and lm-eval harness zero-shot tasks."""

from .perplexity import encode_joined, perplexity, token_windows
from .zeroshot import (HEADLINE_METRIC, ZERO_SHOT_TASKS, available_tasks, headline, paired_difference, task_manager,
                       zero_shot, zero_shot_documents)

__all__ = [
    "HEADLINE_METRIC",
    "ZERO_SHOT_TASKS",
    "available_tasks",
    "encode_joined",
    "headline",
    "paired_difference",
    "perplexity",
    "task_manager",
    "token_windows",
    "zero_shot",
    "zero_shot_documents",
]
