"""Evaluation: paper-style perplexity and lm-eval harness zero-shot tasks."""

from .perplexity import encode_joined, perplexity, token_windows

__all__ = ["encode_joined", "perplexity", "token_windows"]
