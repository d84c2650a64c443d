"""Record keys: the name of every field a trial's record holds, in one table (as gguf-py's ``Keys``).

A record is what one trial leaves: Optuna user attributes in the study, ``trials/N.json``, and a
row of the leaderboard. Evaluations, the trial's merge step and the sweep's bookkeeping all write
fields here; readers (leaderboard, report, reproduce) read them by these names. It lives on the
evals floor, the lowest that writes a record, so every writer and reader can import it.
"""

from __future__ import annotations


class Field:
    # the merged model (sweep/trials/trial_work.py)
    PLAN = "plan"  # canonical plan string, e.g. "0-16,8-30": the cache key
    N_LAYERS = "n_layers"
    MERGE_SECONDS = "merge_seconds"
    FILE_MB = "file_mb"
    WORKER = "worker"  # host:pid of the sweep process that ran the trial
    PEAK_RSS_MB = "peak_rss_mb"  # of the trial's child process

    # perplexity (evals/ppl_eval.py); its name doubles as the eval's and the objective's
    PPL = "ppl"
    PPL_EARLY = "ppl_early"  # on the first prune.early_windows windows
    PPL_VS_BASE = "ppl_vs_base"
    TOKENS_PER_SECOND = "tokens_per_second"
    N_TOKENS_SCORED = "n_tokens_scored"
    EVAL_SECONDS = "eval_seconds"
    PRUNED = "pruned"  # the scoring stopped after the early stage
    KLD = "kld"  # eval.ppl.kld: mean KL divergence of the plan's next-token distribution from the base's
    TOP1_AGREEMENT = "top1_agreement"  # share of scored tokens whose most likely token is the base's

    # EQ-Bench (evals/eqbench_eval.py)
    EQBENCH = "eqbench"
    EQBENCH_PARSE_RATE = "eqbench_parse_rate"
    EQBENCH_USED = "eqbench_used"  # first_pass | revised
    EQBENCH_FIRST_PASS = "eqbench_first_pass"
    EQBENCH_REVISED = "eqbench_revised"
    EQBENCH_SECONDS = "eqbench_seconds"
    EQBENCH_ITEMS = "eqbench_items"  # per-item records: why a plan scored as it did

    # probes (evals/probe_eval.py): means over probes, each probe weighing the same
    PROBE = "probe"  # the objective: eval.probe.metric's mean
    PROBE_ACCURACY = "probe_accuracy"
    PROBE_LOGPROB = "probe_logprob"
    PROBE_SCORE = "probe_score"
    PROBE_COVERAGE = "probe_coverage"  # probability on valid answers
    PROBE_ENTROPY = "probe_entropy"
    PROBE_GATED = "probe_gated"  # share of items under the coverage gate, scored at the floor
    PROBE_BY_NAME = "probe_by_name"  # {probe: {metric: mean}}
    PROBE_SECONDS = "probe_seconds"
    PROBE_ITEMS = "probe_items"  # per-item scores; the base's coverage per item gates the plans

    # lm-eval (evals/lm_eval_bridge.py)
    LM_EVAL = "lm_eval"
    LM_EVAL_TASKS = "lm_eval_tasks"
    LM_EVAL_SECONDS = "lm_eval_seconds"

    # real benchmarks offline (evals/bench.py); against the base: the paired difference (evals/stats.py)
    BENCH = "bench"  # the objective: eval.bench.metric (acc | acc_norm) averaged over the tasks
    BENCH_TASKS = "bench_tasks"  # {task: {acc, acc_norm, n}}
    BENCH_ITEMS = "bench_items"  # per item: id, task, each choice's log-likelihood, acc, acc_norm
    BENCH_SECONDS = "bench_seconds"
    BENCH_DIFF = "bench_diff"  # plan - base over the items both answered (accuracy: a share)
    BENCH_DIFF_LOW = "bench_diff_low"  # its 95% interval (paired bootstrap)
    BENCH_DIFF_HIGH = "bench_diff_high"
    BENCH_P = "bench_p"  # McNemar's exact test, two-sided, uncorrected
    BENCH_N = "bench_n"  # the items it rests on
    BENCH_DETECTABLE = "bench_detectable"  # the smallest difference these items detect (80% power, 5%)

    # the sweep's bookkeeping (sweep/)
    CACHE_HIT_OF = "cache_hit_of"  # the trial that scored this plan first
    CLAIM = "claim"  # evaluate | wait: a plan another worker is scoring (sweep/study/twins.py)
    ERROR = "error"  # why a trial failed
    FAIL_REASON = "fail_reason"  # system attribute: a dead worker's trial
    MODEL_PATH = "model_path"  # the merged file, while it is kept
    ENQUEUED = "enqueued"
    DRAWN = "drawn"  # "uniform": an unscored plan drawn after sweep.max_repeats_in_a_row repeats
    PRIOR_RANK = "prior_rank"
    PRIOR_COST = "prior_cost"
    REPAIRED_PARAMS = "repaired_params"

    # validation (sweep/results/validation.py): leaderboard columns, "validated_" + an evaluation's objective
    VALIDATED = "validated_"
    FINAL_RANK = "final_rank"  # rank by the first validated score


class StudyKey:
    """Study-wide user attributes."""

    BASE = "base"  # the base model's record, scored once per sweep
    BASE_CLAIM = "base_claim:"  # + a worker: [claimed at, last beat]; the earliest live claim scores the base
    SCORING = "scoring"  # what makes scores comparable (model, backend, eval configs); written last
    OBJECTIVES = "objectives"
    MODEL_HF_ID = "model_hf_id"
    N_BASE_LAYERS = "n_base_layers"
    PRIOR_ENQUEUED = "prior_enqueued"
    VALIDATION = "validation"  # {top_k, evals}: how `selfmerge validate` re-checks the best plans
