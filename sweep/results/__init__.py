"""What a sweep leaves under ``results/<sweep>/``, all of it rebuilt from the study.

``records.py`` writes each trial's JSON, the study record and the leaderboard CSV (temporary file, then
rename: a killed sweep never leaves half a file); ``report.py`` draws report.html and its plots;
``validation.py`` scores the best plans and the base again on held-out items; ``reproduce.py`` makes a
trial's model again from its plan, re-scores it and writes it in the formats asked for.
"""
