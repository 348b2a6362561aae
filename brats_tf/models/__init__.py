"""Keras 3 functional models (one module per family; see each module's docstring)."""

from brats_tf.models.unet2d import (
    PRESETS,
    Filters2D,
    build_2d_model,
    build_2d_model_1,
    build_2d_model_2,
    build_subnetwork_model,
    build_unet_axial,
    inference_model,
    load_subnetwork_weights,
    output_names,
    pooling_factor,
)

__all__ = [
    "PRESETS", "Filters2D", "build_2d_model", "build_2d_model_1", "build_2d_model_2",
    "build_subnetwork_model", "build_unet_axial", "inference_model",
    "load_subnetwork_weights", "output_names", "pooling_factor",
]
