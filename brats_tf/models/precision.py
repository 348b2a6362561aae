"""Running a trained model in another numeric precision for inference (issue 14 item 4).

Models are trained and saved in float32. `with_precision(model, "bf16")` switches every
layer but the outputs to Keras's `mixed_bfloat16` policy: the weights stay float32
variables, each layer casts its inputs and weights to bfloat16 and computes in it (our
networks ran 1.3-2× as fast as in float32 on a CPU with AVX512_BF16, BUILD_NOTES issue 14;
AMX CPUs, GPUs from Ampere and TPUs have it natively too), and the output layers (the logits) stay
float32, so label maps and probabilities come from float32 logits. Batch normalization
computes its statistics in float32 under this policy (Keras does).
"""

import keras

from brats_tf.constants import PRECISIONS

# --precision value -> the Keras dtype policy of the model's inner layers
POLICIES = dict(zip(PRECISIONS, ("float32", "mixed_bfloat16")))


def with_precision(model, precision):
    """`model` (a built functional Keras model) with its inner layers in `precision`; the
    same object, changed in place before its first traced call. fp32 leaves it as it is."""
    if precision not in POLICIES:
        raise ValueError(f"unknown precision {precision!r}; use one of {PRECISIONS}")
    if precision == "fp32":
        return model
    spec = model.get_config()["output_layers"]   # [name, node, index], or a list of them
    outputs = {spec[0]} if isinstance(spec[0], str) else {name for name, *_ in spec}
    for layer in _all_layers(model):
        if layer.name not in outputs and not isinstance(layer, keras.layers.InputLayer):
            layer.dtype_policy = POLICIES[precision]
    return model


def _all_layers(model):
    """Every layer of a functional model, those of nested models included."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)
