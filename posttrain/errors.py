"""The one exception family for bad user input: the CLI prints its message as one line and exits 2.

Each subclass lives with the code that raises it (ConfigError in config.py, DataError in data.py, …);
they share this base so the CLI can catch them all without importing heavy modules.
"""


class UserError(ValueError):
    """Input that cannot be used as given; the message names the file/row/key and what to do."""


class MissingDependencyError(UserError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""
