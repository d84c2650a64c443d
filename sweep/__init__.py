"""The Optuna study that searches self-merge plans: space, sampler, runner, results."""
