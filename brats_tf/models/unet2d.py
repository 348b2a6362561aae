"""2D models [M §2.2, Fig. 6, Fig. 9 top; METHOD §2].

- 2D model 1: K+1 modality-specific subnetworks (one per modality on its channel,
  `all` on the K channels), each a reduced U-Net with an auxiliary classification
  head, feeding a U-Net main network.
- 2D model 2: the same with three-conv subnetworks.
- U-Net axial baseline: the main U-Net directly on the K channels.

Inputs: `image` (B, H, W, K), any H, W that are multiples of `pooling_factor(...)`; models
built with `presence=True` (sequence dropout, issue 15) take {"image", "present"}, present
(B, K) 1.0 / 0.0 per sequence: a missing sequence's subnetwork and auxiliary head are
multiplied by 0 (exactly nothing reaches the main network, no gradient reaches them) and the
`all` subnetwork sees its channel zero-filled.
Outputs (a list, in this order; the output names are the layer names): `main`, then
`aux_<modality>` for each modality in the given order, then `aux_all`. All outputs
are logits (no softmax). Layers are named `sub_<modality>.*` / `sub_all.*` (the
subnetworks, heads `aux_*`) and `main.*` (main network, head `main`).
"""

import dataclasses
import re

import keras
from keras import layers

from brats_tf.constants import NUM_CLASSES
from brats_tf.errors import require_kind
from brats_tf.models.blocks import (SelectChannels, SequenceGate, classifier,
                                    reduced_unet, shallow_stack, unet)

ALL = "all"


@dataclasses.dataclass(frozen=True)
class Filters2D:
    """Sizes of a 2D model (config values; the paper gives none in its text).

    sub_filters: maps of each subnetwork's first and last layers.
    sub_depth: max-poolings inside a model-1 subnetwork (its maps double per level).
    main_filters: maps per main U-Net level, top to bottom; len - 1 poolings.
    """

    sub_filters: int
    sub_depth: int
    main_filters: tuple

    def pooling_factor(self, kind):
        main = 2 ** (len(self.main_filters) - 1)
        return max(main, 2 ** self.sub_depth) if kind == "model1" else main


PRESETS = {
    "paper": Filters2D(sub_filters=32, sub_depth=2, main_filters=(64, 128, 256, 512, 512)),
    "small": Filters2D(sub_filters=8, sub_depth=1, main_filters=(16, 32, 64, 64)),
}


def resolve_filters(preset="small", **overrides):
    """A preset's Filters2D with any of its fields overridden (None = keep)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "main_filters" in overrides:
        overrides["main_filters"] = tuple(int(f) for f in overrides["main_filters"])
    filters = dataclasses.replace(PRESETS[preset], **overrides)
    if len(filters.main_filters) < 2 or filters.sub_filters < 1 or filters.sub_depth < 0:
        raise ValueError(f"invalid 2D model sizes: {filters}")
    return filters


def pooling_factor(kind, preset="small", **overrides):
    """Slice sizes must be multiples of this (the pipeline pads to it)."""
    _check_kind(kind)
    return resolve_filters(preset, **overrides).pooling_factor(kind)


def modality_names(modalities):
    """Names of the modality channels: given names, or ch0..chK-1 for an int K."""
    if isinstance(modalities, int):
        if modalities < 1:
            raise ValueError(f"need at least one modality, got {modalities}")
        return tuple(f"ch{i}" for i in range(modalities))
    names = tuple(modalities)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"modalities must be non-empty and unique, got {names}")
    for name in names:
        if name == ALL or not re.fullmatch(r"[a-z0-9_]+", name):
            raise ValueError(f"invalid modality name {name!r}")
    return names


def output_names(kind, modalities):
    """The model's outputs in order: main, then one auxiliary head per subnetwork."""
    _check_kind(kind)
    if kind == "unet_axial":
        return ["main"]
    return ["main"] + [f"aux_{m}" for m in modality_names(modalities)] + [f"aux_{ALL}"]


def _check_kind(kind):
    require_kind(kind, KINDS, "2D model")


def _image_input(channels):
    return keras.Input((None, None, channels), name="image")


def _subnetwork(x, kind, modality, filters, num_classes):
    """One subnetwork on x; returns (last layer features, auxiliary logits)."""
    prefix = f"sub_{modality}"
    if kind == "model1":
        features = reduced_unet(x, filters.sub_filters, filters.sub_depth, prefix)
    else:
        features = shallow_stack(x, filters.sub_filters, prefix)
    return features, classifier(features, num_classes, f"aux_{modality}")


def _build_with_subnetworks(kind, modalities, filters, num_classes, name, presence=False):
    names = modality_names(modalities)
    image = _image_input(len(names))
    present = keras.Input((len(names),), name="present") if presence else None
    branches = [(m, SelectChannels([i], name=f"sub_{m}.input")(image))
                for i, m in enumerate(names)]
    branches.append((ALL, SequenceGate(name="sub_all.zero_fill")([image, present]) if presence else image))
    features, aux_logits = [], []
    for index, (modality, x) in enumerate(branches):
        f, aux = _subnetwork(x, kind, modality, filters, num_classes)
        if presence and modality != ALL:   # a missing sequence's subnetwork: exactly nothing
            f = SequenceGate(index, name=f"sub_{modality}.gate")([f, present])
            aux = SequenceGate(index, name=f"aux_{modality}.gate")([aux, present])
        features.append(f)
        aux_logits.append(aux)
    merged = layers.Concatenate(name="main.input")(features)
    main_logits = classifier(unet(merged, filters.main_filters, "main"), num_classes, "main")
    inputs = {"image": image, "present": present} if presence else image
    return keras.Model(inputs, [main_logits, *aux_logits], name=name)


def build_2d_model_1(modalities, preset="small", num_classes=NUM_CLASSES, presence=False, **overrides):
    """2D model 1: reduced-U-Net subnetworks. presence: a second input `present` (B, K)
    gates the subnetworks (any non-empty subset of the sequences). overrides: sub_filters,
    sub_depth, main_filters."""
    filters = resolve_filters(preset, **overrides)
    return _build_with_subnetworks("model1", modalities, filters, num_classes, "model2d_1", presence)


def build_2d_model_2(modalities, preset="small", num_classes=NUM_CLASSES, presence=False, **overrides):
    """2D model 2: three-conv subnetworks (sub_depth is unused)."""
    filters = resolve_filters(preset, **overrides)
    return _build_with_subnetworks("model2", modalities, filters, num_classes, "model2d_2", presence)


def build_unet_axial(modalities, preset="small", num_classes=NUM_CLASSES, presence=False, **overrides):
    """Baseline: a plain U-Net with BN on all K channels; one output, `main`."""
    if presence:
        raise ValueError("the U-Net baseline has no subnetworks to gate: presence needs model1 or model2")
    filters = resolve_filters(preset, **overrides)
    image = _image_input(len(modality_names(modalities)))
    logits = classifier(unet(image, filters.main_filters, "main"), num_classes, "main")
    return keras.Model(image, [logits], name="unet_axial")


BUILDERS = {"model1": build_2d_model_1, "model2": build_2d_model_2,
            "unet_axial": build_unet_axial}
KINDS = tuple(BUILDERS)


def build_2d_model(kind, modalities, preset="small", num_classes=NUM_CLASSES, presence=False, **overrides):
    """Dispatch on kind: 'model1' | 'model2' | 'unet_axial'."""
    _check_kind(kind)
    return BUILDERS[kind](modalities, preset, num_classes, presence=presence, **overrides)


def inference_model(model):
    """Main logits only (pre-softmax), sharing the trained layers: for inference and
    for the 2D features the 3D stage stores. The auxiliary heads are dropped."""
    return keras.Model(model.input, model.get_layer("main").output,
                       name=f"{model.name}_main")


def build_subnetwork_model(modality, modalities, kind="model1", preset="small",
                           num_classes=NUM_CLASSES, **overrides):
    """One subnetwork alone with its auxiliary head, for pretraining [M §2.2].

    Input `image` has 1 channel (that modality) or K channels for `all`; output
    `aux_<modality>` (logits). Its layers carry the same names as in the full model,
    so `load_subnetwork_weights` can copy them across.
    """
    if kind not in ("model1", "model2"):
        raise ValueError(f"kind must be 'model1' or 'model2', got {kind!r}")
    names = modality_names(modalities)
    if modality != ALL and modality not in names:
        raise ValueError(f"modality {modality!r} is not among {names} or {ALL!r}")
    filters = resolve_filters(preset, **overrides)
    image = _image_input(len(names) if modality == ALL else 1)
    _, aux = _subnetwork(image, kind, modality, filters, num_classes)
    return keras.Model(image, [aux], name=f"subnetwork_{modality}")


def load_subnetwork_weights(full_model, sub_model):
    """Copies a pretrained subnetwork's weights (BN statistics included) into the
    matching layers of a full 2D model; returns the names of the layers copied."""
    copied = []
    for layer in sub_model.layers:
        if not layer.weights:
            continue
        try:
            target = full_model.get_layer(layer.name)
        except ValueError:
            raise ValueError(f"{full_model.name} has no layer {layer.name!r}; "
                             "was the subnetwork built for another model?") from None
        source_shapes = [tuple(w.shape) for w in layer.weights]
        target_shapes = [tuple(w.shape) for w in target.weights]
        if source_shapes != target_shapes:
            raise ValueError(f"layer {layer.name!r}: shapes {source_shapes} "
                             f"do not match {target_shapes}")
        target.set_weights(layer.get_weights())
        copied.append(layer.name)
    return copied
