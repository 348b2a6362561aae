"""Errors for expected bad input, and the CLI wrapper that reports them in one line."""

import sys


class DataError(Exception):
    """Bad input data (missing, corrupt or inconsistent files).

    The message is one line that names the offending file and the problem.
    """

    def __init__(self, path, problem):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(Exception):
    """A flag or config value that cannot be used; the message says which and why."""


def require_kind(kind, known, what):
    """Refuses a model kind that a model family's table does not list, naming the known ones."""
    if kind not in known:
        raise ConfigError(f"unknown {what} kind {kind!r}; known kinds: {', '.join(known)}")


def run_main(main_fn):
    """Wraps an absl main so expected errors print one line and exit 1, no traceback."""

    def wrapped(argv):
        from absl import logging
        logging.set_verbosity(logging.WARNING)  # library INFO chatter (tfds) is not for users
        try:
            return main_fn(argv)
        except (DataError, ConfigError) as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)

    return wrapped
