"""A GGUF model in llama.cpp (llama-cpp-python), scored the lean way.

Only the positions that are scored ask llama.cpp for logits (the second half of a window), and
they are read straight from llama.cpp's buffer as one numpy array: no per-token Python lists.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from evals.perplexity import log_softmax_nll
from merge_core.errors import SelfMergeError


class LlamaCppModel:
    def __init__(self, path: str | Path, n_ctx: int = 512, threads: Optional[int] = None, batch: int = 512) -> None:
        import llama_cpp

        self._lib = llama_cpp
        path = Path(path)
        if not path.is_file():
            raise SelfMergeError(f"model file not found: {path}")
        threads = threads or os.cpu_count() or 1
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

    # -- tokenizer --------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    @property
    def bos_for_windows(self) -> Optional[int]:
        """The BOS token llama.cpp puts at the start of each window, if the model adds one."""
        return self.llm.token_bos() if self.llm._model.add_bos_token() else None

    # -- scoring ----------------------------------------------------------------------------
    def window_nll(self, window: Sequence[int], first: int) -> np.ndarray:
        lib, ctx = self._lib, self.llm.ctx
        if self._batch is None:
            self._batch = lib.llama_batch_init(self.n_ctx, 0, 1)
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        targets = np.asarray(window[first + 1 :], dtype=np.int64)
        rows = []
        for chunk_start in range(0, len(window), self.n_batch):
            chunk = window[chunk_start : chunk_start + self.n_batch]
            batch = self._batch
            batch.n_tokens = len(chunk)
            n_logits = 0
            for i, token in enumerate(chunk):
                pos = chunk_start + i
                batch.token[i] = token
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                wanted = first <= pos < len(window) - 1
                batch.logits[i] = wanted
                n_logits += wanted
            status = lib.llama_decode(ctx, batch)
            if status != 0:
                raise RuntimeError(f"llama_decode failed with status {status}")
            if n_logits:
                pointer = lib.llama_get_logits(ctx)
                buffer = ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float * (n_logits * self.n_vocab))).contents
                rows.append(np.frombuffer(buffer, dtype=np.float32).reshape(n_logits, self.n_vocab).copy())
        return log_softmax_nll(np.concatenate(rows), targets)

    def close(self) -> None:
        if self._batch is not None:
            self._lib.llama_batch_free(self._batch)
            self._batch = None
        self.llm.close()

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
