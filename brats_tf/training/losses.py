"""Training losses: batch-adaptive weighted cross-entropy, deep supervision, soft Dice.

Weighted cross-entropy [M eq. 1-2, METHOD §4]: a voxel of class c gets the weight
t_c / N_b^c, N_b^c being the number of class-c voxels in the batch, so the classes
contribute the fixed proportions t of the loss whatever the batch composition:

    loss_b = sum_c t'_c * mean_{voxels v of class c} (-log p_v[c])

t' is t renormalized over the classes present in the batch (a class absent from the
batch gets no weight; no division by zero). The paper writes an extra constant factor
1/V (V = voxels in the batch); we leave it out so the value is on the scale of an
ordinary cross-entropy (log 4 ≈ 1.39 at chance). For a fixed batch shape this changes
neither the updates (the optimizer divides the gradient by its norm) nor the decisions
of the LR schedule (it compares ratios of losses).

Distribution: the class counts are of the *global* batch. Under tf.distribute the loss
all-reduces the per-replica counts and batch sizes, and returns per-example values
scaled so that Keras' usual reduction (per-replica mean, times 1/replicas) followed by
the optimizer's cross-replica gradient sum yields exactly the global-batch loss above.
"""

import keras
import numpy as np
import tensorflow as tf
from keras import ops

TARGET_WEIGHTS_2D = (0.7, 0.1, 0.1, 0.1)
TARGET_WEIGHTS_3D = (0.4, 0.2, 0.2, 0.2)
MAIN_LOSS_WEIGHT = 0.75


def _validated_target_weights(target_weights):
    weights = np.asarray(target_weights, dtype=np.float64)
    if weights.ndim != 1 or len(weights) < 2:
        raise ValueError(f"target_weights must be a list of >= 2 numbers, got {target_weights}")
    if np.any(weights < 0) or not np.isclose(weights.sum(), 1.0):
        raise ValueError(f"target_weights must be >= 0 and sum to 1, got {target_weights}")
    return tuple(float(w) for w in weights)


def _global_sum(values):
    """Sums a small tensor over replicas when called inside a replica context.

    Outside tf.distribute (or in cross-replica context, e.g. Keras' symbolic build)
    this is the identity.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return values
    return context.all_reduce(tf.distribute.ReduceOp.SUM, values)


def _integer_labels(y_true, logits):
    """Labels as int32 with the logits' spatial shape (accepts a trailing 1 axis)."""
    labels = ops.cast(y_true, "int32")
    if len(labels.shape) == len(logits.shape):
        labels = ops.squeeze(labels, axis=-1)
    return labels


@keras.saving.register_keras_serializable(package="brats_tf")
class WeightedCrossEntropy(keras.losses.Loss):
    """Batch-adaptive weighted cross-entropy from logits (2D or 3D).

    y_true: integer labels (B, *spatial) or (B, *spatial, 1); y_pred: logits
    (B, *spatial, C). `call` returns one value per example; with the default
    reduction the loss is the global-batch value described in the module docstring.
    """

    def __init__(self, target_weights=TARGET_WEIGHTS_2D, name="weighted_cross_entropy",
                 reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.target_weights = _validated_target_weights(target_weights)

    def call(self, y_true, y_pred):
        logits = ops.cast(y_pred, "float32")
        num_classes = len(self.target_weights)
        if logits.shape[-1] is not None and logits.shape[-1] != num_classes:
            raise ValueError(f"logits have {logits.shape[-1]} classes, "
                             f"target_weights has {num_classes}")
        labels = _integer_labels(y_true, logits)
        one_hot = ops.one_hot(labels, num_classes, dtype="float32")
        voxel_ce = -ops.sum(one_hot * ops.log_softmax(logits, axis=-1), axis=-1)

        spatial_axes = tuple(range(1, len(one_hot.shape) - 1))
        per_example_counts = ops.sum(one_hot, axis=spatial_axes)  # (B, C)
        local_batch = ops.cast(ops.shape(per_example_counts)[0], "float32")
        local_stats = ops.concatenate(
            [ops.sum(per_example_counts, axis=0), ops.reshape(local_batch, (1,))], axis=0)
        global_stats = ops.stop_gradient(_global_sum(local_stats))
        counts, global_batch = global_stats[:num_classes], global_stats[num_classes]

        class_weights = _class_weights(counts, self.target_weights)
        voxel_weights = ops.sum(one_hot * class_weights, axis=-1)
        per_example = ops.sum(voxel_weights * voxel_ce, axis=spatial_axes)
        # Keras divides by the local batch size and by the number of replicas, i.e. by
        # the global batch size: multiplying by it here makes the sum come out right.
        return per_example * global_batch

    def get_config(self):
        return {**super().get_config(), "target_weights": list(self.target_weights)}

    # Micro-batches (a batch too large for memory split into parts, `build_train_step`): the
    # class weights come from the whole (global) batch, so the parts' sums add up to the
    # batch's loss exactly, and so do their gradients.
    def batch_counts(self, y_true):
        """Class counts (C,) of the global batch (all replicas), as the weights use them."""
        labels = _integer_labels(y_true, ops.zeros((1,) * (len(y_true.shape) + 1)))
        one_hot = ops.one_hot(labels, len(self.target_weights), dtype="float32")
        return ops.stop_gradient(_global_sum(ops.sum(one_hot, axis=tuple(range(len(one_hot.shape) - 1)))))

    def part_sum(self, y_true, y_pred, counts):
        """This replica's share of the loss from a part of the batch: the sum over its voxels
        of weight(counts) x cross-entropy. Summed over the parts and replicas: the loss."""
        logits = ops.cast(y_pred, "float32")
        one_hot = ops.one_hot(_integer_labels(y_true, logits), len(self.target_weights), dtype="float32")
        voxel_ce = -ops.sum(one_hot * ops.log_softmax(logits, axis=-1), axis=-1)
        voxel_weights = ops.sum(one_hot * _class_weights(counts, self.target_weights), axis=-1)
        return ops.sum(voxel_weights * voxel_ce)


def _class_weights(counts, target_weights):
    """t'_c / N_c for present classes, 0 for absent ones (t' renormalized over present)."""
    targets = ops.convert_to_tensor(np.asarray(target_weights, np.float32))
    present = ops.cast(counts > 0, "float32")
    present_targets = targets * present
    renormalized = ops.divide_no_nan(present_targets, ops.sum(present_targets))
    return ops.divide_no_nan(renormalized, counts)


def weighted_cross_entropy(target_weights=TARGET_WEIGHTS_2D, name="weighted_cross_entropy"):
    """The batch-adaptive weighted cross-entropy loss object (see WeightedCrossEntropy)."""
    return WeightedCrossEntropy(target_weights=target_weights, name=name)


def deep_supervision_weights(output_names, main_weight=MAIN_LOSS_WEIGHT):
    """Loss coefficients [M eq. 3]: `main` gets main_weight, each auxiliary head an
    equal share of the rest (0.25/(K+1) by default). A model with only `main` gets 1."""
    names = list(output_names)
    if "main" not in names:
        raise ValueError(f"no 'main' output among {names}")
    aux = [n for n in names if n != "main"]
    if not aux:
        return {"main": 1.0}
    return {"main": main_weight, **{n: (1.0 - main_weight) / len(aux) for n in aux}}


def deep_supervision_losses(output_names, target_weights=TARGET_WEIGHTS_2D,
                            main_weight=MAIN_LOSS_WEIGHT):
    """(loss, loss_weights) dicts for `model.compile`, keyed by output name."""
    weights = deep_supervision_weights(output_names, main_weight)
    losses = {n: weighted_cross_entropy(target_weights, name=f"{n}_wce") for n in weights}
    return losses, weights


def deep_supervision_loss(y_true, outputs, target_weights=TARGET_WEIGHTS_2D,
                          main_weight=MAIN_LOSS_WEIGHT):
    """Total loss for a custom training loop: sum of weight * weighted CE over heads.

    outputs: dict name -> logits (or a list ordered like the model's outputs, whose
    first entry is `main`). Replica-scaled like any Keras loss inside strategy.run.
    """
    if not isinstance(outputs, dict):
        outputs = {("main" if i == 0 else f"aux_{i}"): o for i, o in enumerate(outputs)}
    weights = deep_supervision_weights(outputs.keys(), main_weight)
    loss_fn = weighted_cross_entropy(target_weights)
    return sum(w * loss_fn(y_true, outputs[name]) for name, w in weights.items())


@keras.saving.register_keras_serializable(package="brats_tf")
class SoftDiceLoss(keras.losses.Loss):
    """Soft Dice loss from logits, per example: 1 - mean over classes of
    (2 sum p*y + smooth) / (sum p + sum y + smooth).

    Binary when the logits have one channel (sigmoid, Dice of the foreground);
    otherwise softmax over C classes, averaged over classes 1..C-1 unless
    include_background. Computed per example (each image its own Dice), which keeps
    replica scaling right; `smooth` makes an example without a class count as
    perfect when nothing is predicted there and avoids 0/0.
    """

    def __init__(self, include_background=False, smooth=1.0, name="soft_dice",
                 reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.include_background = include_background
        self.smooth = float(smooth)

    def call(self, y_true, y_pred):
        logits = ops.cast(y_pred, "float32")
        labels = _integer_labels(y_true, logits)
        if logits.shape[-1] == 1:
            probs = ops.sigmoid(logits)
            truth = ops.expand_dims(ops.cast(labels > 0, "float32"), -1)
        else:
            probs = ops.softmax(logits, axis=-1)
            truth = ops.one_hot(labels, logits.shape[-1], dtype="float32")
            if not self.include_background:
                probs, truth = probs[..., 1:], truth[..., 1:]
        spatial_axes = tuple(range(1, len(probs.shape) - 1))
        intersection = ops.sum(probs * truth, axis=spatial_axes)
        denominator = ops.sum(probs, axis=spatial_axes) + ops.sum(truth, axis=spatial_axes)
        dice = (2.0 * intersection + self.smooth) / (denominator + self.smooth)
        return 1.0 - ops.mean(dice, axis=-1)

    def get_config(self):
        return {**super().get_config(), "include_background": self.include_background,
                "smooth": self.smooth}


__all__ = [
    "TARGET_WEIGHTS_2D", "TARGET_WEIGHTS_3D", "MAIN_LOSS_WEIGHT",
    "WeightedCrossEntropy", "weighted_cross_entropy", "deep_supervision_weights",
    "deep_supervision_losses", "deep_supervision_loss", "SoftDiceLoss",
]
