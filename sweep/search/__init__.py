"""Drawing plans: which plan a trial scores next.

A space (``spaces/``) turns a trial's Optuna parameters into a ``LayerPlan`` that honours every rule of
``constraints.py``, and can count and list its plans; a sampler (``samplers.py``, ``windowed.py``)
chooses the parameters; ``prior.py`` and ``seeding.py`` choose the first plans. Nothing here builds or
scores a model or writes a file: the contract is plan in, plan out.
"""
