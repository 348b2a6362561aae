"""3D models [M §2.1, Fig. 4, Fig. 9 bottom; METHOD §3]: the standard 3D model and the
2D-3D models A, B and C.

All are 3D U-Net-like, with valid (unpadded) convolutions, ReLU, no batch normalization
and 4 output classes. A 70³ input patch gives the 26³ block at its center, and **every
output voxel depends on exactly the 45³ input block centered on it** (tested by
measurement in tests/test_unet3d.py).

Why dilation rather than decimation: a U-Net that max-pools by 2 and upsamples cannot
have a 45³ receptive field — 2×2 pooling windows make it even-sized, and decimation
makes it depend on the voxel's position modulo 4 (worked out exactly in 1D for 70 -> 26
valid designs: 46 to 50 voxels wide, off-center). This U-Net keeps the U-Net shape
(levels, max-pooling, same-scale skip concatenations) but runs every level at full
resolution: pooling windows are 3³ with stride 1, and each deeper level's convolutions
and pooling are dilated by 2 ("à trous", the dense evaluation of a decimated network).
The model is then exactly shift-equivariant and symmetric. A bonus at inference: any
input size works (n + 44 -> n), so whole volumes are tiled with large tiles.

Layout (sizes for a 70³ input; `d` = dilation):

    level 0: 2 conv d1            70 -> 66   (skip 0)
    max-pool 3³ d1                66 -> 64
    level 1: 2 conv d2            64 -> 56   (skip 1)
    max-pool 3³ d2                56 -> 52
    bottom:  2 conv d4            52 -> 36
    up 1:    concat(skip 1 cropped), 2 conv d2   36 -> 28
    up 0:    concat(skip 0 cropped)              28        <- the "body" ends here
    final:   conv 3³, conv 1³, classifier 1³     28 -> 26

Receptive field: 1 + 4 + 2 + 8 + 4 + 16 + 8 + 2 = 45.

Models (input: K image channels, then F feature channels for 2D-3D models, as
`records.streams.PatchStream` delivers them, features joined from their records):
- standard: the U-Net on the K image channels.
- A: the U-Net on all K + F channels (features at the input) [Fig. 4].
- B: the body on the image channels; the features, cropped to the body's extent, are
  concatenated before the final conv sequence [Fig. 9 bottom left].
- C: two bodies (streams), one on the image channels, one on image + features,
  concatenated before the final conv sequence [Fig. 9 bottom right].

Output: one output named `main`, logits (no softmax). Layer names are `<stream>.<block>`.

The pooled design (`design="pooled"`, issue 14 item 5): the classic 3D U-Net layout the
paper says its model resembles, for comparison. Same levels, widths and final sequence;
valid 3³ convolutions at each level's own resolution, 2³ max-pooling with stride 2 between
levels, and a 2³ stride-2 transposed convolution up ("up-convolution", as in the 3D U-Net):
it doubles a side exactly (an upsampling followed by a valid conv would lose voxels and
change the sides' parity) and each coarse voxel feeds one 2³ block, so no overlap artefacts.

    level 0: 2 conv               68 -> 64   (skip 0)
    max-pool 2³ stride 2          64 -> 32
    level 1: 2 conv               32 -> 28   (skip 1)
    max-pool 2³ stride 2          28 -> 14
    bottom:  2 conv               14 -> 10
    up 1:    up-conv 2³ (20), concat(skip 1 cropped), 2 conv     20 -> 16
    up 0:    up-conv 2³ (32), concat(skip 0 cropped), 1 conv     32 -> 30   <- body ends
    final:   conv 3³, conv 1³, classifier 1³                     30 -> 28

Input sides are multiples of 4 (>= 44; both pooled sides even) and give input - 40: the
output block is centered in the input (margin 20), and the output is equivariant to shifts
by multiples of 4 only (`Geometry.period`), so inference lays its tiles on that grid. The
extra level-0 conv makes the context (40) a multiple of 4, so output tiles are too. Every
output voxel depends on a 44³ block, but not one centered on it: along each axis it spans
-20..+23, -21..+22, -22..+21 or -23..+20 voxels around it, by its position modulo 4
(measured: `models/receptive_field.py`, tests/test_unet3d.py).

Missing sequences (issue 15): built with `presence=True`, a model takes {"patch", "present"}
with `present` (B, K) 1.0 / 0.0 per sequence. Its image channels are zero-filled where a
sequence is missing (`SequenceGate`, whatever the channel holds) and K constant presence
channels follow them, so the first convolutions know which sequences they see (a per-subset
bias); the kinds then treat these 2K channels as the image. Trained with sequence dropout
(`data.sequence_dropout`, `PatchStream`).
"""

import dataclasses

import keras
from keras import layers, ops

from brats_tf.constants import NUM_CLASSES
from brats_tf.errors import require_kind
from brats_tf.models.blocks import PresenceChannels, SelectChannels, SequenceGate

RECEPTIVE_FIELD = 45                  # of the à trous design (the default)
MARGIN = (RECEPTIVE_FIELD - 1) // 2   # input voxels on each side of the output block
BODY_SHRINK = RECEPTIVE_FIELD - 3     # the final 3³ conv takes the last 2 voxels


@dataclasses.dataclass(frozen=True)
class Filters3D:
    """Feature maps per level (level 0, level 1, bottom) and of the final conv sequence."""

    levels: tuple
    final: int


PRESETS = {
    # Not given in [M]'s text; 3D U-Net-like widths. Full-resolution levels make wide
    # deep levels costly, hence a modest bottom width.
    "paper": Filters3D(levels=(32, 48, 64), final=64),
    "small": Filters3D(levels=(8, 12, 16), final=16),
}


def resolve_filters(preset="small", levels=None, final=None):
    if preset not in PRESETS:
        raise ValueError(f"unknown 3D preset {preset!r}; known: {sorted(PRESETS)}")
    filters = PRESETS[preset]
    if levels is not None:
        levels = tuple(int(f) for f in levels)
        if len(levels) != 3 or min(levels) < 1:
            raise ValueError(f"levels must be 3 positive filter counts, got {levels}")
        filters = dataclasses.replace(filters, levels=levels)
    if final is not None:
        filters = dataclasses.replace(filters, final=int(final))
    return filters


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Where a design's output block lies in its input block (the same along every axis)."""

    context: int            # input side - output side (valid convolutions: any input size)
    period: int             # outputs are equivariant to shifts by its multiples only: input
                            # sides, output tiles and tile offsets are multiples of it
    receptive_field: int    # input voxels one output voxel depends on, per axis (measured)

    @property
    def margin(self):
        """Input voxels on each side of the output block."""
        return self.context // 2

    @property
    def smallest_input(self):
        return self.context + self.period

    def output_size(self, input_size):
        """Side of the output block for an input side; ValueError for a size the design
        cannot take."""
        n = int(input_size)
        if n < self.smallest_input:
            raise ValueError(f"input size {n} is smaller than the smallest this design takes, {self.smallest_input}")
        if n % self.period:
            below = max(n - n % self.period, self.smallest_input)
            raise ValueError(f"input size {n} is not a multiple of {self.period} "
                             f"(the design pools twice by 2); use {below} or {below + self.period}")
        return n - self.context

    def input_sizes(self, smallest, largest):
        """The valid input sides in [smallest, largest]."""
        first = max(int(smallest), self.smallest_input)
        first += -first % self.period
        return list(range(first, int(largest) + 1, self.period))


GEOMETRY = {"atrous": Geometry(context=2 * MARGIN, period=1, receptive_field=RECEPTIVE_FIELD),
            "pooled": Geometry(context=40, period=4, receptive_field=44)}
DESIGNS = tuple(GEOMETRY)


def geometry(design="atrous"):
    if design not in GEOMETRY:
        raise ValueError(f"unknown 3D design {design!r}; known: {list(DESIGNS)}")
    return GEOMETRY[design]


def output_size(input_size, design="atrous"):
    """Side of the predicted block for an input block of side `input_size`."""
    return geometry(design).output_size(input_size)


def needs_features(kind):
    _check_kind(kind)
    return kind != "standard"


def _check_kind(kind):
    require_kind(kind, KINDS, "3D model")


@keras.saving.register_keras_serializable(package="brats_tf")
class DilatedMaxPool3D(layers.Layer):
    """Max over a 3×3×3 window whose taps are `rate` voxels apart, stride 1, valid:
    each spatial side shrinks by 2 * rate. Separable (max along x, then y, then z)."""

    def __init__(self, rate=1, **kwargs):
        super().__init__(**kwargs)
        self.rate = int(rate)

    def call(self, x):
        r = self.rate
        for axis in (1, 2, 3):
            taps = [_slice_axis(x, axis, start, -2 * r + start if start < 2 * r else None)
                    for start in (0, r, 2 * r)]
            x = ops.maximum(ops.maximum(taps[0], taps[1]), taps[2])
        return x

    def compute_output_shape(self, shape):
        shrink = lambda n: None if n is None else n - 2 * self.rate
        return (shape[0], *(shrink(n) for n in shape[1:4]), shape[4])

    def get_config(self):
        return {**super().get_config(), "rate": self.rate}


def _slice_axis(x, axis, start, stop):
    index = [slice(None)] * 5
    index[axis] = slice(start, stop)
    return x[tuple(index)]


def _conv(x, filters, name, dilation=1, kernel_size=3):
    return layers.Conv3D(filters, kernel_size, dilation_rate=dilation, padding="valid",
                         activation="relu", name=name)(x)


def _crop_to(skip, shrink, name):
    """Centered crop of a skip connection by `shrink` voxels per side (a constant: valid
    convolutions shrink every input size by the same amount)."""
    return layers.Cropping3D(shrink // 2, name=name)(skip)


def body(x, filters, prefix):
    """The U-Net up to the last concatenation; shrinks each side by BODY_SHRINK (42)."""
    f0, f1, f2 = filters.levels
    x = _conv(x, f0, f"{prefix}.down0a")
    skip0 = _conv(x, f0, f"{prefix}.down0b")
    x = DilatedMaxPool3D(1, name=f"{prefix}.pool0")(skip0)
    x = _conv(x, f1, f"{prefix}.down1a", dilation=2)
    skip1 = _conv(x, f1, f"{prefix}.down1b", dilation=2)
    x = DilatedMaxPool3D(2, name=f"{prefix}.pool1")(skip1)
    x = _conv(x, f2, f"{prefix}.bottom_a", dilation=4)
    x = _conv(x, f2, f"{prefix}.bottom_b", dilation=4)
    # Shrinks (whole side) from each skip to here: skip1 -> pool1 (4) + two d4 convs (16) = 20;
    x = layers.Concatenate(name=f"{prefix}.concat1")([_crop_to(skip1, 20, f"{prefix}.crop1"), x])
    x = _conv(x, f1, f"{prefix}.up1a", dilation=2)
    x = _conv(x, f1, f"{prefix}.up1b", dilation=2)
    # skip0 -> pool0 (2) + two d2 convs (8) + 20 + two d2 convs (8) = 38.
    return layers.Concatenate(name=f"{prefix}.concat0")([_crop_to(skip0, 38, f"{prefix}.crop0"), x])


def pooled_body(x, filters, prefix):
    """The pooled U-Net (module docstring) up to its last conv; shrinks each side by 19."""
    f0, f1, f2 = filters.levels
    x = _conv(x, f0, f"{prefix}.down0a")
    skip0 = _conv(x, f0, f"{prefix}.down0b")
    x = layers.MaxPooling3D(2, name=f"{prefix}.pool0")(skip0)
    x = _conv(x, f1, f"{prefix}.down1a")
    skip1 = _conv(x, f1, f"{prefix}.down1b")
    x = layers.MaxPooling3D(2, name=f"{prefix}.pool1")(skip1)
    x = _conv(x, f2, f"{prefix}.bottom_a")
    x = _conv(x, f2, f"{prefix}.bottom_b")
    # Each skip's side minus its concatenation's: skip1 -> pool, 2 bottom convs (-4), up:
    # 2 * 4 = 8; skip0 -> pool, 2 convs (-4), that 8, 2 convs (-4), up: 2 * 16 = 32.
    x = _up(x, f1, f"{prefix}.up1")
    x = layers.Concatenate(name=f"{prefix}.concat1")([_crop_to(skip1, 8, f"{prefix}.crop1"), x])
    x = _conv(x, f1, f"{prefix}.up1a")
    x = _conv(x, f1, f"{prefix}.up1b")
    x = _up(x, f0, f"{prefix}.up0")
    x = layers.Concatenate(name=f"{prefix}.concat0")([_crop_to(skip0, 32, f"{prefix}.crop0"), x])
    # One conv more than the à trous body: the context becomes 40, a multiple of the period 4.
    return _conv(x, f0, f"{prefix}.up0a")


def _up(x, filters, name):
    """Up-convolution: 2³ kernel, stride 2 (each side exactly doubled), linear like the
    U-Nets' (the convolutions after the concatenation have the ReLUs)."""
    return layers.Conv3DTranspose(filters, 2, strides=2, padding="valid", name=name)(x)


BODIES = {"atrous": body, "pooled": pooled_body}


def final_sequence(x, filters, num_classes):
    """conv 3³, conv 1³, classification layer `main` (logits): shrinks by 2."""
    x = _conv(x, filters.final, "final.conv_a")
    x = _conv(x, filters.final, "final.conv_b", kernel_size=1)
    return layers.Conv3D(num_classes, 1, name="main")(x)


def build_3d_model(kind="standard", num_image_channels=4, num_features=0, preset="small",
                   num_classes=NUM_CLASSES, input_size=None, levels=None, final=None, presence=False,
                   design="atrous"):
    """One of the 3D models (see the module docstring).

    The input `patch` has num_image_channels + num_features channels (features last);
    `input_size` fixes its side (None: any size the design takes, as used for tiled
    inference: >= 45 à trous, multiples of 4 >= 44 pooled).
    presence: a second input `present` (B, K) (see the module docstring).
    design: "atrous" (dilated, full resolution) or "pooled" (module docstring).
    """
    _check_kind(kind)
    if needs_features(kind) and num_features < 1:
        raise ValueError(f"2D-3D model {kind} needs feature channels (num_features >= 1)")
    if kind == "standard" and num_features:
        raise ValueError("the standard 3D model takes no feature channels")
    if input_size is not None:
        output_size(input_size, design)   # validates
    geometry(design)
    filters = resolve_filters(preset, levels, final)
    k, f = int(num_image_channels), int(num_features)
    patch = keras.Input((input_size,) * 3 + (k + f,), name="patch")
    inputs, x = patch, patch
    if presence:
        present = keras.Input((k,), name="present")
        inputs, x, k = {"patch": patch, "present": present}, _with_presence(patch, present, k, f), 2 * k
    merged = STREAMS[kind](x, k, f, filters, design)
    logits = final_sequence(merged, filters, num_classes)
    name = f"unet3d_{kind}" if design == "atrous" else f"unet3d_{kind}_{design}"
    return keras.Model(inputs, [logits], name=name)


def _with_presence(patch, present, k, f):
    """[image zero-filled where missing, K presence channels, features]."""
    image = SequenceGate(name="presence.zero_fill")([SelectChannels(range(k), name="presence.image")(patch), present])
    parts = [image, PresenceChannels(name="presence.channels")([patch, present])]
    if f:
        parts.append(SelectChannels(range(k, k + f), name="presence.features")(patch))
    return layers.Concatenate(name="presence.concat")(parts)


# --- the kinds: how image (first k channels) and features (next f) reach the final sequence

def _one_stream(patch, k, f, filters, design):
    """Standard (image only) and A (image + features as input channels): one body."""
    return BODIES[design](patch, filters, "stream")


def _features_before_final(patch, k, f, filters, design):
    """B: the body sees the image; the features join it, centre-cropped, before the final sequence."""
    features = SelectChannels(range(k, k + f), name="features")(patch)
    body_shrink = geometry(design).context - 2   # the final 3³ conv takes the last 2 voxels
    cropped = layers.Cropping3D(body_shrink // 2, name="features.crop")(features)
    image = SelectChannels(range(k), name="image")(patch)
    return layers.Concatenate(name="features.concat")([BODIES[design](image, filters, "stream"), cropped])


def _two_streams(patch, k, f, filters, design):
    """C: an image-only stream and an image + features stream, concatenated."""
    image = SelectChannels(range(k), name="image")(patch)
    body_of = BODIES[design]
    return layers.Concatenate(name="streams.concat")(
        [body_of(image, filters, "image_stream"), body_of(patch, filters, "feature_stream")])


STREAMS = {"standard": _one_stream, "A": _one_stream, "B": _features_before_final, "C": _two_streams}
KINDS = tuple(STREAMS)
