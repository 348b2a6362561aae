"""brats_tf: brain-tumor segmentation with modality-specific 2D networks, 2D-3D CNNs and voting."""

import contextlib
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile


def _verbosity_asked(argv):
    """True when a command line passes absl's -v / --verbosity."""
    return any(re.fullmatch(r"--?(v|verbosity)(=.*)?", arg) for arg in argv[1:])


# TensorFlow's C++ chatter (CPU features, the oneDNN banner, runtime info lines) hides our own
# output. Its level is read when TensorFlow loads, before absl parses --verbosity, so the command
# line is looked at here: with -v/--verbosity TensorFlow logs as it does by default. A value the
# user set in the environment wins either way. (Python-side library logs: errors.run_main.)
# TensorFlow 2.21 on CPUs where it turns oneDNN on (AVX512-VNNI/BF16, AMX: 1.6x faster 2D and
# 5x faster 3D convolutions on the AMD EPYC measured, so it stays on) prints a banner at import
# from a library that ignores TF_CPP_MIN_LOG_LEVEL. Those two lines alone are dropped from what
# the import writes to stderr; everything else it writes is passed on.
_TENSORFLOW_BANNER = re.compile(r"All log messages before absl::InitializeLog\(\) is called"
                                r"|\] oneDNN custom operations are on")


@contextlib.contextmanager
def _without_tensorflow_banner():
    """Captures file descriptor 2 (C++ writes there directly) and replays it without the banner."""
    sys.stderr.flush()
    try:
        captured, saved = tempfile.TemporaryFile(), os.dup(2)
    except OSError:          # no temporary space or descriptors: the banner is harmless
        yield
        return
    os.dup2(captured.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        captured.seek(0)
        lines = captured.read().decode("utf-8", "replace").splitlines(keepends=True)
        captured.close()
        sys.stderr.write("".join(line for line in lines if not _TENSORFLOW_BANNER.search(line)))
        sys.stderr.flush()


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Runs the first `import tensorflow` (whoever asks: keras, tfds, our modules) inside
    `_without_tensorflow_banner`. Importing brats_tf itself does not load TensorFlow."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_quietly(module):
                with _without_tensorflow_banner():
                    exec_module(module)
            spec.loader.exec_module = exec_quietly
        return spec


if not _verbosity_asked(getattr(sys, "argv", None) or []):
    # 3 (fatal only): its ERROR lines are noise too (`oneDNN supports DT_HALF only on platforms
    # with AVX-512`, at the first float16 tensor); real failures reach us as Python exceptions.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" not in sys.modules:
        sys.meta_path.insert(0, _QuietTensorFlowImport())
