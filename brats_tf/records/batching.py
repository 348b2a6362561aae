"""The one way samplers become tf.data pipelines: batch b of a run is `batch_fn(b)`, so a
resumed run restarts the stream at any batch number and sees what it would have seen."""

import numpy as np
import tensorflow as tf


def batch_dataset(batch_fn, x_shape, y_shape, first_batch=0, num_batches=None):
    """tf.data.Dataset of `batch_fn(b)` -> (x float32 of x_shape, y int32 of y_shape) for
    b = first_batch, first_batch + 1, ... (endless unless num_batches), prefetched."""
    last = np.iinfo(np.int64).max if num_batches is None else first_batch + num_batches

    def generate():
        for b in range(first_batch, last):
            yield batch_fn(b)

    spec = (tf.TensorSpec(tuple(x_shape), tf.float32), tf.TensorSpec(tuple(y_shape), tf.int32))
    return tf.data.Dataset.from_generator(generate, output_signature=spec).prefetch(tf.data.AUTOTUNE)
