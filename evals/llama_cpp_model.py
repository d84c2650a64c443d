"""A GGUF model in llama.cpp (llama-cpp-python), scored the lean way.

Only the positions that are scored ask llama.cpp for logits (the second half of a window), and
they are read straight from llama.cpp's buffer as one numpy array: no per-token Python lists.
Chat goes through the model's own template (``tokenizer.chat_template`` in the GGUF).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from evals.perplexity import log_softmax_nll
from merge_core.errors import SelfMergeError


def reusable_prefix(cached: Sequence[int], tokens: Sequence[int]) -> int:
    """How many leading tokens a KV cache holding ``cached`` can keep for ``tokens`` (at least the
    last token is always fed again: its logits are the ones wanted)."""
    keep = 0
    while keep < min(len(cached), len(tokens) - 1) and cached[keep] == tokens[keep]:
        keep += 1
    return keep


def load_without_weight_repacking() -> None:
    """Load every llama.cpp model without its "extra buffer types" (``use_extra_bufts=false``, the
    ``--no-repack`` of llama.cpp's tools). On CPUs with AMX (Sapphire Rapids and later) llama.cpp
    repacks weights into AMX tiles at load, and the first decode after that segfaults on some of
    those machines (llama.cpp #20824), this project's CI machine among them. The plain CPU kernels
    score the same; the repacked ones only speed up a few types. llama-cpp-python does not expose
    the flag, so its default model parameters are wrapped, once per process."""
    from llama_cpp import llama_cpp as lib

    default = lib.llama_model_default_params
    if getattr(default, "selfmerge_no_repack", False):
        return

    def no_repack():
        params = default()
        params.use_extra_bufts = False
        return params

    no_repack.selfmerge_no_repack = True
    lib.llama_model_default_params = no_repack


class LlamaCppModel:
    def __init__(self, path: str | Path, n_ctx: int = 512, threads: Optional[int] = None, batch: int = 512) -> None:
        import llama_cpp

        load_without_weight_repacking()
        self._lib = llama_cpp
        path = Path(path)
        if not path.is_file():
            raise SelfMergeError(f"model file not found: {path}")
        threads = threads or len(os.sched_getaffinity(0)) or 1  # the cores it may use (sweep.workers splits them)
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=min(batch, n_ctx),
                n_ubatch=min(batch, n_ctx),
                n_threads=threads,
                n_threads_batch=threads,
                logits_all=False,
                verbose=False,
            )
        except (ValueError, RuntimeError) as err:
            raise SelfMergeError(f"llama.cpp could not load {path}: {err}") from None
        self.n_ctx = n_ctx
        self.n_batch = min(batch, n_ctx)
        self.n_vocab = self.llm.n_vocab()
        self._batch = None
        self._cached: list[int] = []  # tokens in the KV cache, for next_token_logprobs
        self._formatter = None  # the chat template, compiled on first use

    # -- tokenizer --------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    @property
    def bos_for_windows(self) -> Optional[int]:
        """The BOS token llama.cpp puts at the start of each window, if the model adds one."""
        return self.llm.token_bos() if self.llm._model.add_bos_token() else None

    # -- chat -------------------------------------------------------------------------------
    def _chat_template(self) -> str:
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise SelfMergeError("the model has no chat template (tokenizer.chat_template) in its GGUF metadata")
        return template

    def chat(self, messages: list[dict], max_tokens: int) -> str:
        """Greedy reply through the model's own chat template."""
        self._chat_template()
        self._cached = []  # generation reuses llama.cpp's KV cache its own way
        reply = self.llm.create_chat_completion(
            messages=messages, temperature=0.0, top_k=1, repeat_penalty=1.0, max_tokens=max_tokens, seed=0
        )  # fmt: skip
        return reply["choices"][0]["message"]["content"] or ""

    def chat_prompt_tokens(self, messages: list[dict]) -> list[int]:
        """The tokens create_chat_completion would feed for these messages (assistant turn opened)."""
        if self._formatter is None:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            def text(token: int) -> str:
                return self.llm._model.token_get_text(token) if token != -1 else ""

            self._formatter = Jinja2ChatFormatter(self._chat_template(), eos_token=text(self.llm.token_eos()), bos_token=text(self.llm.token_bos()))
        rendered = self._formatter(messages=messages)
        return self.llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)

    def next_token_logprobs(self, tokens: Sequence[int]) -> np.ndarray:
        """Log-probabilities of the token after ``tokens``; the KV cache keeps the longest common prefix
        with the previous call, so extending a context costs only its new tokens."""
        if not tokens:
            raise ValueError("next_token_logprobs needs at least one token")
        if len(tokens) > self.n_ctx:
            raise SelfMergeError(f"{len(tokens)} tokens do not fit the context of {self.n_ctx}")
        keep = self._keep_prefix(tokens, len(tokens) - 1)
        logits = self._decode(tokens[keep:], start=keep, want=lambda pos: pos == len(tokens) - 1)
        self._cached = list(tokens)
        row = logits[-1].astype(np.float64)
        return row - (np.log(np.exp(row - row.max()).sum()) + row.max())

    def _keep_prefix(self, tokens: Sequence[int], limit: int) -> int:
        """Keep in the KV cache what ``tokens`` share with the cached tokens, at most ``limit`` of them
        (the positions whose logits are wanted are fed again); how many were kept."""
        keep = min(reusable_prefix(self._cached, tokens), limit)
        lib, ctx = self._lib, self.llm.ctx
        self.llm.reset()  # llama-cpp-python's own prefix cache must not trust what we decode here
        lib.llama_memory_seq_rm(lib.llama_get_memory(ctx), 0, keep, -1)
        self._cached = list(tokens[:keep])
        return keep

    # -- scoring ----------------------------------------------------------------------------
    def _decode(self, tokens: Sequence[int], start: int, want) -> np.ndarray:
        """Feed tokens at positions start.. in batches; the logits rows of positions where want(pos)."""
        lib, ctx = self._lib, self.llm.ctx
        if self._batch is None:
            self._batch = lib.llama_batch_init(self.n_ctx, 0, 1)
        rows = []
        for chunk_start in range(0, len(tokens), self.n_batch):
            chunk = tokens[chunk_start : chunk_start + self.n_batch]
            batch = self._batch
            batch.n_tokens = len(chunk)
            n_logits = 0
            for i, token in enumerate(chunk):
                pos = start + chunk_start + i
                batch.token[i] = token
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = wanted = want(pos)
                n_logits += wanted
            status = lib.llama_decode(ctx, batch)
            if status != 0:
                raise RuntimeError(f"llama_decode failed with status {status}")
            if n_logits:
                pointer = lib.llama_get_logits(ctx)
                buffer = ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float * (n_logits * self.n_vocab))).contents
                rows.append(np.frombuffer(buffer, dtype=np.float32).reshape(n_logits, self.n_vocab).copy())
        return np.concatenate(rows) if rows else np.empty((0, self.n_vocab), dtype=np.float32)

    def scored_logits(self, window: Sequence[int], first: int) -> np.ndarray:
        """Raw logits predicting ``window[first + 1:]``, from an empty cache (one row per token)."""
        lib, ctx = self._lib, self.llm.ctx
        self.llm.reset()
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        self._cached = []
        return self._decode(window, start=0, want=lambda pos: first <= pos < len(window) - 1)

    def continuation_logprobs(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[float]:
        """log p(continuation | context) for each (context, continuation) of token ids, in order. The KV
        cache keeps what one request shares with the previous (an item's choices share its context), up
        to the last context token, whose logits predict the continuation's first token."""
        results = []
        for context, continuation in requests:
            tokens = [*context, *continuation]
            if len(tokens) > self.n_ctx:
                raise SelfMergeError(f"{len(tokens)} tokens do not fit the context of {self.n_ctx}")
            first = len(context) - 1
            keep = self._keep_prefix(tokens, first)
            rows = self._decode(tokens[keep:], start=keep, want=lambda pos: first <= pos < len(tokens) - 1)
            self._cached = tokens
            targets = np.asarray(continuation, dtype=np.int64)
            results.append(-float(log_softmax_nll(rows, targets).sum()))
        return results

    def window_nll(self, window: Sequence[int], first: int) -> np.ndarray:
        targets = np.asarray(window[first + 1 :], dtype=np.int64)
        return log_softmax_nll(self.scored_logits(window, first), targets)

    def complete(self, prompt: str, max_tokens: int, stop: Sequence[str]) -> str:
        """Greedy continuation of raw text (no chat template), cut at the first ``stop`` string."""
        self._cached = []
        out = self.llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, top_k=1, repeat_penalty=1.0, stop=list(stop) or None, seed=0)
        return out["choices"][0]["text"]

    def close(self) -> None:
        if self._batch is not None:
            self._lib.llama_batch_free(self._batch)
            self._batch = None
        self.llm.close()

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
