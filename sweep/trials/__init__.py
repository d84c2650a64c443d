"""Running trials: how a plan becomes scores.

``runner.py`` is the sweep loop (the base scored once, then one trial after another until a budget ends)
and ``run_trial``, one trial read top to bottom; ``trial_work.py`` builds and scores one plan with a
backend (``backends.py``) and the scorer (``scoring.py``), in a child process where it can
(``isolation.py``); ``pruning.py`` stops hopeless plans early; ``model_store.py`` owns the merged files;
``callbacks.py`` is what follows each trial; ``workers.py`` starts several workers on one study. A trial
that fails is recorded with its reason and the sweep goes on; nothing here decides which plan comes next.
"""
