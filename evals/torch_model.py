"""A transformers model (an in-memory self-merge, or any loaded model) scored like LlamaCppModel:
the same perplexity windows, the same chat template, the same EQ-Bench calls (``ChatModel``).

Perplexity runs windows in batches (``batch_windows`` at a time) through the decoder layers one by
one with no cache and no mask (full windows, causal attention; a sliding-window layer gets its window's
mask when the windows are longer), and projects only the scored half
to the vocabulary. ``layer_fn`` runs one layer: plain, or ``compiled_layer_fn()``, which
torch.compile fuses once for every layer of every plan (the layers share one class and code).
"""

from __future__ import annotations

import contextlib
import inspect
from collections import Counter
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from evals.llama_cpp_model import reusable_prefix
from merge_core.errors import SelfMergeError


def run_layer(layer, hidden, position_embeddings, mask=None):
    """One decoder layer on full windows, no KV cache: causal attention (no mask needed), or under
    ``mask`` (a sliding-window layer on windows longer than its window, ``sliding_mask``)."""
    out = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings)
    return out[0] if isinstance(out, tuple) else out


SLIDING = "sliding_attention"  # transformers' layer_types name of a sliding-window layer


def sliding_mask(length: int, window: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The additive mask of a sliding-window layer, as transformers' forward builds it: position q
    sees k when k <= q and q - k < ``window``; 0 where it sees, the dtype's lowest value elsewhere."""
    q = torch.arange(length, device=device).unsqueeze(1)
    k = torch.arange(length, device=device).unsqueeze(0)
    seen = (k <= q) & (q - k < window)
    mask = torch.zeros(seen.shape, dtype=dtype, device=device)
    return mask.masked_fill(~seen, torch.finfo(dtype).min)[None, None]


GQA_ATTENTION = "selfmerge_sdpa_gqa"


def _sdpa_gqa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' SDPA attention, but grouped-query attention stays grouped under a padding mask:
    on CUDA transformers (5.17) expands K/V to every query head whenever a mask is present, which
    took 193 of a 218 ms batched decode step at a 7B shape (FACTS.md); ``enable_gqa`` took 9 ms."""
    causal = query.shape[2] > 1 and attention_mask is None and getattr(module, "is_causal", True)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=0.0, scale=scaling, is_causal=causal,
        enable_gqa=key.shape[1] != query.shape[1],
    )  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def gqa_attention(model) -> Iterator[None]:
    """Run ``model`` (a base or an in-memory merge: its layers' attention modules keep the base's
    config) with ``_sdpa_gqa`` and transformers' SDPA masks, restoring every config afterwards."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GQA_ATTENTION, _sdpa_gqa)
    AttentionMaskInterface.register(GQA_ATTENTION, sdpa_mask)
    configs = {id(c): c for c in [model.config, model.model.config, *(layer.self_attn.config for layer in model.model.layers)]}
    before = {key: config._attn_implementation for key, config in configs.items()}
    try:
        for config in configs.values():
            config._attn_implementation = GQA_ATTENTION
        yield
    finally:
        for key, config in configs.items():
            config._attn_implementation = before[key]


def _until_end(tokens: list[int], ends: set[int]) -> list[int]:
    """A reply's tokens up to and with its first end token."""
    cut = next((i for i, token in enumerate(tokens) if token in ends), len(tokens) - 1)
    return tokens[: cut + 1]


def compiled_layer_fn():
    """``run_layer`` compiled: one graph serves every layer object of the same class and shapes (its
    parameters are graph inputs), so plan after plan reuses it with no recompilation."""
    return torch.compile(run_layer, dynamic=False)


class TorchModel:
    def __init__(self, model, tokenizer, n_ctx: int = 512, batch_windows: int = 8, layer_fn=run_layer, gen_batch: int = 0) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.n_ctx, self.batch_windows, self.layer_fn = n_ctx, batch_windows, layer_fn
        self.gen_batch = gen_batch  # replies generated at once by chat_batch; 0: as many as free memory holds
        window = getattr(model.config, "sliding_window", None)  # its layers get a mask on longer windows
        self._window = window if window and getattr(model.config, "use_sliding_window", True) else None
        self.device = model.get_input_embeddings().weight.device  # a base spread over GPUs starts on the first
        # Gemma 3's rotary embedding takes the layer kind (sliding/global: RoPE bases 10k and 1M)
        self._rotary_per_kind = "layer_type" in inspect.signature(model.model.rotary_emb.forward).parameters
        # transformers 5.x renamed the forward's cache argument (past_key_values warns, then goes in 5.40)
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._cache = None  # KV cache of next_token_logprobs, and the tokens it holds
        self._cached: list[int] = []

    # -- tokenizer --------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Text as text, as llama.cpp's ``special=False``: WikiText's literal "<unk>" is Gemma's unknown
        token when transformers parses special tokens, which tripled the base's perplexity."""
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    @property
    def bos_for_windows(self) -> Optional[int]:
        """The BOS token, when the tokenizer puts one before a text (as llama.cpp then does per window),
        or when its ``add_bos_token`` says so (a GGUF's own word, ``follow_gguf_bos``)."""
        bos = self.tokenizer.bos_token_id
        with_special = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        puts_one = bool(with_special) and with_special[0] == bos
        told = getattr(self.tokenizer, "add_bos_token", None) is True
        return bos if bos is not None and (puts_one or told) else None

    # -- perplexity -------------------------------------------------------------------------
    def _scored_logits(self, ids: torch.Tensor, first: int) -> torch.Tensor:
        """Logits predicting ``ids[:, first + 1:]``: the decoder layers one by one, the head on the scored
        half. Each layer gets the rotary embedding of its attention kind (Gemma 3's sliding and global layers
        differ), as the model's own forward reads it from the merged config's ``layer_types``."""
        inner, config = self.model.model, self.model.config
        hidden = inner.embed_tokens(ids)  # Gemma's embedding module scales by sqrt(hidden) itself
        positions = torch.arange(ids.shape[1], device=self.device).unsqueeze(0)
        kinds = getattr(config, "layer_types", None) or [None] * len(inner.layers)
        if self._rotary_per_kind:
            by_kind = {kind: inner.rotary_emb(hidden, positions, kind) for kind in set(kinds)}
        else:
            by_kind = dict.fromkeys(set(kinds), inner.rotary_emb(hidden, position_ids=positions))
        masks = dict.fromkeys(set(kinds))  # full windows: causal attention needs no mask ...
        if self._window and ids.shape[1] > self._window:  # ... but a sliding layer sees only its window
            sliding = sliding_mask(ids.shape[1], self._window, hidden.dtype, hidden.device)
            masks.update({kind: sliding for kind in masks if kind in (SLIDING, None)})
        for layer, kind in zip(inner.layers, kinds):
            hidden = self.layer_fn(layer, hidden, by_kind[kind], masks[kind])
        logits = self.model.lm_head(inner.norm(hidden[:, first:-1]))
        cap = getattr(config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    @torch.inference_mode()
    def windows_nll(self, windows: Sequence[Sequence[int]], first: int) -> list[np.ndarray]:
        """-log p of ``window[first + 1:]`` for each window, one forward pass per batch of windows."""
        results = []
        for start in range(0, len(windows), self.batch_windows):
            ids = torch.tensor(windows[start : start + self.batch_windows], device=self.device)
            logits = self._scored_logits(ids, first)
            targets = ids[:, first + 1 :].to(logits.device)  # the head may be on another GPU (device_map)
            log_norm = torch.logsumexp(logits.float(), dim=-1)
            picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()
            results.extend((log_norm - picked).double().cpu().numpy())
        return results

    @torch.inference_mode()
    def scored_logits(self, window: Sequence[int], first: int) -> np.ndarray:
        """Raw logits predicting ``window[first + 1:]`` (one row per token), as LlamaCppModel's."""
        return self._scored_logits(torch.tensor([list(window)], device=self.device), first)[0].float().cpu().numpy()

    @torch.inference_mode()
    def continuation_logprobs(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[float]:
        """log p(continuation | context) for each (context, continuation) of token ids, in order: the
        requests of similar length in one forward pass, right-padded (causal attention: a position never
        sees the padding after it), ``batch_windows`` at a time."""
        results = [0.0] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: len(requests[i][0]) + len(requests[i][1]))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for start in range(0, len(order), self.batch_windows):
            group = order[start : start + self.batch_windows]
            sequences = [[*requests[i][0], *requests[i][1]] for i in group]
            width = max(map(len, sequences))
            if width > self.n_ctx:
                raise SelfMergeError(f"{width} tokens do not fit the context of {self.n_ctx}")
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences], device=self.device)
            logprobs = torch.log_softmax(self._scored_logits(ids, 0).float(), dim=-1)  # predicting ids[:, 1:]
            for row, i in enumerate(group):
                context, continuation = requests[i]
                targets = torch.tensor(list(continuation), device=logprobs.device)
                positions = len(context) - 1 + torch.arange(len(continuation), device=logprobs.device)
                results[i] = float(logprobs[row, positions, targets].sum())
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

    def _fitting_batch(self, length: int) -> int:
        """Sequences whose static KV cache of ``length`` tokens fits half the free memory of each GPU,
        which holds the cache of its own layers (8 on a CPU)."""
        if self.device.type != "cuda":
            return 8
        config = self.model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        per_layer = 2 * config.num_key_value_heads * head_dim * length * self.model.dtype.itemsize
        layers_on = Counter(next(layer.parameters()).device for layer in self.model.model.layers)
        return max(1, min(int(0.5 * torch.cuda.mem_get_info(device)[0] // (n * per_layer))
                          for device, n in layers_on.items() if device.type == "cuda"))  # fmt: skip

    @torch.inference_mode()
    def chat_batch(self, conversations: list[list[dict]], max_tokens: int) -> list[str]:
        """Greedy replies to many conversations at once, the same text as ``chat`` one by one (tested in
        fp32): prompts left-padded under an attention mask, a static KV cache, grouped-query attention
        kept grouped, each reply ending at its own end token (``_greedy``). Prompts of similar length
        share a batch."""
        prompts = [self.chat_prompt_tokens(messages) for messages in conversations]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        size = self.gen_batch or self._fitting_batch(max(map(len, prompts)) + max_tokens)
        ends, static = self._end_ids(), self._static_decoding()
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        replies: list[str] = [""] * len(prompts)
        for start in range(0, len(order), size):
            group = order[start : start + size]
            width = max(len(prompts[i]) for i in group)
            ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in group], device=self.device)
            valid = torch.tensor([[False] * (width - len(prompts[i])) + [True] * len(prompts[i]) for i in group],
                                 device=self.device)  # fmt: skip
            with gqa_attention(self.model):
                if static:
                    out = self._greedy(ids, valid, max_tokens)
                else:  # sliding-window layers keep a cache of their own length: transformers' loop
                    out = self.model.generate(ids, attention_mask=valid.long(), max_new_tokens=max_tokens,
                                              do_sample=False, pad_token_id=pad, cache_implementation="static",
                                              disable_compile=True)[:, width:]  # fmt: skip
            for i, row in zip(group, out):
                replies[i] = self.tokenizer.decode(_until_end(row.tolist(), ends), skip_special_tokens=True)
        return replies

    def _end_ids(self) -> set[int]:
        ends = self.model.generation_config.eos_token_id
        ends = ends if isinstance(ends, (list, tuple)) else [ends]
        return {int(e) for e in [*ends, self.tokenizer.eos_token_id] if e is not None}

    def _static_decoding(self) -> bool:
        """Every layer attends over the whole static cache (no sliding-window layer)."""
        from transformers import StaticCache

        cache = StaticCache(config=self.model.config, max_cache_len=8)
        return not any(getattr(layer, "is_sliding", False) for layer in cache.layers)

    def _greedy(self, ids: torch.Tensor, valid: torch.Tensor, max_tokens: int) -> torch.Tensor:
        """Greedy continuation (``max_tokens`` tokens a row) of left-padded prompts, ``valid`` marking
        their real tokens, over a static KV cache: the prompts in one forward, then one token a step,
        nothing else in the loop (transformers' ``generate`` adds its logits processors and stopping
        criteria, a host sync and several small kernels a step). The loop ends once every row has
        written an end token (checked every 8 steps); later tokens of a row are cut by ``_until_end``."""
        from transformers import StaticCache

        batch, width = ids.shape
        total = width + max_tokens
        cache = StaticCache(config=self.model.config, max_cache_len=total)
        keys = torch.zeros(batch, total, dtype=torch.bool, device=self.device)
        keys[:, :width] = valid
        # prompt: causal over real tokens; a padding row sees itself, so no softmax row is empty (NaN)
        causal = torch.ones(width, total, dtype=torch.bool, device=self.device).tril()
        own = torch.eye(width, total, dtype=torch.bool, device=self.device)
        positions = (valid.long().cumsum(-1) - 1).clamp_min(0)
        position_arg = "cache_position" in inspect.signature(self.model.model.forward).parameters

        def forward(tokens, mask, pos, cache_position):
            extra = {self._cache_arg: cache, **({"cache_position": cache_position} if position_arg else {})}
            logits = self.model(input_ids=tokens, attention_mask=mask, position_ids=pos, use_cache=True,
                                logits_to_keep=1, **extra).logits[:, -1]  # fmt: skip
            return logits.argmax(-1, keepdim=True).to(self.device)  # the head may be on another GPU (device_map)

        prompt_mask = ((causal & keys[:, None]) | own)[:, None]
        token = forward(ids, prompt_mask, positions, torch.arange(width, device=self.device))
        mask, pos = keys[:, None, None, :].clone(), positions[:, -1:] + 1
        cache_position = torch.tensor([width], device=self.device)

        def step():
            mask.index_fill_(3, cache_position, True)
            token.copy_(forward(token, mask, pos, cache_position))
            pos.add_(1)
            cache_position.add_(1)

        out = torch.empty(batch, max_tokens, dtype=torch.long, device=self.device)
        out[:, 0] = token[:, 0]
        ends = torch.tensor(sorted(self._end_ids()), device=self.device)
        done = torch.isin(token[:, 0], ends)
        for t in range(1, max_tokens):
            step()
            out[:, t] = token[:, 0]
            done |= torch.isin(token[:, 0], ends)
            if t % 8 == 0 and bool(done.all()):
                return out[:, : t + 1]
        return out

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
        logits = self.model(input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=1,
                            **{self._cache_arg: self._cache}).logits  # fmt: skip
        self._cached = list(tokens)
        return torch.log_softmax(logits[0, -1].double(), dim=-1).cpu().numpy()

    def close(self) -> None:
        self._cache, self._cached = None, []

    def __enter__(self) -> TorchModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
