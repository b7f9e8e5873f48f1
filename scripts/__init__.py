"""Command-line entry points: run them from the repository root (``python -m scripts.<name>``)."""

import os

# TensorFlow (tf.data, TensorBoard) is only a CPU-side helper of the front ends: keep its INFO
# chatter quiet (the library itself sets no environment variable).
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
