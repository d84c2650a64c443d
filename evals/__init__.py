"""Evaluations of a (merged) model: perplexity now; EQ-Bench and lm-eval bridges build on the same shape."""
