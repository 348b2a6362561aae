"""Building blocks shared by the 2D (and later 3D) Keras functional models.

Layer names are deterministic: every block takes a `name` prefix such as
`sub_t1.conv0` and names its layers `<prefix>.conv`, `<prefix>.bn`, `<prefix>.relu`.
Subnetwork pretraining relies on this (weights are copied by layer name).
"""

import keras
from keras import layers, ops


@keras.saving.register_keras_serializable(package="brats_tf")
class SelectChannels(layers.Layer):
    """Keeps the given channels (last axis) of its input, e.g. one MR sequence."""

    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        self.channels = [int(c) for c in channels]

    def call(self, inputs):
        return ops.take(inputs, self.channels, axis=-1)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], len(self.channels))

    def get_config(self):
        return {**super().get_config(), "channels": self.channels}


@keras.saving.register_keras_serializable(package="brats_tf")
class SequenceGate(layers.Layer):
    """Missing MR sequences contribute nothing: call([x, present]) with `present` (B, K) of
    1.0 / 0.0 per sequence. With `sequence=k`, x (a subnetwork's maps or logits) is multiplied
    by present[:, k]: exactly zero, and zero gradient into the subnetwork, when sequence k is
    missing. Without it, x's K channels are multiplied by present (zero-filled)."""

    def __init__(self, sequence=None, **kwargs):
        super().__init__(**kwargs)
        self.sequence = None if sequence is None else int(sequence)

    def call(self, inputs):
        x, present = inputs
        present = ops.cast(present, x.dtype)
        if self.sequence is not None:
            present = present[:, self.sequence:self.sequence + 1]
        spatial = len(x.shape) - 2
        return x * ops.reshape(present, (-1,) + (1,) * spatial + (present.shape[-1],))

    def compute_output_shape(self, input_shapes):
        return input_shapes[0]

    def get_config(self):
        return {**super().get_config(), "sequence": self.sequence}


@keras.saving.register_keras_serializable(package="brats_tf")
class PresenceChannels(layers.Layer):
    """call([x, present]): `present` (B, K) broadcast over x's spatial grid, K constant
    channels (B, ..., K) that tell the next convolution which sequences are present."""

    def call(self, inputs):
        x, present = inputs
        present = ops.cast(present, x.dtype)
        spatial = len(x.shape) - 2
        ones = ops.ones_like(x[..., :1])
        return ones * ops.reshape(present, (-1,) + (1,) * spatial + (present.shape[-1],))

    def compute_output_shape(self, input_shapes):
        return (*input_shapes[0][:-1], input_shapes[1][-1])


def conv_bn_relu(x, filters, name, kernel_size=3):
    """Conv (no bias: BN follows) -> batch normalization -> ReLU, 'same' padding."""
    x = layers.Conv2D(filters, kernel_size, padding="same", use_bias=False,
                      name=f"{name}.conv")(x)
    # Momentum 0.9 (Keras default 0.99): moving statistics settle within ~50 steps, so
    # the short CPU-scale runs validate sensibly; negligible effect on long runs.
    x = layers.BatchNormalization(momentum=0.9, name=f"{name}.bn")(x)
    return layers.ReLU(name=f"{name}.relu")(x)


def classifier(x, num_classes, name):
    """Classification layer: 1x1 conv to class logits; no BN, no activation."""
    return layers.Conv2D(num_classes, 1, name=name)(x)


def unet(x, filters, prefix):
    """U-Net body [M §2.2 main network]: per level two conv-BN-ReLU then max-pool;
    at the bottom two convs; up: bilinear x2, conv, concatenation with the
    same-scale features, two convs. len(filters) - 1 poolings. Returns features."""
    skips = []
    for level, level_filters in enumerate(filters[:-1]):
        x = conv_bn_relu(x, level_filters, f"{prefix}.down{level}a")
        x = conv_bn_relu(x, level_filters, f"{prefix}.down{level}b")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"{prefix}.pool{level}")(x)
    x = conv_bn_relu(x, filters[-1], f"{prefix}.bottom_a")
    x = conv_bn_relu(x, filters[-1], f"{prefix}.bottom_b")
    for level in reversed(range(len(filters) - 1)):
        x = layers.UpSampling2D(2, interpolation="bilinear", name=f"{prefix}.up{level}")(x)
        x = conv_bn_relu(x, filters[level], f"{prefix}.up{level}_conv")
        x = layers.Concatenate(name=f"{prefix}.concat{level}")([skips[level], x])
        x = conv_bn_relu(x, filters[level], f"{prefix}.up{level}a")
        x = conv_bn_relu(x, filters[level], f"{prefix}.up{level}b")
    return x


def reduced_unet(x, filters, depth, prefix):
    """Subnetwork of 2D model 1: a reduced U-Net whose first layer is concatenated
    to a (bilinear) upsampling layer [M Fig. 6]. First layer: `filters` maps at full
    resolution; `depth` max-poolings, each followed by two convs with doubled maps;
    one bilinear upsampling back to full resolution, concatenation with the first
    layer, and a last conv (the subnetwork's output, `filters` maps)."""
    first = conv_bn_relu(x, filters, f"{prefix}.conv0")
    y = first
    for level in range(1, depth + 1):
        y = layers.MaxPooling2D(2, name=f"{prefix}.pool{level}")(y)
        y = conv_bn_relu(y, filters * 2 ** level, f"{prefix}.conv{level}a")
        y = conv_bn_relu(y, filters * 2 ** level, f"{prefix}.conv{level}b")
    if depth:
        y = layers.UpSampling2D(2 ** depth, interpolation="bilinear", name=f"{prefix}.up")(y)
        y = layers.Concatenate(name=f"{prefix}.concat")([first, y])
    return conv_bn_relu(y, filters, f"{prefix}.last")


def shallow_stack(x, filters, prefix, count=3):
    """Subnetwork of 2D model 2: three conv-BN-ReLU layers [M Fig. 9 top]."""
    for index in range(count):
        x = conv_bn_relu(x, filters, f"{prefix}.conv{index}")
    return x
