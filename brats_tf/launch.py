"""Starts N local workers of one command as a tf.distribute cluster (multi-worker training).

    python -m brats_tf.launch --workers 2 -- python -m brats_tf.train \
        --config=brats_tf/configs/train2d.py:small --config.train.strategy=multi_worker ...

Each worker is the same command with its own `TF_CONFIG` (cluster: N workers on free loopback
ports picked by `portpicker`; task: worker i; worker 0 is the chief). Their output is streamed
with a `[worker i]` prefix. If a worker fails (non-zero exit, killed), the others are stopped
and the launcher exits with that worker's status; it exits 0 when every worker does.
`--threads_per_worker` sets TensorFlow's intra- and inter-op threads of each worker (e.g. 2
workers x 1 thread on a 2-core host). For tests, and for users with one big host; on several
hosts, set TF_CONFIG on each host yourself (README, "Training on several machines").
"""

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time

from absl import app, flags

from brats_tf.errors import ConfigError, run_main

FLAGS = flags.FLAGS
flags.DEFINE_integer("workers", 2, "Number of local worker processes.", lower_bound=1)
flags.DEFINE_integer("threads_per_worker", None, "TensorFlow intra-/inter-op threads per worker "
                     "(default: TensorFlow's own choice).", lower_bound=1)
flags.DEFINE_float("grace_s", 10.0, "Seconds the other workers get to stop (SIGTERM) after one "
                   "fails, before they are killed.", lower_bound=0)

POLL_S = 0.2


def cluster_spec(num_workers, ports=None):
    """{"worker": ["localhost:p0", ...]} on free loopback ports."""
    if ports is None:
        import portpicker
        ports = [portpicker.pick_unused_port() for _ in range(num_workers)]
    return {"worker": [f"localhost:{p}" for p in ports]}


def worker_env(cluster, index, threads=None, base=None):
    """The environment of worker `index`: TF_CONFIG (and thread counts)."""
    env = dict(os.environ if base is None else base)
    env["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
    if threads:
        env["TF_NUM_INTRAOP_THREADS"] = env["TF_NUM_INTEROP_THREADS"] = str(threads)
    return env


def _die_with_parent():
    """Runs in each worker before exec: it gets SIGKILL when the launcher dies."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG


def _stream(index, pipe, lock):
    for line in iter(pipe.readline, b""):
        with lock:
            sys.stdout.write(f"[worker {index}] {line.decode(errors='replace')}")
            sys.stdout.flush()


def launch(command, num_workers, threads=None, grace_s=10.0):
    """Runs `command` (a list) as `num_workers` workers; returns the exit status (0: all did)."""
    if not command:
        raise ConfigError("give the command after --, e.g. python -m brats_tf.launch --workers 2 -- "
                          "python -m brats_tf.train ...")
    cluster = cluster_spec(num_workers)
    lock, procs, streams = threading.Lock(), [], []
    try:
        for index in range(num_workers):
            procs.append(subprocess.Popen(command, env=worker_env(cluster, index, threads), stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, preexec_fn=_die_with_parent))
            streams.append(threading.Thread(target=_stream, args=(index, procs[-1].stdout, lock), daemon=True))
            streams[-1].start()
    except OSError as err:
        _stop(procs, 0)
        raise ConfigError(f"cannot start {command[0]!r}: {err.strerror or err}") from None
    status = _wait(procs)
    if status:
        failed = next(i for i, p in enumerate(procs) if p.returncode not in (None, 0))
        print(f"launch: worker {failed} exited with status {procs[failed].returncode}; stopping the others",
              file=sys.stderr, flush=True)
        _stop(procs, grace_s)
    for thread in streams:
        thread.join(timeout=5)
    return status


def _wait(procs):
    """0 when every worker exits 0; else the first failure's status (a signal as 128 + n)."""
    while True:
        codes = [p.poll() for p in procs]
        bad = [c for c in codes if c not in (None, 0)]
        if bad:
            return 128 - bad[0] if bad[0] < 0 else bad[0]
        if all(c == 0 for c in codes):
            return 0
        time.sleep(POLL_S)


def _stop(procs, grace_s):
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.time() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main(argv):
    sys.exit(launch(argv[1:], FLAGS.workers, FLAGS.threads_per_worker, FLAGS.grace_s))


if __name__ == "__main__":
    app.run(run_main(main))
