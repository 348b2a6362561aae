"""FLOPs counted from a TensorFlow graph (for the bench scripts; not part of the library).

`count_flops(fn, *specs)` traces `fn` at fixed input shapes (`tf.function(fn)
.get_concrete_function(*specs)`) and counts its graph with TensorFlow's profiler
(`tf.compat.v1.profiler`, `ProfileOptionBuilder.float_operation()`), which sums the
"flops" statistic each op type registers:

- a multiply-add counts as 2 FLOPs: Conv2D / Conv3D give 2 * k^d * Cin * Cout per output
  element, MatMul 2 * K per output element (tests/test_flop_count.py checks it);
- BiasAdd counts 1 per output element, element-wise Add/Mul/Sub/Maximum... 1 per element;
- activations (Relu, Sigmoid...), pooling by MaxPool3D, resizing, pads, slices, concats
  and casts count 0: they register no statistic;
- a dilated convolution runs as SpaceToBatchND + Conv + BatchToSpaceND and counts the
  real taps only (2 * k^d * Cin * Cout per output element, as an undilated one), over the
  outputs actually computed: space-to-batch rounds each side up to a multiple of the
  dilation, and the extra outputs are cropped afterwards;
- the 3D convolution gradients (Conv3DBackpropInputV2, Conv3DBackpropFilterV2) register
  no statistic in TF 2.21: `count_flops` adds them itself, each 2 * k^3 * Cin * Cout per
  element of the forward convolution's output (= the forward conv's count). The profiler's
  2D gradients (Conv2DBackpropInput / Filter) use the input image's size instead of the
  output's; equal for 'same' padding, which the 2D models use.

Only the ops the function's outputs need are counted (the graph may hold dead ones, e.g.
the input gradient of a first layer). Ops inside nested function calls (PartitionedCall,
While, If) would not be counted;
`FlopCount.uncounted` lists the op types of the graph that add nothing, so a reader
can see what was left out.
"""

import dataclasses

import numpy as np
import tensorflow as tf

# Op types with no registered "flops" statistic whose arithmetic we count ourselves.
_CONV3D_GRADIENTS = ("Conv3DBackpropInputV2", "Conv3DBackpropFilterV2",
                     "Conv3DBackpropInput", "Conv3DBackpropFilter")
# Op types that do no arithmetic worth counting (data movement, bookkeeping).
_NO_ARITHMETIC = {"Placeholder", "Const", "Identity", "NoOp", "ReadVariableOp", "Reshape", "Squeeze",
                  "ExpandDims", "ConcatV2", "Pack", "Unpack", "StridedSlice", "Slice", "Pad", "PadV2",
                  "Transpose", "Shape", "ShapeN", "Cast", "SpaceToBatchND", "BatchToSpaceND", "Fill",
                  "ZerosLike", "OnesLike", "BroadcastTo", "BroadcastGradientArgs", "StopGradient",
                  "GatherV2", "Range", "Size", "Rank", "Tile", "Split", "SplitV", "SelectV2", "Select",
                  "OneHot", "PreventGradient", "EnsureShape", "StridedSliceGrad", "IdentityN"}


@dataclasses.dataclass
class FlopCount:
    """FLOPs of one call of a traced function."""
    total: int          # profiler + added
    profiler: int       # what tf.compat.v1.profiler counted
    added: int          # the 3D convolution gradients the profiler does not count
    by_type: dict       # op type -> FLOPs (counted ones)
    uncounted: dict     # op type -> number of ops that added nothing (no registered statistic)
    outputs: list = None  # the traced function's output shapes (when traced here)

    def to_json(self):
        return {"flops": self.total, "profiler_flops": self.profiler, "added_flops": self.added,
                "uncounted_ops": dict(sorted(self.uncounted.items()))}


def concrete(fn, *specs):
    """The concrete function of `fn` at fixed input specs (one graph, every shape known)."""
    return tf.function(fn).get_concrete_function(*specs)


def profile_graph(graph):
    """{op name: FLOPs} from TensorFlow's profiler for a graph with fully known shapes."""
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    result = tf.compat.v1.profiler.profile(graph=graph, options=options)
    return {child.name: int(child.total_float_ops) for child in result.children}, int(result.total_float_ops)


def _conv3d_gradient_flops(op):
    """2 * k^3 * Cin * Cout * output elements of the forward conv, for a gradient op."""
    if op.type.startswith("Conv3DBackpropInput"):
        kernel, out_backprop = op.inputs[1].shape, op.inputs[2].shape
    else:   # filter gradient: the kernel's shape is this op's output
        kernel, out_backprop = op.outputs[0].shape, op.inputs[2].shape
    if not (kernel.is_fully_defined() and out_backprop.is_fully_defined()):
        raise ValueError(f"{op.name}: shapes not fully known ({kernel}, {out_backprop})")
    return 2 * int(np.prod(kernel.as_list(), dtype=np.int64)) * int(np.prod(out_backprop.as_list()[:-1],
                                                                             dtype=np.int64))


def live_ops(function):
    """The ops of a concrete function's graph that its outputs (or control outputs) need.
    Others are pruned before running: the gradient of a convolution builds both its input
    and filter gradients, but the input gradient of a model's first layer feeds nothing."""
    todo = [t.op for t in function.outputs] + list(function.graph.control_outputs)
    live = set()
    while todo:
        op = todo.pop()
        if op.name in live:
            continue
        live.add(op.name)
        todo.extend(t.op for t in op.inputs)
        todo.extend(op.control_inputs)
    return live


def count_graph(graph, live=None):
    """FLOPs of the ops of `graph` (only those named in `live`, when given)."""
    by_name, _ = profile_graph(graph)
    by_type, uncounted, added, profiler_total = {}, {}, 0, 0
    for op in graph.get_operations():
        if live is not None and op.name not in live:
            continue
        profiler_total += by_name.get(op.name, 0)
        flops = by_name.get(op.name, 0)
        if op.type in _CONV3D_GRADIENTS:
            extra = _conv3d_gradient_flops(op)
            added += extra
            flops += extra
        if flops:
            by_type[op.type] = by_type.get(op.type, 0) + flops
        elif op.type not in _NO_ARITHMETIC:
            uncounted[op.type] = uncounted.get(op.type, 0) + 1
    return FlopCount(profiler_total + added, profiler_total, added, by_type, uncounted)


def count_flops(fn, *specs):
    """FLOPs of one call of `fn` at the fixed input specs (tf.TensorSpec, or nests of them)."""
    function = concrete(fn, *specs)
    count = count_graph(function.graph, live_ops(function))
    count.outputs = [tuple(t.shape.as_list()) for t in tf.nest.flatten(function.structured_outputs)]
    return count


def _spec(shape, dtype=tf.float32):
    return shape if isinstance(shape, tf.TensorSpec) else tf.TensorSpec(tuple(shape), dtype)


def model_call_flops(model, input_shape):
    """FLOPs of one inference call `model(x, training=False)` on an input of `input_shape`."""
    return count_flops(lambda x: model(x, training=False), _spec(input_shape))


def gradient_flops(model, input_shape, label_shape, loss_fn):
    """FLOPs of one forward + backward pass: the gradient of `loss_fn(y, outputs)` (plus the
    model's regularization losses) with respect to every trainable variable. No optimizer."""
    def grads(x, y):
        with tf.GradientTape() as tape:
            outputs = model(x, training=True)
            loss = loss_fn(y, outputs)
            if model.losses:
                loss += tf.add_n(model.losses)
        return tape.gradient(loss, model.trainable_variables)

    return count_flops(grads, _spec(input_shape), _spec(label_shape, tf.int32))
