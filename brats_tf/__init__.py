"""brats_tf: brain-tumor segmentation with modality-specific 2D networks, 2D-3D CNNs and voting."""

import os

# TensorFlow's C++ start-up chatter (CPU features, oneDNN) hides our one-line errors; users can
# still raise verbosity by setting the variable themselves.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
