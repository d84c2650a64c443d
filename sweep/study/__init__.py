"""Keeping the study: where a sweep's trials live and how workers share them.

``storage.py`` opens the storage by URL (SQLite, PostgreSQL, a journal file); ``open.py`` opens the study
(a resume must score as before) and holds the lock that finds orphans; ``index.py`` is what the sweep
knows of the study between trials; ``twins.py`` keeps two workers from scoring one plan; ``heartbeat.py``
and ``retries.py`` fail a dead worker's trial and retry it once; ``rebuild.py`` makes a damaged study again
from its records. ``optuna_private.py`` is the one module that imports Optuna's private names, and
guards them: outside the tested Optuna releases the sweep falls back to Optuna's own storage and sampler.
The storage is the source of truth; every other copy is rebuilt from it.
"""
