"""The baselines of [S] (Shen & Anderson; METHOD §9): BCN, patch FCN and full-image FCN.

- BCN (baseline convolutional network, [S] Fig. 2): a 25³×K block in, class scores of
  its 9³ center block out. Four valid 5³ convolutions (25 -> 21 -> 17 -> 13 -> 9), each
  followed by ReLU, then two "fully connected" layers as 1³ convolutions, the first with
  ReLU and dropout. One output voxel sees 17³ input voxels; the 9³ block sees the 25³
  input. The model is fully convolutional, so an (n+16)³ input gives n³ outputs: larger
  tiles at inference give the same scores as 25³ -> 9³ tiles, faster.
- Patch FCN ([S] Fig. 3): 24³ in -> 24³ out. Two 3³ convolutions ('same'), each followed by
  ReLU, dropout, batch normalization and 2× max-pooling; two 2³ stride-2 transposed
  convolutions (learnable unpooling), each followed by ReLU and batch normalization; 1³
  score layer.
- FIFCN ([S] Fig. 4): the whole (center-cropped) volume; 2× max-pooling first, then five
  3³ convolutions with ReLU, a 2× max-pooling after each of the first `num_pools`, and
  mirrored stride-2 transposed convolutions (one per pooling, the input down-sampling
  included) with ReLU and batch normalization; 1³ score layer at full resolution.

Decisions where [S] is silent (recorded in BUILD_NOTES): the BCN kernel size (5³, the
only uniform kernel reaching 9³ from 25³ in four layers); filter counts (config values);
the FIFCN pools after its first three convolutions only (160×160×144 / 2 is 80×80×72,
which halves cleanly three more times, not five); layer order conv -> ReLU -> dropout ->
BN everywhere, as [S] §3.3 lists it for the FCN.

Switches: `dropout` and `batch_norm` turn those layers on or off for the ablation
([S] Table 1); where they sit is fixed, and every other layer keeps its name, so weights
of a model trained without them load into one with them (fine-tuning, [S] §5.2).
All kernels carry an L2 regularizer ([S]: Adam with L2 regularization); the trainer adds
`model.losses` to the loss. Output: one tensor of logits named `scores`, C = 2
(background, whole tumor) by default or 4 (the internal classes).
"""

import dataclasses

import keras
import numpy as np
from keras import layers

from brats_tf.errors import require_kind

BINARY_CLASSES = 2
BCN_INPUT, BCN_OUTPUT = 25, 9
FCN_PATCH = 24


@dataclasses.dataclass(frozen=True)
class BaselineSpec:
    """Everything that defines a baseline model (config values; JSON-able)."""
    kind: str
    num_channels: int = 4
    num_classes: int = BINARY_CLASSES
    filters: tuple = (16, 16, 32, 32)
    fc_units: int = 64                 # BCN: width of the first 1³ "fully connected" layer
    dropout: bool = False
    batch_norm: bool = False
    dropout_rate: float = 0.5
    l2: float = 1e-4
    patch_size: int = FCN_PATCH        # FCN input/output size
    volume_size: tuple = (160, 160, 144)   # FIFCN input size (multiples of 2**(1+num_pools))
    num_pools: int = 3                 # FIFCN: poolings inside the network (after the first)

    def __post_init__(self):
        require_kind(self.kind, KINDS, "baseline")
        if self.num_classes not in (2, 4):
            raise ValueError(f"num_classes must be 2 (whole tumor) or 4, got {self.num_classes}")
        expected = {"bcn": 4, "fcn": 2, "fifcn": 5}[self.kind]
        if len(self.filters) != expected:
            raise ValueError(f"{self.kind} needs {expected} filter counts, got {tuple(self.filters)}")
        if self.kind == "fcn" and self.patch_size % 4:
            raise ValueError(f"FCN patch_size must be a multiple of 4, got {self.patch_size}")
        if self.kind == "fifcn":
            factor = self.pooling_factor
            if not 0 <= self.num_pools <= len(self.filters) or any(int(n) % factor for n in self.volume_size):
                raise ValueError(f"FIFCN volume_size {tuple(self.volume_size)} must be multiples of "
                                 f"{factor} (2^(1+num_pools)), with num_pools <= {len(self.filters)}")

    @property
    def pooling_factor(self):
        return {"bcn": 1, "fcn": 4, "fifcn": 2 ** (1 + self.num_pools)}[self.kind]

    @property
    def input_size(self):
        """Training input block edge (BCN, FCN) or volume shape (FIFCN)."""
        return {"bcn": BCN_INPUT, "fcn": self.patch_size, "fifcn": tuple(self.volume_size)}[self.kind]

    @property
    def output_size(self):
        return {"bcn": BCN_OUTPUT, "fcn": self.patch_size, "fifcn": tuple(self.volume_size)}[self.kind]

    def to_json(self):
        d = dataclasses.asdict(self)
        return {**d, "filters": list(self.filters), "volume_size": list(self.volume_size)}

    @classmethod
    def from_json(cls, d):
        fields = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in fields}
        return cls(**{**d, "filters": tuple(d["filters"]), "volume_size": tuple(d["volume_size"])})


def build_baseline(spec):
    """The Keras model of a `BaselineSpec`."""
    return BUILDERS[spec.kind](spec)


def _regularizer(spec):
    return keras.regularizers.L2(spec.l2) if spec.l2 else None


def _conv(x, filters, kernel, name, spec, padding="same"):
    return layers.Conv3D(filters, kernel, padding=padding, kernel_initializer="he_normal",
                         kernel_regularizer=_regularizer(spec), name=name)(x)


def _deconv(x, filters, name, spec):
    """2³ stride-2 transposed convolution: learnable unpooling, each output voxel from
    one input voxel (so the receptive fields are exactly computable)."""
    return layers.Conv3DTranspose(filters, 2, strides=2, kernel_initializer="he_normal",
                                  kernel_regularizer=_regularizer(spec), name=name)(x)


def _after(x, name, spec, dropout=True, batch_norm=True):
    """ReLU, then (when switched on) dropout and batch normalization."""
    x = layers.ReLU(name=f"{name}.relu")(x)
    if dropout and spec.dropout:
        x = layers.Dropout(spec.dropout_rate, name=f"{name}.dropout")(x)
    if batch_norm and spec.batch_norm:
        # Momentum 0.9 (Keras default 0.99): the short CPU-scale runs settle their statistics.
        x = layers.BatchNormalization(momentum=0.9, name=f"{name}.bn")(x)
    return x


def _scores(x, spec):
    return layers.Conv3D(spec.num_classes, 1, kernel_regularizer=_regularizer(spec), name="scores")(x)


def _build_bcn(spec):
    image = keras.Input((None, None, None, spec.num_channels), name="image")
    x = image
    for i, filters in enumerate(spec.filters, start=1):
        x = _conv(x, filters, 5, f"conv{i}", spec, padding="valid")
        x = _after(x, f"conv{i}", spec, dropout=False)
    x = _conv(x, spec.fc_units, 1, "fc1", spec)
    x = _after(x, "fc1", spec)          # [S] Fig. 2: the first FC layer has ReLU + dropout
    return keras.Model(image, _scores(x, spec), name="bcn")


def _build_fcn(spec):
    size = spec.patch_size
    image = keras.Input((size, size, size, spec.num_channels), name="image")
    x = image
    for i, filters in enumerate(spec.filters, start=1):
        x = _conv(x, filters, 3, f"conv{i}", spec)
        x = _after(x, f"conv{i}", spec)
        x = layers.MaxPooling3D(2, name=f"pool{i}")(x)
    for i, filters in zip((2, 1), reversed(spec.filters)):
        x = _deconv(x, filters, f"deconv{i}", spec)
        x = _after(x, f"deconv{i}", spec, dropout=False)
    return keras.Model(image, _scores(x, spec), name="fcn")


def _build_fifcn(spec):
    image = keras.Input(tuple(int(n) for n in spec.volume_size) + (spec.num_channels,), name="image")
    x = layers.MaxPooling3D(2, name="downsample")(image)
    for i, filters in enumerate(spec.filters, start=1):
        x = _conv(x, filters, 3, f"conv{i}", spec)
        x = _after(x, f"conv{i}", spec, batch_norm=False)   # [S] Fig. 4: BN on the deconv side
        if i <= spec.num_pools:
            x = layers.MaxPooling3D(2, name=f"pool{i}")(x)
    # Mirror: one unpooling per pooling, the input down-sampling last.
    for i in range(spec.num_pools, -1, -1):
        x = _deconv(x, spec.filters[max(i - 1, 0)], f"deconv{i}", spec)
        x = _after(x, f"deconv{i}", spec, dropout=False)
    return keras.Model(image, _scores(x, spec), name="fifcn")


BUILDERS = {"bcn": _build_bcn, "fcn": _build_fcn, "fifcn": _build_fifcn}
KINDS = tuple(BUILDERS)


def copy_matching_weights(source, target):
    """Copies the weights of every layer of `source` that `target` has under the same name
    with the same weight shapes (transfer learning: a model trained without dropout/BN into
    one with them). Returns the names of the layers copied; raises if none match."""
    copied = []
    for layer in source.layers:
        if not layer.weights:
            continue
        try:
            other = target.get_layer(layer.name)
        except ValueError:
            continue
        if [tuple(w.shape) for w in layer.weights] == [tuple(w.shape) for w in other.weights]:
            other.set_weights(layer.get_weights())
            copied.append(layer.name)
    if not copied:
        raise ValueError(f"no layer of {source.name} matches {target.name} (name and weight shapes)")
    return copied


def identity_batch_norm(model, layer_names, batches):
    """Sets the named (newly added) BN layers to start as the identity on this data: moving
    mean/variance = the statistics of their input over `batches` (arrays fed to the model),
    gamma = sqrt(variance + epsilon), beta = mean. A model whose other layers came from a
    network trained without BN then starts out computing that network's function, in
    training and in inference mode (up to batch noise), instead of a disrupted one."""
    for name in layer_names:    # in model order: earlier ones are already the identity
        layer = model.get_layer(name)
        probe = keras.Model(model.input, layer.input)
        values = np.concatenate([np.asarray(probe(b, training=False)).reshape(-1, layer.input.shape[-1])
                                 for b in batches])
        mean, variance = values.mean(axis=0), values.var(axis=0)
        layer.set_weights([np.sqrt(variance + layer.epsilon), mean, mean, variance])
