"""The one exception type for bad input: the CLI prints its message on one line and exits 2."""


class SelfMergeError(ValueError):
    """A problem with what the user asked for (a plan, a file, a config value)."""
