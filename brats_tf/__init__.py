"""brats_tf: brain-tumor segmentation with modality-specific 2D networks, 2D-3D CNNs and voting."""

import os
import re
import sys


def _verbosity_asked(argv):
    """True when a command line passes absl's -v / --verbosity."""
    return any(re.fullmatch(r"--?(v|verbosity)(=.*)?", arg) for arg in argv[1:])


# TensorFlow's C++ chatter (CPU features, the oneDNN banner, runtime info lines) hides our own
# output. Its level is read when TensorFlow loads, before absl parses --verbosity, so the command
# line is looked at here: with -v/--verbosity TensorFlow logs as it does by default. A value the
# user set in the environment wins either way. (Python-side library logs: errors.run_main.)
if not _verbosity_asked(getattr(sys, "argv", None) or []):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
