"""Errors for expected bad input, and the CLI wrapper that reports them in one line."""

import logging
import re
import sys
import warnings


class DataError(Exception):
    """Bad input data (missing, corrupt or inconsistent files).

    The message is one line that names the offending file and the problem.
    """

    def __init__(self, path, problem):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):   # picklable, so that an error in a child process reaches the parent
        return type(self), (self.path, self.problem)


class ConfigError(Exception):
    """A flag or config value that cannot be used; the message says which and why."""


def short_error(err, limit=200):
    """First line of an error's message, without TensorFlow's {{function_node ...}} and
    [Op:...] decorations, cut at `limit` characters."""
    text = getattr(err, "message", None) or str(err)
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*|\s*\[Op:[^\]]*\].*$", "", text.strip(), flags=re.S)
    lines = text.strip().splitlines()
    return (lines[0] if lines else type(err).__name__)[:limit]


def file_system_words(err):
    """The file system's words that end a TensorFlow write error (`…/x.tempstate123; File too
    large`): what a user needs, where the temporary path is noise."""
    return short_error(err, limit=None).rsplit("; ", 1)[-1][:200]


def require_kind(kind, known, what):
    """Refuses a model kind that a model family's table does not list, naming the known ones."""
    if kind not in known:
        raise ConfigError(f"unknown {what} kind {kind!r}; known kinds: {', '.join(known)}")


def quiet_libraries():
    """A command prints only its own progress unless absl's --verbosity is given: library
    log lines (TFDS's `FeatureConnector.dtype` deprecations and other absl warnings,
    TensorFlow's Python logger) and Python warnings (library deprecations, even those a
    library raises about our calls) are hidden; errors still show. `--verbosity=-1` shows
    warnings, `0` info (TFDS's "Downloading and preparing dataset" lines too, see
    records/writer.py), `1` debug. TensorFlow's C++ lines follow the same flag
    (brats_tf/__init__.py)."""
    from absl import flags
    if "verbosity" in flags.FLAGS and flags.FLAGS["verbosity"].present:
        return
    silence_libraries()


def silence_libraries():
    """What `quiet_libraries` does when --verbosity is not given (also for the processes a
    command starts, which parse no flags)."""
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.ERROR)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")


def libraries_silenced():
    from absl import logging as absl_logging
    return absl_logging.get_verbosity() <= absl_logging.ERROR


def os_error_line(err):
    """`path: problem` for an OSError (`[Errno 13] Permission denied: 'x'` reads as
    `x: permission denied`); the message alone when it names no file."""
    problem = (err.strerror or str(err)).lower() if err.strerror else str(err)
    if err.filename is None:
        return problem
    target = f" -> {err.filename2}" if err.filename2 else ""
    return f"{err.filename}{target}: {problem}"


def run_main(main_fn):
    """Wraps an absl main so expected errors print one line and exit 1, no traceback, and
    library chatter stays hidden unless asked for (`quiet_libraries`)."""

    def wrapped(argv):
        quiet_libraries()
        try:
            return main_fn(argv)
        except (DataError, ConfigError) as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)
        except OSError as err:   # the machine's side of bad input: permissions, a full disk
            print(f"error: {os_error_line(err)}", file=sys.stderr)
            sys.exit(1)

    return wrapped
