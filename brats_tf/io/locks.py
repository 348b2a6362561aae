"""Lock files: one live process at a time per work dir or output folder.

`hold(path, what)` holds the lock file `path` for a `with` block. The file is JSON naming
its holder: {"pid", "host", "started" (ISO time), "command"}. A second process asking for
it while the holder lives is refused with one line (ConfigError) naming the holder's pid.
A lock whose holder is gone (killed; its pid no longer exists on this host), or whose
file is unreadable (a holder killed while writing it), is stale: it is taken over, with
one absl warning. A lock taken on another host cannot be checked and is always refused.
The same process may hold a lock again (an experiment running a trainer in-process on
the same folder): the inner `hold` changes nothing.

Limits: taking over the *same* stale lock at the same instant from two processes can let
both go on (the window is between one's check of the file and the other's replace); a
fresh lock is created with O_EXCL and has no such window. A dead holder's pid reused by an
unrelated process makes its lock look live: the message names the command, and deleting
the file by hand frees the folder. A folder given as a URL (gs://, ram://) is not locked:
object stores have no exclusive create, and a multi-host job's chief is its only writer.
"""

import contextlib
import datetime
import json
import os
import socket
import sys
import time

from absl import logging

from brats_tf.errors import ConfigError
from brats_tf.io.files import is_url, write_text

LOCK_FILE = ".brats_tf.lock"   # the lock inside a work dir or output folder
WRITE_GRACE_S = 2.0   # an unreadable lock younger than this may be a holder still writing it

_held = set()   # real paths of the locks this process holds now (re-entrancy)
_MISSING = object()   # `_read` of a lock file that does not exist


@contextlib.contextmanager
def hold(path, what):
    """Holds the lock file `path` (its folder is created) while the block runs; `what`
    (the folder it guards) names it in the refusal. Raises ConfigError when another live
    process holds it. The file is removed at the end if it is still ours."""
    if is_url(path):
        yield
        return
    path = os.path.realpath(path)
    if path in _held:   # re-entrant: the outer `hold` of this process releases it
        yield
        return
    mine = _acquire(path, what)
    _held.add(path)
    try:
        yield
    finally:
        _held.discard(path)
        if _read(path)[0] == mine:   # another process may have taken it over (judged us dead)
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def _acquire(path, what):
    """Creates the lock (or takes over a stale one); returns the holder record we wrote."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    mine = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)}
    text = json.dumps(mine)
    deadline = time.monotonic() + WRITE_GRACE_S + 1.0
    while True:
        try:   # atomic: exactly one of several processes creates the file
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return mine
        holder, age = _read(path)
        if holder is _MISSING:   # released between our two looks: try to create it again
            continue
        if holder is None and age < WRITE_GRACE_S and time.monotonic() < deadline:
            time.sleep(0.1)   # maybe a holder between its create and its write: look again
            continue
        if holder is not None and _alive(holder):
            raise ConfigError(_refusal(what, holder))
        if holder is None:
            logging.warning("%s: taking over the unreadable lock file %s", what, path)
        else:
            logging.warning("%s: taking over the stale lock of pid %s (%s, since %s)", what, holder["pid"],
                            _one_line(holder["command"]), holder["started"])
        write_text(path, text)   # temp file + os.replace: the file is never half written
        if _read(path)[0] == mine:
            return mine
        # Another process replaced it after us: look again (it is live now, so we refuse).



def _read(path):
    """(holder record, age in seconds) of the lock file; the record is None when the file is
    unreadable or not a holder record, _MISSING when there is no file."""
    try:
        with open(path, "rb") as f:
            age = time.time() - os.fstat(f.fileno()).st_mtime
            data = f.read()
    except FileNotFoundError:
        return _MISSING, 0.0
    except OSError:
        return None, float("inf")
    try:
        holder = json.loads(data.decode())
    except ValueError:   # UnicodeDecodeError included
        return None, age
    valid = (isinstance(holder, dict) and set(holder) == {"pid", "host", "started", "command"}
             and type(holder["pid"]) is int and 0 < holder["pid"] < 2 ** 31   # os.kill(0 or -1) hits groups
             and all(isinstance(holder[k], str) for k in ("host", "started", "command")))
    return (holder if valid else None), age


def _alive(holder):
    """Whether the holder may still be running: a pid of this host that exists (or that we
    may not signal), or any lock of another host (which we cannot check)."""
    if holder["host"] != socket.gethostname():
        return True
    if holder["pid"] == os.getpid():   # not in `_held`: an earlier process that had our pid
        return False
    try:
        os.kill(holder["pid"], 0)   # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:   # exists, but belongs to another user
        return True
    return True


def _refusal(what, holder):
    host = "" if holder["host"] == socket.gethostname() else f" on {holder['host']}"
    return (f"{what}: in use by pid {holder['pid']}{host} ({_one_line(holder['command'])}, since "
            f"{holder['started']}); wait for it to finish, or use another folder")


def _one_line(text):
    return " ".join(text.split())
