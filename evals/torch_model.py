"""A transformers model (an in-memory self-merge, or any loaded model) scored like LlamaCppModel:
the same perplexity windows, the same chat template, the same EQ-Bench calls (``ChatModel``).

Perplexity runs windows in batches (``batch_windows`` at a time) through the decoder layers one by
one with no cache and no mask (full windows, causal attention), and projects only the scored half
to the vocabulary. ``layer_fn`` runs one layer: plain, or ``compiled_layer_fn()``, which
torch.compile fuses once for every layer of every plan (the layers share one class and code).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from evals.llama_cpp_model import reusable_prefix
from merge_core.errors import SelfMergeError


def run_layer(layer, hidden, position_embeddings):
    """One decoder layer on full windows: causal attention (no mask needed), no KV cache."""
    out = layer(hidden, attention_mask=None, position_embeddings=position_embeddings)
    return out[0] if isinstance(out, tuple) else out


def compiled_layer_fn():
    """``run_layer`` compiled: one graph serves every layer object of the same class and shapes (its
    parameters are graph inputs), so plan after plan reuses it with no recompilation."""
    return torch.compile(run_layer, dynamic=False)


class TorchModel:
    def __init__(self, model, tokenizer, n_ctx: int = 512, batch_windows: int = 8, layer_fn=run_layer) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.n_ctx, self.batch_windows, self.layer_fn = n_ctx, batch_windows, layer_fn
        window = getattr(model.config, "sliding_window", None)
        if window and getattr(model.config, "use_sliding_window", True) and n_ctx > window:
            raise SelfMergeError(f"n_ctx={n_ctx} exceeds the model's sliding window of {window}: use n_ctx <= {window}")
        self.device = next(model.parameters()).device
        self._cache = None  # KV cache of next_token_logprobs, and the tokens it holds
        self._cached: list[int] = []

    # -- tokenizer --------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def bos_for_windows(self) -> Optional[int]:
        """The BOS token, when the tokenizer puts one before a text (as llama.cpp then does per window)."""
        bos = self.tokenizer.bos_token_id
        with_special = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        return bos if bos is not None and with_special and with_special[0] == bos else None

    # -- perplexity -------------------------------------------------------------------------
    @torch.inference_mode()
    def windows_nll(self, windows: Sequence[Sequence[int]], first: int) -> list[np.ndarray]:
        """-log p of ``window[first + 1:]`` for each window, one forward pass per batch of windows."""
        inner = self.model.model
        results = []
        for start in range(0, len(windows), self.batch_windows):
            ids = torch.tensor(windows[start : start + self.batch_windows], device=self.device)
            hidden = inner.embed_tokens(ids)
            positions = torch.arange(ids.shape[1], device=self.device).unsqueeze(0)
            position_embeddings = inner.rotary_emb(hidden, position_ids=positions)
            for layer in inner.layers:
                hidden = self.layer_fn(layer, hidden, position_embeddings)
            logits = self.model.lm_head(inner.norm(hidden[:, first:-1]))
            targets = ids[:, first + 1 :]
            log_norm = torch.logsumexp(logits.float(), dim=-1)
            picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()
            results.extend((log_norm - picked).double().cpu().numpy())
        return results

    def window_nll(self, window: Sequence[int], first: int) -> np.ndarray:
        return self.windows_nll([window], first)[0]

    # -- chat -------------------------------------------------------------------------------
    def chat_prompt_tokens(self, messages: list[dict]) -> list[int]:
        if not self.tokenizer.chat_template:
            raise SelfMergeError("the model's tokenizer has no chat template")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)

    @torch.inference_mode()
    def chat(self, messages: list[dict], max_tokens: int) -> str:
        """Greedy reply through the model's own chat template."""
        prompt = torch.tensor([self.chat_prompt_tokens(messages)], device=self.device)
        out = self.model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_tokens, do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
        )  # fmt: skip
        return self.tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)

    @torch.inference_mode()
    def next_token_logprobs(self, tokens: Sequence[int]) -> np.ndarray:
        """Log-probabilities of the token after ``tokens``; the KV cache keeps the longest common
        prefix with the previous call, so extending a context costs only its new tokens."""
        from transformers import DynamicCache

        if not tokens:
            raise ValueError("next_token_logprobs needs at least one token")
        if len(tokens) > self.n_ctx:
            raise SelfMergeError(f"{len(tokens)} tokens do not fit the context of {self.n_ctx}")
        keep = reusable_prefix(self._cached, tokens)
        if self._cache is None or keep == 0:
            self._cache, keep = DynamicCache(config=self.model.config), 0
        elif keep < self._cache.get_seq_length():
            self._cache.crop(keep - self._cache.get_seq_length())  # negative: drop that many from the end
        ids = torch.tensor([list(tokens[keep:])], device=self.device)
        positions = torch.arange(keep, len(tokens), device=self.device).unsqueeze(0)
        logits = self.model(input_ids=ids, past_key_values=self._cache, position_ids=positions, use_cache=True, logits_to_keep=1).logits
        self._cached = list(tokens)
        return torch.log_softmax(logits[0, -1].double(), dim=-1).cpu().numpy()

    def close(self) -> None:
        self._cache, self._cached = None, []

    def __enter__(self) -> TorchModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
