"""The Optuna study that searches self-merge plans, in four rooms and two files:

| room | what it answers | contract |
| --- | --- | --- |
| ``search/`` | which plan comes next | spaces, constraints, samplers, prior, seeding |
| ``trials/`` | how a plan becomes scores | the sweep loop, one trial, backends, scoring, isolation, files |
| ``study/`` | where the study is kept | storage, index, twins, heartbeat, retries, rebuild, Optuna's privates |
| ``results/`` | what a sweep leaves | records, leaderboard, report, validation, reproduce |

``config.py`` is every room's typed config; ``cli.py`` the ``selfmerge`` command over all of them.
"""
