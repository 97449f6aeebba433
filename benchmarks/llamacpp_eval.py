"""llama.cpp on a GGUF file: the next-token NLL of given token windows, and greedy continuations of prompts.

Run by benchmarks/gguf_llamacpp.py and tests/test_gguf_llamacpp.py with the Python of an environment that has
llama-cpp-python (built from source; see gguf_llamacpp.py). Imports nothing from zqat_peft, nor torch.

Each window is fed as token ids (no BOS added), alone in a fresh KV cache, and scored as
zqat_peft.evaluation.perplexity scores one: the logits at positions 0..n-2 against the tokens at 1..n-1.
Prompts are tokenized by llama.cpp from the file's own tokenizer metadata (BOS as the metadata says) and
continued greedily for exactly ``--new-tokens`` tokens (the argmax of the logits, no early stop at EOS, so that
the continuations of two runtimes compare token for token).

The model loads without llama.cpp's extra CPU buffer types (its ``--no-repack``): on CPUs with AMX those
repack Q4_1 weights for ``ggml_backend_amx_mul_mat``, which crashes with a segmentation fault on the first
decode of our SmolLM2 file (llama-cpp-python 0.3.36 built with GGML_NATIVE on a Xeon with AMX-INT8; upstream
reports the same crash with other models, ggml-org/llama.cpp#20824). ``--extra-buffers`` turns them back on.

    python benchmarks/llamacpp_eval.py MODEL.gguf WINDOWS.npy OUT.json [--prompts PROMPTS.json] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def window_nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Sum of -log p(ids[i+1] | ids[:i+1]) over i = 0..n-2; ``logits`` [n, vocab] float32, ``ids`` [n]."""
    predicting = logits[:-1].astype(np.float64)
    peak = predicting.max(axis=1, keepdims=True)
    log_normalizer = np.log(np.exp(predicting - peak).sum(axis=1)) + peak[:, 0]
    target_logits = predicting[np.arange(len(ids) - 1), ids[1:]]
    return float((log_normalizer - target_logits).sum())


def score_windows(llm, windows: np.ndarray) -> list[float]:
    """The NLL sum of every window [n_windows, n_ctx], each evaluated alone from an empty KV cache."""
    nlls = []
    for ids in windows:
        llm.reset()  # n_tokens = 0: eval() then removes every cached position before decoding
        llm.eval(ids.tolist())
        nlls.append(window_nll(llm.scores[: len(ids)], ids))
    return nlls


def greedy(llm, prompt: str, new_tokens: int) -> dict:
    """llama.cpp's tokens of ``prompt`` and its greedy continuation (ids and text)."""
    prompt_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)
    llm.reset()
    llm.eval(prompt_ids)
    generated: list[int] = []
    for _ in range(new_tokens):
        generated.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([generated[-1]])
    text = llm.detokenize(generated).decode("utf-8", errors="replace")
    return {"prompt": prompt, "prompt_ids": prompt_ids, "ids": generated, "text": text}


def load(model: str, seq_len: int, threads: int | None, extra_buffers: bool):
    """A llama_cpp.Llama with every logit kept, a context of one window, and the extra buffer types on or off."""
    import llama_cpp
    from llama_cpp import llama as llama_module

    # Llama() builds its model parameters from llama_model_default_params() and exposes no use_extra_bufts
    default_params = llama_module.llama_cpp.llama_model_default_params

    def model_params():
        params = default_params()
        params.use_extra_bufts = extra_buffers
        return params

    llama_module.llama_cpp.llama_model_default_params = model_params
    try:
        return llama_cpp.Llama(model_path=model, n_ctx=seq_len, n_batch=seq_len, n_ubatch=seq_len, logits_all=True,
                               n_threads=threads, n_threads_batch=threads, verbose=False)
    finally:
        llama_module.llama_cpp.llama_model_default_params = default_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a .gguf file")
    parser.add_argument("windows", help="a .npy file holding an int [n, seq_len] array of token ids")
    parser.add_argument("out", help="where to write the JSON result")
    parser.add_argument("--prompts", default=None, help="a JSON list of prompts to continue greedily")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp's threads (default: its own choice)")
    parser.add_argument("--extra-buffers", action="store_true",
                        help="let llama.cpp repack weights into its extra CPU buffer types (AMX, repack)")
    args = parser.parse_args()

    import llama_cpp

    windows = np.load(args.windows).astype(np.int64)
    seq_len = windows.shape[1]
    llm = load(args.model, seq_len, args.threads, args.extra_buffers)
    start = time.perf_counter()
    nlls = score_windows(llm, windows)
    seconds = time.perf_counter() - start
    prompts = json.loads(open(args.prompts).read()) if args.prompts else []
    result = {
        "llama_cpp_python": llama_cpp.__version__, "n_ctx": seq_len, "windows": len(windows),
        "nll_sum": sum(nlls), "count": len(windows) * (seq_len - 1), "window_nll": nlls,
        "seconds": round(seconds, 1), "threads": llm.context_params.n_threads_batch,
        "extra_buffers": args.extra_buffers,
        "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model))),
        "continuations": [greedy(llm, prompt, args.new_tokens) for prompt in prompts],
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"llama.cpp: {len(windows)} windows of {seq_len} in {seconds:.0f} s")


if __name__ == "__main__":
    main()
