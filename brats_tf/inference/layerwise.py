"""Whole-volume inference of the 3D models layer by layer: every voxel of every layer is
computed once (issue 14 item 2).

Tiled inference (`predict.predict_tiled_3d`) runs the whole network on each tile, and each
tile recomputes a 22-voxel margin on every side at every layer: at 50³ output tiles the
small and paper models spend ~2.3× the FLOPs per output voxel of one pass over the whole
volume, and a tile big enough to make the margin small does not fit in memory (the
convolutions' workspace grows with the tile). Here the network is evaluated one layer at a
time over the whole (padded) volume, each layer's output kept as a NumPy array; a layer with
a spatial window (a valid convolution, the dilated max-pool) is computed in blocks (a pool:
in slabs) that read their input with that layer's own halo, (k - 1) × dilation voxels, and
write disjoint output blocks. So no output is computed twice, and memory holds the live
activations of the whole volume (the skips of the U-Net) plus one block's workspace. A
concatenation is never made whole (`ChannelParts`): the next layer's blocks are cut from
its parts.

Works for the à trous models of `models/unet3d.py` (Conv3D, DilatedMaxPool3D, Cropping3D,
Concatenate, and the per-voxel layers of models/blocks.py); the result equals tiled
inference up to float rounding (tests/test_inference.py). Any other layer is refused (a
pooled model's MaxPooling3D and Conv3DTranspose are strided: blocks would need their offsets
on the pooling grid), not taken for a per-voxel one.
"""

import functools
import itertools
import math
import weakref
from concurrent.futures import ThreadPoolExecutor

import keras
import numpy as np
import tensorflow as tf

from brats_tf.inference.heap import reused_heap
from brats_tf.models.blocks import PresenceChannels, SelectChannels, SequenceGate
from brats_tf.models.unet3d import DilatedMaxPool3D

# Layers computed on whole arrays, each output voxel from the same voxel of its inputs.
PER_VOXEL = (SelectChannels, SequenceGate, PresenceChannels)

# Output block side of a windowed layer, by default. Measured on the paper widths, model A, the
# real case, bf16 (BUILD_NOTES, issue 14, 10th session): 96 ran 3-8 % faster than 64 (80 and 128
# in between) once the copies were off the kernels' way, with the same estimated peak (the
# widest layers' blocks are not where the peak is) and the same measured resident memory.
DEFAULT_BLOCK = 96
# A windowed layer's block costs about this many times its input and output blocks while it
# runs (oneDNN's reordered copies of both, the two input buffers filled in turn, the result
# array and the one still being written).
BLOCK_WORKSPACE_FACTOR = 4
# The process's resident memory grows by up to 1.2 times the arrays and workspace counted
# (TensorFlow's own buffers, and freed arrays kept in glibc's heap for reuse, inference/heap.py:
# 1.19 fp32, 1.20 bf16, model A at paper widths on the real case; 1.05-1.09 before the heap
# was kept): `peak_bytes` includes this so that it bounds what was measured.
ALLOCATOR_OVERHEAD = 1.25
# Byte alignment TensorFlow's CPU kernels require of a tensor's memory (Eigen's EIGEN_MAX_ALIGN_BYTES
# with AVX-512); a block handed over without a copy must start on it.
TENSOR_ALIGNMENT = 64


def predict_layerwise_3d(model, volume, margin, present=None, block=DEFAULT_BLOCK, on_block=None):
    """Logits (X, Y, Z, C) of a valid-convolution 3D model over a whole volume (X, Y, Z, K),
    zero-padded by `margin` (the model's shrink per side, as in training and tiling).
    present: (K,) for a model with a `present` input. on_block(layer, input_shape) is called
    for every block a windowed layer computes, with the layer it runs (a dilated one's
    undilated twin, `_blockwise`): bench/bench_inference.py counts FLOPs so.
    ValueError, before any work, for a model with a layer it does not know (a pooled one)."""
    for layer in model.operations:
        if not isinstance(layer, keras.layers.InputLayer):
            _halo(layer)
    given = {"patch": np.pad(np.asarray(volume, np.float32), [(margin, margin)] * 3 + [(0, 0)])[None]}
    if present is not None:
        given["present"] = np.asarray(present, np.float32).reshape(1, -1)
    values = {id(t): given[_input_name(t, model)] for t in model.inputs}
    del given   # `values` alone holds the padded input, freed after its last consumer
    order = execution_order(model, np.shape(volume)[:3], margin, block)
    with reused_heap():   # freed arrays are reused, not page-faulted in again (inference/heap.py)
        return _run_layers(model, values, block, on_block, order)


def _run_layers(model, values, block, on_block, order):
    uses = _consumers(model)
    for layer in order:
        inputs = _as_list(layer.input)
        arrays = [values[id(t)] for t in inputs]
        values[id(layer.output)] = _apply(layer, arrays, block, on_block)
        for t in inputs:   # free an activation after its last consumer (the skips live longest)
            uses[id(t)] -= 1
            if uses[id(t)] == 0 and not any(t is o for o in model.outputs):
                del values[id(t)]   # a ChannelParts still holding it keeps it until its own end
    return _materialized(values[id(model.outputs[0])])[0]


def peak_bytes(model, shape, margin, block=DEFAULT_BLOCK, itemsize=None):
    """Estimated peak memory (bytes) of `predict_layerwise_3d(model, volume of `shape`)`,
    without running it: the same walk over the layers with each activation's size, the
    arrays alive at each step (an activation lives until its last consumer has run) plus
    the running layer's block workspace, times ALLOCATOR_OVERHEAD. itemsize: bytes per
    stored value (default: the layers' compute dtype, 4 for float32, 2 for mixed bfloat16).
    bench/bench_layerwise.py prints it beside the measured growth of resident memory."""
    return min(_peak_bytes(model, order, shape, margin, block, itemsize) for order in _candidate_orders(model))


def execution_order(model, shape, margin, block=DEFAULT_BLOCK):
    """The order `predict_layerwise_3d` runs the layers in: of the candidate topological
    orders (`_candidate_orders`), the one whose estimated peak memory is the lowest."""
    return min(_candidate_orders(model), key=lambda order: _peak_bytes(model, order, shape, margin, block))


def _candidate_orders(model):
    """Topological orders of the layers (input layers left out): Keras's own (by depth, so
    the two streams of model C advance side by side, each holding its skips), and two
    depth-first ones from the output, which finish one branch before starting the next and
    crop a skip as soon as it exists (the crop, not the uncropped skip, waits for its
    concatenation). Estimated peaks at paper widths on the real case in bf16, Keras's order
    against the lowest depth-first one: model C 5.41 -> 3.81 GiB, B 3.93 -> 3.40, A 3.27 -> 2.99."""
    return [_keras_order(model), _depth_first(model, reverse_inputs=False), _depth_first(model, reverse_inputs=True)]


def _keras_order(model):
    return [layer for layer in model.operations if not isinstance(layer, keras.layers.InputLayer)]


def _depth_first(model, reverse_inputs):
    """Post-order of a depth-first walk from the outputs: each layer after all its inputs."""
    producer = {id(layer.output): layer for layer in _keras_order(model)}
    order, seen = [], set()

    def visit(tensor):
        layer = producer.get(id(tensor))
        if layer is None or id(layer) in seen:
            return
        seen.add(id(layer))
        inputs = _as_list(layer.input)
        for t in (reversed(inputs) if reverse_inputs else inputs):
            visit(t)
        order.append(layer)

    for t in model.outputs:
        visit(t)
    return order


def _peak_bytes(model, order, shape, margin, block=DEFAULT_BLOCK, itemsize=None):
    sizes = {id(t): math.prod(_padded(shape, margin) if len(t.shape) == 5 else ()) * _channels(t) * 4
             for t in model.inputs}   # float32 inputs
    uses = _consumers(model)
    live = peak = sum(sizes.values())
    for layer, inputs, in_sides, out_sides in _walk(model, shape, margin, order):
        value_bytes = itemsize or np.dtype(keras.backend.standardize_dtype(layer.compute_dtype)).itemsize
        sizes[id(layer.output)] = math.prod(out_sides or ()) * _channels(layer.output) * value_bytes
        if _left_unmade(layer):   # ChannelParts: its parts, alive until the concatenation's end
            sizes[id(layer.output)] = sum(sizes[id(t)] for t in inputs)
        workspace = 0
        call = _call_shape(layer, inputs, in_sides, out_sides, block, value_bytes)
        if call is not None:   # the input block (a pool's: a view, but TensorFlow's slices copy it)
            in_block, out_voxels, _ = call
            workspace = BLOCK_WORKSPACE_FACTOR * value_bytes * (
                math.prod(in_block[1:4]) * in_block[4] + out_voxels * _channels(layer.output))
        live += sizes[id(layer.output)]
        if not _left_unmade(layer):   # an unmade concatenation is its parts: counted once, below
            peak = max(peak, live + workspace)
        for t in inputs:
            uses[id(t)] -= 1
            if uses[id(t)] == 0 and not any(t is o for o in model.outputs):
                live -= sizes[id(t)]
    return int(peak * ALLOCATOR_OVERHEAD)


def block_calls(model, shape, margin, block=DEFAULT_BLOCK):
    """[(layer run, input block shape, number of blocks)] for every windowed layer, as
    `predict_layerwise_3d` would compute them over a volume of `shape` (without running:
    bench/bench_inference.py counts the FLOPs of a run from these). A dilated layer is run
    as its undilated twin on its phase lattices (`_blockwise`)."""
    calls = []
    for layer, inputs, in_sides, out_sides in _walk(model, shape, margin):
        itemsize = np.dtype(keras.backend.standardize_dtype(inputs[0].dtype)).itemsize
        call = _call_shape(layer, inputs, in_sides, out_sides, block, itemsize)
        if call is not None:
            in_block, _, count = call
            calls.append((layer if isinstance(layer, DilatedMaxPool3D) else _runs_as(layer), in_block, count))
    return calls


def _call_shape(layer, inputs, in_sides, out_sides, block, itemsize):
    """(input block shape, output voxels per block, number of blocks) of a windowed layer as
    `_apply` runs it (a pool on slabs, any other on blocks of its phase lattices); None for
    a layer run on whole arrays."""
    halo = _halo(layer)
    if halo is None:
        return None
    if isinstance(layer, DilatedMaxPool3D):
        in_shape = (1, *in_sides[0], _channels(inputs[0]))
        thickness, starts = _slab_plan(in_shape, itemsize, halo, block)
        return (1, thickness + halo[0], *in_shape[2:]), thickness * out_sides[1] * out_sides[2], len(starts)
    rates, sides, lattices = _plan(layer, out_sides, block)
    in_block = (1, *(s + h // r for s, h, r in zip(sides, halo, rates)), _channels(inputs[0]))
    return in_block, math.prod(sides), sum(math.prod(counts) for _, counts in lattices)


def _walk(model, shape, margin, order=None):
    """(layer, input tensors, their sides, output sides) of every layer in `order` (default:
    Keras's), over a volume of `shape` padded by `margin` (sides None: a tensor without them,
    `present`)."""
    spatial = {id(t): _padded(shape, margin) if len(t.shape) == 5 else None for t in model.inputs}
    for layer in order or _keras_order(model):
        inputs = _as_list(layer.input)
        in_sides = [spatial.get(id(t)) for t in inputs]
        spatial[id(layer.output)] = _output_spatial(layer, in_sides)
        yield layer, inputs, in_sides, spatial[id(layer.output)]


def _padded(shape, margin):
    return tuple(int(n) + 2 * margin for n in shape[:3])


def _channels(tensor):
    return int(tensor.shape[-1])


def _block_grid(out_shape, block):
    """(block sides, blocks per axis): blocks of side <= `block`, as even as they can be."""
    sides = [math.ceil(n / math.ceil(n / block)) for n in out_shape]
    return sides, [math.ceil(n / s) for n, s in zip(out_shape, sides)]


def _output_spatial(layer, input_spatial):
    """A layer's output sides over the whole volume (None: a tensor without sides, `present`)."""
    first = input_spatial[0]
    if first is None:
        return None
    if isinstance(layer, keras.layers.Cropping3D):
        return tuple(n - a - b for n, (a, b) in zip(first, layer.cropping))
    halo = _halo(layer)
    return first if halo is None else tuple(n - h for n, h in zip(first, halo))


def _input_name(tensor, model):
    names = [t.name for t in model.inputs]
    return "patch" if len(names) == 1 else tensor.name


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _consumers(model):
    uses = {}
    for layer in model.operations:
        if not isinstance(layer, keras.layers.InputLayer):
            for t in _as_list(layer.input):
                uses[id(t)] = uses.get(id(t), 0) + 1
    return uses


class ChannelParts:
    """A concatenation along the channels left unmade: its parts, each (1, X, Y, Z, C_i).
    A windowed layer cuts its input blocks from the parts directly (`_input_block`), so the
    whole-volume concatenated array, the size of both parts together, is never written: the
    decoder's concatenations were 3.0 of model A's 16.9 s (bf16, paper widths, real case), a
    single-threaded NumPy copy. Any other consumer gets the concatenated array."""

    def __init__(self, parts):
        self.parts = parts
        self.shape = (*parts[0].shape[:-1], sum(p.shape[-1] for p in parts))
        self.dtype = parts[0].dtype


def _left_unmade(layer):
    """Whether `_apply` leaves this layer's output unmade (ChannelParts): a concatenation along
    the channels of inputs of one dtype."""
    return (isinstance(layer, keras.layers.Concatenate) and layer.axis in (-1, 4)
            and len({keras.backend.standardize_dtype(t.dtype) for t in _as_list(layer.input)}) == 1)


def _materialized(value):
    return np.concatenate(value.parts, axis=-1) if isinstance(value, ChannelParts) else value


def _apply(layer, arrays, block, on_block):
    if isinstance(layer, keras.layers.Concatenate):
        if _left_unmade(layer) and len({value.dtype for value in arrays}) == 1:
            return ChannelParts([part for value in arrays
                                 for part in (value.parts if isinstance(value, ChannelParts) else [value])])
        return np.concatenate([_materialized(value) for value in arrays], axis=layer.axis)
    if _halo(layer) is None:   # crops and per-voxel layers take the array
        arrays = [_materialized(x) for x in arrays]
    if isinstance(layer, keras.layers.Cropping3D):
        (x,) = arrays
        (a0, b0), (a1, b1), (a2, b2) = layer.cropping
        # a copy, not a view: a view would keep the whole uncropped skip alive until its concat
        return np.ascontiguousarray(x[:, a0:x.shape[1] - b0, a1:x.shape[2] - b1, a2:x.shape[3] - b2])
    halo = _halo(layer)
    if halo is None:   # per-voxel layers (channel selection, presence): the whole array at once
        return np.asarray(layer(arrays if len(arrays) > 1 else arrays[0]))
    (x,) = arrays
    if isinstance(layer, DilatedMaxPool3D):
        return _slabwise(layer, _materialized(x), halo, block, on_block)
    return _blockwise(layer, x, halo, block, on_block)


def _halo(layer):
    """Voxels a windowed layer takes off each spatial side in total (None: a per-voxel layer,
    a crop or a concatenation); ValueError for a layer it does not know."""
    if isinstance(layer, keras.layers.Conv3D):
        if layer.padding != "valid" or any(s != 1 for s in layer.strides):
            raise ValueError(f"{layer.name}: layer-wise inference needs valid, stride-1 convolutions")
        return tuple((k - 1) * d for k, d in zip(layer.kernel_size, layer.dilation_rate))
    if isinstance(layer, DilatedMaxPool3D):
        return (2 * layer.rate,) * 3
    if isinstance(layer, PER_VOXEL + (keras.layers.Cropping3D, keras.layers.Concatenate)):
        return None
    raise ValueError(f"{layer.name}: layer-wise inference does not know {type(layer).__name__} layers "
                     f"(à trous 3D models only); tile this model")


_TRACED = weakref.WeakKeyDictionary()   # layer -> its traced function, kept across volumes and cases


def _traced(layer):
    """One tf.function per layer, for every volume: a partial, so TensorFlow counts its
    traces per layer (every Conv3D shares `__call__`'s code object, and their summed traces
    printed "triggered tf.function retracing" warnings); reduce_retracing, so cases of other
    shapes reuse a shape-relaxed trace instead of tracing each layer again per case."""
    if layer not in _TRACED:
        _TRACED[layer] = tf.function(functools.partial(layer), reduce_retracing=True)
    return _TRACED[layer]


def _blockwise(layer, x, halo, block, on_block=None):
    """The layer's output over the whole of `x` (1, X, Y, Z, C), block by block: equal output
    blocks (the last ones padded past the end, then cut), each from its input block plus
    the layer's halo; one traced function per layer (every call has the same shape).

    A layer dilated by d (a convolution, the dilated max-pool) is computed on each of its d³
    phase lattices x[a::d, b::d, c::d] as the same layer undilated: output voxel a + d·m reads
    input voxels a + d·(m + k), so out[a::d, b::d, c::d] = undilated(x[a::d, b::d, c::d])
    exactly. TensorFlow computes a dilated convolution through space-to-batch on every call,
    and on 64³ blocks that ran at 113-148 GFLOP/s against 190-207 undilated (issue 14).

    The copies around the blocks (cutting the next input block, writing the last output block)
    run on other threads while TensorFlow computes the current block: they are single-threaded
    NumPy copies that otherwise leave a core idle (a third of model A's time, BUILD_NOTES).
    Cuts and writes have a thread each: behind one queue, a write into fresh pages of the
    output held up the next block's cut (model A's bottom_a waited 1.7 s so, every 16th
    block ~450 ms)."""
    out_shape = [n - h for n, h in zip(x.shape[1:4], halo)]
    rates, sides, lattices = _plan(layer, out_shape, block)
    halo = [h // r for h, r in zip(halo, rates)]
    run = _runs_as(layer)
    function = _traced(run)
    blocks = [(lattice, start) for lattice, counts in lattices
              for start in itertools.product(*(range(0, c * sd, sd) for c, sd in zip(counts, sides)))]
    # two input blocks, filled in turn: the next one while TensorFlow reads the current one
    shape = (1, *(sd + h for sd, h in zip(sides, halo)), x.shape[-1])
    buffers = [_aligned_empty(shape, x.dtype) for _ in range(2)]
    out = None
    pending = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="layerwise-cuts") as cutter, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="layerwise-writes") as writer:
        ahead = cutter.submit(_input_block, x, *blocks[0], sides, halo, buffers[0])
        for index, (lattice, start) in enumerate(blocks):
            piece = ahead.result()
            if index + 1 < len(blocks):
                ahead = cutter.submit(_input_block, x, *blocks[index + 1], sides, halo, buffers[(index + 1) % 2])
            if on_block is not None:
                on_block(run, piece.shape)
            result = np.asarray(function(_as_tensor(piece)))   # TensorFlow releases the GIL while it runs
            if out is None:   # exactly the output's size (a view of a larger one would keep it all)
                # the layer's compute dtype: mixed bfloat16 layers keep bfloat16 activations;
                # aligned, so that a pool's slabs of it reach TensorFlow without a copy
                out = _aligned_empty((1, *out_shape, result.shape[-1]), result.dtype)
            pending.append(writer.submit(_write_block, out, lattice, start, sides, result))
        for write in pending:
            write.result()   # re-raises a failed copy
    return out


def _slabwise(layer, x, halo, block, on_block=None):
    """A max-pool's output over the whole of `x` (1, X, Y, Z, C), on slabs along X that span
    Y and Z: each input slab is a contiguous view of `x` handed to TensorFlow without a copy
    (`_as_tensor`), and the pool runs dilated on it (`max_pool`: no phase lattices). A pool
    does a few FLOPs per byte, so the block copies were most of its cost: model A's two
    pools took 3.0 of its 15.1 s in blocks (bf16, paper widths, the real case), 0.7-0.9 s
    so. The output slabs are written on a second thread while TensorFlow computes the next
    one; all slabs have one shape (the last one starts early, overlapping its neighbour)."""
    out_shape = [n - h for n, h in zip(x.shape[1:4], halo)]
    thickness, starts = _slab_plan(x.shape, x.dtype.itemsize, halo, block)
    function = _traced_pool(layer)
    out = None
    pending = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="layerwise-copies") as copier:
        for start in starts:
            piece = x[:, start:start + thickness + halo[0]]
            if on_block is not None:
                on_block(layer, piece.shape)
            result = np.asarray(function(_as_tensor(piece)))
            if out is None:
                out = _aligned_empty((1, *out_shape, result.shape[-1]), result.dtype)
            pending.append(copier.submit(_write_slab, out, start, result))
        for write in pending:
            write.result()   # re-raises a failed copy
    return out


def _traced_pool(layer):
    """The pool's traced function for slabs (`max_pool`, the layer's own call in fewer
    passes), one per layer like `_traced`."""
    if layer not in _TRACED:
        _TRACED[layer] = tf.function(functools.partial(_pool_call, layer), reduce_retracing=True)
    return _TRACED[layer]


def _pool_call(layer, x):
    return max_pool(tf.cast(x, layer.compute_dtype), layer.rate)


def max_pool(x, rate):
    """DilatedMaxPool3D's output (its 3×3×3 max, taps `rate` apart, valid) in TensorFlow's
    pooling kernels: one max_pool3d for rate 1; for rate r, a 1D max-pool along each axis in
    turn, the axis folded as (n / r, r) so the taps r apart are neighbours on the first (a
    reshape, no copy: the axis is padded to a multiple of r first where needed, and the
    padded outputs cut). The layer's separable slices-and-maxima take 2-3x longer (a slab
    of 40 planes at paper widths, bf16: rate 1 89-105 -> 36-41 ms, rate 2 140-219 -> 79 ms)."""
    if rate == 1:
        return tf.nn.max_pool3d(x, 3, 1, "VALID")
    static = x.shape
    for axis in (1, 2, 3):   # dynamic shapes: traces are shape-relaxed across cases (`_traced`)
        n = tf.shape(x)[axis]
        pad = -n % rate
        x = tf.pad(x, tf.stack([tf.zeros(5, tf.int32), tf.one_hot(axis, 5, dtype=tf.int32) * pad], axis=1))
        shape = tf.shape(x)
        folded = tf.reshape(x, tf.stack([tf.reduce_prod(shape[:axis]), (n + pad) // rate, 1, 1,
                                         rate * tf.reduce_prod(shape[axis + 1:])]))
        pooled = tf.nn.max_pool3d(folded, [1, 3, 1, 1, 1], 1, "VALID")
        x = tf.reshape(pooled, tf.concat([shape[:axis], [n + pad - 2 * rate], shape[axis + 1:]], 0))
        x = tf.slice(x, tf.zeros(5, tf.int32), tf.tensor_scatter_nd_update(-tf.ones(5, tf.int32), [[axis]], [n - 2 * rate]))
    return tf.ensure_shape(x, [static[0]] + [None if d is None else d - 2 * rate for d in static[1:4]] + [static[4]])


def _slab_plan(in_shape, itemsize, halo, block):
    """(output slab thickness, slab starts along X) of a pool over an input of `in_shape`
    (1, X, Y, Z, C): slabs of about two blocks' output voxels, blocks of at most 64³ (~12
    planes of the real case: thinner slabs read their halo planes again too often, thicker
    ones raise the run's peak memory, and a larger block side helps the convolutions, not
    the pools); starts on multiples that keep a slab's view on TensorFlow's alignment where
    the plane size allows, the last one moved back to end at the end."""
    out_shape = [n - h for n, h in zip(in_shape[1:4], halo)]
    aligned_every = TENSOR_ALIGNMENT // math.gcd(TENSOR_ALIGNMENT, math.prod(in_shape[2:]) * itemsize)
    voxels = 2 * min(block, 64) ** 3
    thickness = max(1, math.ceil(voxels / (out_shape[1] * out_shape[2]) / aligned_every)) * aligned_every
    thickness = min(out_shape[0], thickness)
    starts = list(range(0, out_shape[0] - thickness + 1, thickness))
    if starts[-1] + thickness < out_shape[0]:
        starts.append(out_shape[0] - thickness)
    return thickness, starts


def _write_slab(out, start, result):
    _copyable(out)[:, start:start + result.shape[1]] = _copyable(result)


def _input_block(x, lattice, start, sides, halo, block):
    """Fills `block` (1, sides + halo, C) with the input of the output block at `start` on a
    phase lattice of `x` (an array, or ChannelParts: each part into its channels), zero-padded
    where it runs past the end; returns it."""
    target = _copyable(block)
    channel = 0
    for part in (x.parts if isinstance(x, ChannelParts) else [x]):
        piece = _copyable(part)[lattice][:, start[0]:start[0] + sides[0] + halo[0],
                                         start[1]:start[1] + sides[1] + halo[1], start[2]:start[2] + sides[2] + halo[2]]
        target[:, :piece.shape[1], :piece.shape[2], :piece.shape[3], channel:channel + piece.shape[-1]] = piece
        channel += piece.shape[-1]
    for axis in (1, 2, 3):   # a last block past the end: the rest zero (it held an earlier block)
        if piece.shape[axis] < target.shape[axis]:
            target[(slice(None),) * axis + (slice(piece.shape[axis], None),)] = 0
    return block


def _aligned_empty(shape, dtype):
    """An uninitialized array whose data starts on a TENSOR_ALIGNMENT boundary."""
    dtype = np.dtype(dtype)
    size = math.prod(shape) * dtype.itemsize
    raw = np.empty(size + TENSOR_ALIGNMENT, np.uint8)
    offset = -raw.ctypes.data % TENSOR_ALIGNMENT
    return raw[offset:offset + size].view(dtype).reshape(shape)


def _as_tensor(block):
    """A tensor sharing `block`'s memory (aligned, contiguous; it stays alive as long as the
    tensor): tf.constant would copy it, a third of a block's copying. DLPack has no bfloat16
    in NumPy, so bfloat16 goes across as uint16 and is bitcast back."""
    if block.ctypes.data % TENSOR_ALIGNMENT:
        return tf.constant(block)   # unaligned memory would fail TensorFlow's alignment check
    tensor = tf.experimental.dlpack.from_dlpack(_copyable(block).__dlpack__())
    return tf.bitcast(tensor, tf.bfloat16) if block.dtype.name == "bfloat16" else tensor


def _write_block(out, lattice, start, sides, result):
    target = _copyable(out)[lattice]
    kept = [min(sd, n - st) for sd, n, st in zip(sides, target.shape[1:4], start)]
    target[:, start[0]:start[0] + kept[0], start[1]:start[1] + kept[1], start[2]:start[2] + kept[2]] = \
        _copyable(result)[:, :kept[0], :kept[1], :kept[2]]


def _copyable(array):
    """`array`, bfloat16 seen as uint16: NumPy copies a built-in dtype without holding the GIL
    (ml_dtypes' bfloat16 goes through its generic per-item path)."""
    return array.view(np.uint16) if array.dtype.name == "bfloat16" else array


def _plan(layer, out_shape, block):
    """(dilation per axis, output block sides, [(phase lattice index, blocks per axis)]) of a
    windowed layer over an output of `out_shape`. The block sides come from the largest
    lattice (the first) and serve all of them: one block shape per layer."""
    rates = _phase_rates(layer)
    sides = None
    lattices = []
    for phase in itertools.product(*map(range, rates)):
        lattice_shape = [len(range(p, n, r)) for p, n, r in zip(phase, out_shape, rates)]
        if min(lattice_shape) == 0:
            continue
        if sides is None:
            sides, _ = _block_grid(lattice_shape, block)
        lattices.append(((slice(None),) + tuple(slice(p, None, r) for p, r in zip(phase, rates)),
                         [math.ceil(n / sd) for n, sd in zip(lattice_shape, sides)]))
    return rates, sides, lattices


def _runs_as(layer):
    """The layer `_blockwise` calls on blocks: the layer itself, or its undilated twin."""
    return layer if _phase_rates(layer) == (1, 1, 1) else _undilated(layer)


def _phase_rates(layer):
    """Per-axis dilation of a windowed layer (computed on its phase lattices)."""
    if isinstance(layer, keras.layers.Conv3D):
        return tuple(int(d) for d in layer.dilation_rate)
    return (layer.rate,) * 3   # DilatedMaxPool3D


_UNDILATED = weakref.WeakKeyDictionary()   # dilated layer -> its undilated twin


def _undilated(layer):
    """The same layer with dilation 1, holding a copy of the layer's current weights (copied on
    every call: a few MB, and the weights may have been trained since)."""
    if layer not in _UNDILATED:
        rate = {"dilation_rate": 1} if isinstance(layer, keras.layers.Conv3D) else {"rate": 1}
        twin = type(layer).from_config({**layer.get_config(), **rate, "name": f"{layer.name}_undilated"})
        twin.build(layer.input.shape)
        _UNDILATED[layer] = twin
    twin = _UNDILATED[layer]
    twin.set_weights(layer.get_weights())
    return twin
