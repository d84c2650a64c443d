"""Evaluations of a (merged) model, each registered by name (evals/registry.py): perplexity as
llama.cpp computes it, EQ-Bench v2 (generation or logits), and lm-eval tasks; on a GGUF in
llama.cpp or an in-memory transformers model."""
