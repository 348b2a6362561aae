"""The trainer: a custom loop under any tf.distribute strategy, shared by every stage.

`Trainer` owns the loop, checkpoints, logs, the LR schedule and the export; a stage
subclass (`stage2d.Trainer2D`, ...) says what to train on and what to build through a
few hooks: `load_data`, `make_sampler`, `build_model`, `predict_labels` (and optionally
`loss_heads`, `make_optimizer`).

Why a custom loop rather than `model.fit`: Keras 3 `fit` fails under
MultiWorkerMirroredStrategy out of the box (KERAS3_NOTES), and the paper's schedule needs
per-iteration losses. The loop keeps Keras pieces: the NormalizedMomentum optimizer (which
accumulates N batches itself), Keras losses, `Progbar`, `.keras` export.

Re-running on the same work dir resumes from the newest checkpoint: weights, optimizer
slots (momentum, accumulators, counters), LR-schedule state and the position in the data
stream (batch b is always drawn from seed (seed, b)), so nothing done before it is lost.
Re-running a finished work dir changes nothing: a complete export of the same config with
at least the asked iterations is returned as it is (`completed_export`), never re-saved,
because Keras stamps each save with its date and 2D-3D chains and feature manifests find
their 2D models by the sha256 of `model.keras`.
"""

import contextlib
import functools
import json
import math
import signal
import sys

import keras
import numpy as np
import tensorflow as tf

from brats_tf.training import losses
from brats_tf.training.averaging import CHECKPOINT_NAME as AVERAGE_NAME, TailAverage
from brats_tf.evaluation import metrics
from brats_tf.training.checkpoints import CheckpointStore
from brats_tf.configs.common import check_ranges
from brats_tf.constants import CLASS_NAMES, NUM_CLASSES, SLICE_AXIS
from brats_tf.errors import ConfigError, DataError, short_error
from brats_tf.inference.exported import file_sha256
from brats_tf.inference.features import PREPROCESSING_KEYS   # how inference must prepare a case
from brats_tf.io import files as fs
from brats_tf.io import locks
from brats_tf.io.files import atomic_write, read_json, write_json
from brats_tf.training.optim import NormalizedMomentum
from brats_tf.records import reader
from brats_tf.training.schedules import PlateauHalving
from brats_tf.training.data import case_split
from brats_tf.training.logs import TrainLog, overlay_image

STRATEGIES = ("off", "mirrored", "multi_worker", "tpu")
VAL_COLUMNS = tuple(f"val_dice_{name.replace('/', '_').replace('-', '_')}" for name in CLASS_NAMES[1:])


class TrainingError(Exception):
    """Training cannot go on (e.g. a non-finite loss); the message says why."""


_STRATEGIES = {}   # one per process and name: collectives and TPUs are configured once


def make_strategy(name, cpu_devices=None):
    """tf.distribute strategy from its config name; created before any other TensorFlow op
    of a trainer (multi-worker collectives must be configured at start-up) and kept for the
    process (run_experiment trains many models in one). cpu_devices: see the config."""
    if name == "off":
        return tf.distribute.get_strategy()
    key = (name, cpu_devices)
    if key not in _STRATEGIES:
        _STRATEGIES[key] = _new_strategy(name, cpu_devices)
    return _STRATEGIES[key]


def _new_strategy(name, cpu_devices):
    if name == "mirrored":
        devices = _logical_cpus(cpu_devices) if cpu_devices else None
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":   # cluster from TF_CONFIG (python -m brats_tf.launch sets it locally)
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":   # the TPU from the environment (TPU_NAME, a Cloud TPU VM's local one)
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, RuntimeError, tf.errors.OpError) as err:
            raise ConfigError(f"train.strategy=tpu: no TPU found ({short_error(err)}); run on a Cloud TPU VM "
                              f"or set TPU_NAME") from None
        return tf.distribute.TPUStrategy(resolver)
    raise ConfigError(f"train.strategy={name!r}: use one of {STRATEGIES}")


def _logical_cpus(count):
    """The host CPU split into `count` logical devices (possible only before TensorFlow starts
    its runtime in this process); their names."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:   # the runtime already started: fine if it has the same split
        pass
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    if len(devices) != count:
        raise ConfigError(f"train.cpu_devices={count}: this process already runs TensorFlow on {len(devices)} "
                          f"CPU device(s); give cpu_devices in a fresh process")
    return devices


def make_deterministic():
    """Op determinism, and one inter-op thread (ops run one at a time, each kernel still
    multi-threaded). Measured on the 2-core host, demo-sized standard 3D model, 10 iterations:
    - op determinism alone: two runs differ from the 4th iteration (weights by 2e-4), with
      oneDNN on or off, and also with one intra-op thread;
    - one inter-op thread: bit-identical, and no slower (3D 26-31 s against 33 s; 2D model 1,
      40 iterations, 25.5 s against 30.3 s).
    The thread count can only be set before TensorFlow's runtime starts: the mains call this
    first (`brats_tf.experiment`; `brats_tf.train` through the trainer, whose strategy "off"
    starts nothing); a process that already ran TensorFlow keeps its threads."""
    tf.config.experimental.enable_op_determinism()
    try:
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:   # the runtime already started in this process
        pass


def synchronize_batch_norm(model):
    """Batch statistics over the global batch (all replicas), as one device computes them:
    set before the first step is traced (Keras reads `synchronized` at call time)."""
    for layer in batch_norm_layers(model):
        layer.synchronized = True


def batch_norm_layers(model):
    """Every BatchNormalization layer of a model, nested models included."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            found.append(layer)
        elif hasattr(layer, "layers"):
            found.extend(batch_norm_layers(layer))
    return found


def recalibrate_batch_norm(model, batches):
    """Precise batch norm (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021): each batch
    norm layer's moving mean and variance become the plain mean of its batch statistics over
    `batches` (x inputs), computed with the final weights. The moving averages (momentum 0.9:
    about the last ten batches, each taken while the weights still moved) are what a short
    run's inference would otherwise use; BUILD_NOTES "Why the demo's 2D models were fragile".
    Weights are untouched. Returns the number of batches used."""
    layers = batch_norm_layers(model)
    if not layers:
        return 0
    saved = [(layer.momentum, layer.synchronized) for layer in layers]
    variables = [v for layer in layers for v in (layer.moving_mean, layer.moving_variance)]
    sums, count = None, 0
    try:
        for layer in layers:   # read when traced: each call leaves its batch's statistics
            # one call over the whole global batch: its statistics are the synchronized ones
            layer.momentum, layer.synchronized = 0.0, False
        forward = tf.function(functools.partial(_training_forward, model))
        for count, x in enumerate(batches, start=1):
            forward(x)
            stats = [np.asarray(v, np.float64) for v in variables]
            sums = stats if sums is None else [a + b for a, b in zip(sums, stats)]
    finally:
        for layer, (momentum, synchronized) in zip(layers, saved):
            layer.momentum, layer.synchronized = momentum, synchronized
    if count:
        for variable, total in zip(variables, sums):
            variable.assign((total / count).astype(np.float32))
    return count


def _training_forward(model, x):
    """A training-mode forward pass (batch statistics; the batch norm layers update theirs)."""
    return model(x, training=True)


def is_chief(strategy):
    """Only the chief writes checkpoints, logs and exports (multi-worker)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    return resolver.task_type == "chief" or (resolver.task_type == "worker" and resolver.task_id == 0
                                             and "chief" not in resolver.cluster_spec().as_dict())


RESUMABLE_CHANGES = ("iterations", "micro_batches")


def record_config(workdir, config):
    """Writes the resolved config before step 0; a resumed run must use the same config
    (only the number of iterations may grow)."""
    path = fs.join(workdir, "config.json")
    current = json.loads(config.to_json_best_effort())
    if fs.exists(path):
        previous = read_json(path)
        # More iterations, or another split into micro-batches (the same updates), may resume;
        # so may a work dir started before a field was added, if the field is off (None) or
        # at the value runs had before it (IMPLIED_BEFORE).
        strip = lambda c: {**c, "train": {k: v for k, v in c["train"].items() if k not in RESUMABLE_CHANGES}}
        if strip(previous) != strip(_without_new_unset_fields(current, previous)):
            raise ConfigError(f"{path}: this work dir was started with another config; "
                              f"use a new --workdir (or the same config)")
        if previous == current:   # a re-run leaves the file (and its time stamp) alone
            return
    write_json(path, current, sort_keys=True)


# Fields added to the configs with a value other than None, and the value every run before
# them had: a work dir recorded before such a field resumes while it keeps that value.
IMPLIED_BEFORE = {"model.design": "atrous"}   # every 3D model was à trous (issue 14 item 5)


def _without_new_unset_fields(current, previous, prefix=""):
    """`current` less the fields `previous` lacks whose value is None (added to the config
    since `previous` was recorded, and off) or the value IMPLIED_BEFORE gives them."""
    if not isinstance(current, dict) or not isinstance(previous, dict):
        return current
    implied = lambda k, v: v is None or IMPLIED_BEFORE.get(prefix + k, None) == v
    return {k: _without_new_unset_fields(v, previous[k], f"{prefix}{k}.") if k in previous else v
            for k, v in current.items() if k in previous or not implied(k, v)}


def completed_export(workdir, iterations):
    """`model_info.json` of a complete export in `workdir` of at least `iterations`, else None.

    Complete: `model.keras` and `model_info.json` are both there and the model file is the
    one the info was written for (its `model_sha256`; exports from before that field are
    trusted by their write order: model.keras first, then the info, each atomically)."""
    model_path, info_path = (fs.join(workdir, name) for name in ("model.keras", "model_info.json"))
    if not (fs.isfile(model_path) and fs.isfile(info_path)):
        return None
    try:
        info = read_json(info_path)
    except ValueError:   # a damaged info file: export again
        return None
    if info.get("iterations", -1) < iterations:
        return None
    if info.get("model_sha256") not in (None, file_sha256(model_path)):
        return None
    return info


class Trainer:
    """Trains one model as its config says, in `workdir`; subclasses supply the stage hooks."""

    stage = None   # the `config.stage` a subclass trains (see training/registry.py)

    def __init__(self, config, workdir):
        self.config, self.workdir = config, fs.absolute(workdir)
        self.chief = True
        self._overlay_labels = None   # the first validation case's last prediction (TensorBoard image)

    # --- stage hooks ---------------------------------------------------------------------------
    def load_data(self, manifest):
        """Sets self.train_source (records.streams.CaseSource), self.val_cases and self.model_spec
        (a JSON-able dict)."""
        raise NotImplementedError

    def make_sampler(self, global_batch_size):
        """An object with `.dataset(first_batch)` yielding (x, y) global batches."""
        raise NotImplementedError

    def build_model(self):
        raise NotImplementedError

    def predict_labels(self, case):
        """Label map (internal convention) of a validation case from the model being trained."""
        raise NotImplementedError

    def micro_batches(self):
        """train.micro_batches (1 when the config has none): parts each replica's batch is
        trained in (`build_train_step`); must divide data.batch_size."""
        parts = int(self.config.train.get("micro_batches", 1))
        if parts < 1 or self.config.data.batch_size % parts:
            raise ConfigError(f"--config.train.micro_batches={parts}: must be >= 1 and divide data.batch_size "
                              f"({self.config.data.batch_size})")
        return parts

    def loss_heads(self):
        """(head names in model-output order, {name: weight}, loss_fn): deep supervision by default."""
        names = list(self.model.output_names)
        weights = losses.deep_supervision_weights(names, self.config.loss.main_weight)
        return names, weights, losses.weighted_cross_entropy(tuple(self.config.loss.target_weights))

    def make_optimizer(self):
        c = self.config.optim
        return NormalizedMomentum(c.learning_rate, c.momentum, c.accumulation_steps, c.epsilon)

    def make_schedule(self):
        c = self.config.optim
        return PlateauHalving(c.learning_rate, c.min_learning_rate, c.period, c.decrease_ratio)

    def check_finished(self, info):
        """Refuses (ConfigError) a finished export whose inputs are not the current ones: a
        re-run must not pass off a model trained on other records as this config's model."""
        current = {k: self.manifest[k] for k in PREPROCESSING_KEYS}
        if info.get("preprocessing", current) != current:
            raise ConfigError(f"{self.workdir}: its model was trained on records prepared as "
                              f"{info.get('preprocessing')}, not as {self.config.data.records_dir} "
                              f"({current}); use a new --workdir")

    # --- setup -------------------------------------------------------------------------------
    def _start(self):
        """Work dir, seed, strategy, config.json, the records' manifest. Returns the result of
        a finished export of this config (see `completed_export`), else None."""
        c = self.config
        if c.data.records_dir is None:
            raise ConfigError("--config.data.records_dir is required")
        check_ranges(c)
        self.micro_batches()   # a split that does not divide the batch: refused before any work
        # The strategy first: no TensorFlow op may run before multi-worker collectives exist.
        self.strategy = make_strategy(c.train.strategy, c.train.get("cpu_devices"))
        self.chief = is_chief(self.strategy)
        try:
            fs.makedirs(self.workdir)
        except (OSError, tf.errors.OpError) as err:
            words = getattr(err, "strerror", None) or short_error(err)
            raise DataError(self.workdir, f"cannot create the work dir ({words})") from None
        keras.utils.set_random_seed(c.seed)
        if c.deterministic:
            make_deterministic()
        if self.chief:   # one live run per work dir; held until `run` returns or raises
            self._lock.enter_context(locks.hold(fs.join(self.workdir, locks.LOCK_FILE), self.workdir))
        # Damaged records are refused before anything is written to the work dir.
        self.manifest = reader.load_manifest(c.data.records_dir)
        if self.chief:
            record_config(self.workdir, c)
        info = completed_export(self.workdir, c.train.iterations)
        if info is None:
            return None
        self.check_finished(info)
        recorded = info.get("final_validation") or {}
        validation = {k: recorded[k] for k in VAL_COLUMNS if k in recorded} | recorded   # the usual column order
        return {"iterations": info["iterations"], "workdir": self.workdir, "validation": validation,
                "reused": True}

    def _setup(self):
        c, manifest = self.config, self.manifest
        self.split = case_split(self.workdir, manifest, c)
        self.load_data(manifest)
        # How inputs were prepared: inference on new cases must do the same.
        self.model_spec["preprocessing"] = {k: manifest[k] for k in PREPROCESSING_KEYS}
        self.sampler = self.make_sampler(c.data.batch_size * self.strategy.num_replicas_in_sync)
        with self.strategy.scope():
            self.model = self.build_model()
            sync = c.train.get("sync_batch_norm")
            if sync or (sync is None and self.strategy.num_replicas_in_sync > 1):
                synchronize_batch_norm(self.model)
            self.optimizer = self.make_optimizer()
            self.optimizer.build(self.model.trainable_variables)
        self.schedule = self.make_schedule()
        self.store = CheckpointStore(fs.join(self.workdir, "checkpoints"), c.train.keep_checkpoints)

    # --- the loop ------------------------------------------------------------------------------
    def run(self):
        """Trains (or returns a finished export); the chief holds the work dir's lock file
        (io/locks.py) from `_start` until this returns or raises."""
        self._lock = contextlib.ExitStack()
        with self._lock:
            return self._run()

    def _run(self):
        finished = self._start()
        if finished is not None:
            return finished
        self._setup()
        c = self.config
        state = self.store.restore(self.model, self.optimizer) or {}
        if state:
            self.schedule.set_state(state["schedule"])
        self.average = self._tail_average()
        pending = list(state.get("pending_losses", []))
        self.optimizer.learning_rate = self.schedule.learning_rate
        iteration = _to_int(self.optimizer.iterations)
        batch = _to_int(getattr(self.optimizer, "batches_seen", self.optimizer.iterations))
        log = TrainLog(self.workdir, iteration, self.chief)
        log.hparams(c)
        if iteration >= c.train.iterations:
            return self._finish(iteration, log)
        train_step = build_train_step(self.model, self.optimizer, self.strategy, *self.loss_heads(),
                                      jit_compile=c.train.jit_compile, micro_batches=self.micro_batches())
        steps = getattr(self.optimizer, "accumulation_steps", 1)
        data = distribute(self.strategy, lambda: self.sampler.dataset(first_batch=batch))
        progbar = _progbar(c.train.iterations) if self.chief else None
        if progbar and iteration:
            progbar.update(iteration)
        previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
        # Per-head loss sums of the batches in `pending` (restored too: a run stopped mid-
        # accumulation logs its resumed iteration's losses over all of that iteration's batches).
        head_sums = dict(state.get("pending_head_sums", {}))
        try:
            for x, y in _batches(data, c.data.records_dir):
                values = {k: float(v) for k, v in train_step(x, y).items()}
                if not math.isfinite(values["loss"]):
                    raise TrainingError(f"non-finite loss at iteration {iteration} (batch {batch}); "
                                        f"stopped, last good checkpoint kept in {self.store.directory}")
                batch += 1
                pending.append(values["loss"])
                for k, v in values.items():
                    head_sums[k] = head_sums.get(k, 0.0) + v
                if batch % steps:
                    continue
                iteration += 1
                if self.average is not None:
                    self.average.add(iteration)
                iteration_loss = float(np.mean(pending))
                row = {"iteration": iteration, "learning_rate": self.schedule.learning_rate,
                       **{k: v / len(pending) for k, v in head_sums.items()}}
                pending, head_sums = [], {}
                self.optimizer.learning_rate = self.schedule.update(iteration_loss)
                if c.train.val_every and iteration % c.train.val_every == 0:
                    row.update(self.validate())
                    log.image(iteration, self.overlay())
                log.write(row)
                if progbar:
                    progbar.update(iteration, [("loss", iteration_loss), ("lr", row["learning_rate"])])
                if iteration % c.train.checkpoint_every == 0:
                    self._checkpoint(iteration, pending, log)
                if iteration >= c.train.iterations:
                    break
        except KeyboardInterrupt:
            self._checkpoint(iteration, pending, log, head_sums)
            log.close()
            raise
        finally:
            signal.signal(signal.SIGTERM, previous_handler)
        self._checkpoint(iteration, pending, log)
        return self._finish(iteration, log)

    def _tail_average(self):
        """train.average_last > 0: a TailAverage of the last that many iterations, its sums
        restored from the newest checkpoint; None when off."""
        window = self.config.train.get("average_last")
        if not window:
            return None
        average = TailAverage(self.model, self.config.train.iterations, window)
        saved = self.store.read_arrays(AVERAGE_NAME)
        if saved is not None:
            average.restore(saved)
        return average

    def _average_weights(self):
        """The exported weights are the tail average (when on); returns how many iterations it
        averaged (recorded in model_info.json), None when off."""
        if self.average is None:
            return None
        with self.strategy.scope():
            return self.average.assign()

    def _precise_batch_norm(self):
        """train.precise_bn_batches > 0: before the export, the batch norm statistics are
        re-estimated over that many training batches, the ones the stream would give next (the
        same after a resume from the last checkpoint, so a resumed run exports the same model)."""
        count = self.config.train.get("precise_bn_batches")
        if not count:
            return
        first = _to_int(getattr(self.optimizer, "batches_seen", self.optimizer.iterations))
        batches = (x for x, _ in _batches(self.sampler.dataset(first_batch=first, num_batches=count),
                                           self.config.data.records_dir))
        with self.strategy.scope():
            recalibrate_batch_norm(self.model, batches)

    def _checkpoint(self, iteration, pending, log, head_sums=None):
        log.flush()
        state = {"schedule": self.schedule.get_state(), "pending_losses": pending, "pending_head_sums": head_sums or {},
                 "batches_seen": _to_int(getattr(self.optimizer, "batches_seen", self.optimizer.iterations))}
        arrays = None if self.average is None else {AVERAGE_NAME: self.average.arrays()}
        self.store.save(iteration, self.model, self.optimizer, state, write=self.chief, arrays=arrays)

    def validate(self):
        """Mean per-class Dice (classes 1..C-1) over the validation cases."""
        if not self.val_cases:
            return {}
        num_classes = self.model_spec.get("num_classes", NUM_CLASSES)
        names = VAL_COLUMNS if num_classes == NUM_CLASSES else [f"val_dice_class{c}" for c in range(1, num_classes)]
        scores = np.zeros((len(self.val_cases), num_classes - 1))
        for i, case in enumerate(self.val_cases):
            labels = self.validation_labels(case)
            for c in range(1, num_classes):
                scores[i, c - 1] = metrics.dice(labels == c, case.label == c)
        return dict(zip(names, scores.mean(axis=0).tolist()))

    def validation_labels(self, case):
        """`predict_labels` of a validation case; the first case's labels are kept for the
        TensorBoard overlay, so the image costs no extra prediction."""
        labels = self.predict_labels(case)
        if case is self.val_cases[0]:
            self._overlay_labels = labels
        return labels

    def overlay(self):
        """The image TensorBoard shows after a validation (None without validation cases)."""
        if self._overlay_labels is None:
            return None
        case = self.val_cases[0]
        axis = SLICE_AXIS[self.config.data.get("orientation", "axial")]   # a 2D model's own slices
        return overlay_image(case.image, case.label, self._overlay_labels, axis)

    def _finish(self, iteration, log):
        averaged = self._average_weights()   # first: precise batch norm follows the final weights
        self._precise_batch_norm()
        final = self.validate() if self.val_cases else {}
        log.final(iteration, final, self.overlay() if final else None)
        log.close()
        if self.chief:
            extra = {} if averaged is None else {"weights_averaged_over_iterations": averaged}
            export_model(self.model, self.workdir, dict(self.model_spec, iterations=iteration,
                                                        final_validation=final, **extra))
        return {"iterations": iteration, "workdir": self.workdir, "validation": final}


def distribute(strategy, make_dataset):
    """The global batches of `make_dataset()` as a distributed dataset: replica r of n gets the
    r-th of n equal slices of every global batch, on one host or on several, so the replicas
    together see exactly what one device would (same batch, same order). Each input pipeline
    (one per worker) builds the global batch and keeps its replicas' slices: the batches are
    cut in-graph from a window of cases, and every worker reads that window's records."""
    replicas = strategy.num_replicas_in_sync
    if replicas == 1:
        return strategy.experimental_distribute_dataset(make_dataset())

    def pipeline(context):
        local = replicas // context.num_input_pipelines
        first = context.input_pipeline_id * local

        def own_slices(*batch):
            parts = tf.nest.map_structure(
                lambda t: tf.stack(tf.split(t, replicas, axis=0)[first:first + local]), batch)
            return tf.data.Dataset.from_tensor_slices(parts)
        return make_dataset().flat_map(own_slices)

    return strategy.distribute_datasets_from_function(pipeline)


def build_train_step(model, optimizer, strategy, names, weights, loss_fn, jit_compile=False, micro_batches=1):
    """A compiled step: forward-backward on one global batch, then `optimizer.apply_gradients`
    (NormalizedMomentum accumulates, and updates every N-th batch). `names` are the model's
    outputs in order, `weights` their loss coefficients. Returns global-batch losses per head;
    the regularization losses of the model (L2) are added to the total. micro_batches > 1:
    each replica's batch runs forward-backward in that many parts, one after the other, their
    gradients summed (`micro_batch_step`): the same update with the activation memory of a part."""
    if micro_batches > 1:
        replica_step = micro_batch_step(model, optimizer, strategy, names, weights, loss_fn, micro_batches)
    else:
        replica_step = _whole_batch_step(model, optimizer, strategy, names, weights, loss_fn)

    @tf.function(jit_compile=jit_compile)
    def train_step(x, y):
        per_replica = strategy.run(replica_step, args=(x, y))
        # Keras losses are already scaled by 1/replicas: the sum is the global-batch loss.
        return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in per_replica.items()}

    return train_step


def micro_batch_step(model, optimizer, strategy, names, weights, loss_fn, parts):
    """A replica step over `parts` equal parts of its batch, run in sequence (each part's
    forward waits for the previous part's gradients, so one part's activations are alive at
    a time). The batch-adaptive class weights come from the whole global batch
    (`WeightedCrossEntropy.batch_counts` / `part_sum`), so the summed loss and gradients equal
    the whole batch's (to float rounding) for models without batch normalization (the 3D
    models); with it, statistics would be per part."""
    if not hasattr(loss_fn, "part_sum"):
        raise ConfigError("train.micro_batches > 1 needs the weighted cross-entropy loss")

    def replica_step(x, y):
        counts = loss_fn.batch_counts(y)
        xs = _split(x, parts)
        ys = tf.split(y, parts, axis=0)
        grads_sum, heads, previous = None, None, []
        for x_part, y_part in zip(xs, ys):
            with tf.control_dependencies(previous):
                x_part = tf.nest.map_structure(tf.identity, x_part)
            with tf.GradientTape() as tape:
                outputs = model(x_part, training=True)
                outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
                head = {n: loss_fn.part_sum(y_part, o, counts) for n, o in zip(names, outputs)}
                total = tf.add_n([weights[n] * head[n] for n in names])
                if model.losses:
                    total += tf.add_n(model.losses) / (strategy.num_replicas_in_sync * parts)
            grads = tape.gradient(total, model.trainable_variables)
            grads_sum = grads if grads_sum is None else [a if b is None else a + b for a, b in zip(grads_sum, grads)]
            part_values = {"loss": total, **{f"loss_{n}": v for n, v in head.items()}}
            heads = part_values if heads is None else {k: heads[k] + v for k, v in part_values.items()}
            previous = [g for g in grads if g is not None]
        optimizer.apply_gradients(zip(grads_sum, model.trainable_variables))
        return heads

    return replica_step


def _split(x, parts):
    """`parts` equal parts along the batch axis of a tensor or a dict of tensors."""
    if isinstance(x, dict):
        pieces = {k: tf.split(v, parts, axis=0) for k, v in x.items()}
        return [{k: pieces[k][i] for k in x} for i in range(parts)]
    return tf.split(x, parts, axis=0)


def _whole_batch_step(model, optimizer, strategy, names, weights, loss_fn):
    def replica_step(x, y):
        with tf.GradientTape() as tape:
            outputs = model(x, training=True)
            outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
            head = {n: loss_fn(y, o) for n, o in zip(names, outputs)}
            total = tf.add_n([weights[n] * head[n] for n in names])
            if model.losses:   # per replica: scale like the Keras losses above
                total += tf.add_n(model.losses) / strategy.num_replicas_in_sync
        grads = tape.gradient(total, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return {"loss": total, **{f"loss_{n}": v for n, v in head.items()}}

    return replica_step


def _batches(data, records_dir):
    """The (x, y) batches of a distributed dataset; a record that fails to read (CRC, a
    feature record of another case) is one DataError, not a TensorFlow traceback."""
    iterator = iter(data)
    while True:
        try:
            yield next(iterator)
        except StopIteration:
            return
        except tf.errors.OpError as err:
            raise DataError(records_dir, f"training input failed: {short_error(err)}") from None


def _to_int(value):
    """A scalar Keras/TF variable (mirrored ones included) as a Python int."""
    return int(keras.ops.convert_to_numpy(value))


def _progbar(iterations):
    """A live bar on a terminal; else (a log file, CI) one plain line at the end: Keras
    redraws its bar with backspaces and color codes wherever it runs on Linux."""
    verbose = 1 if getattr(sys.stdout, "isatty", lambda: False)() else 2
    return keras.utils.Progbar(iterations, verbose=verbose, stateful_metrics=["loss", "lr"])


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def export_model(model, workdir, info):
    """`model.keras` (full training model, heads included), then `model_info.json` beside it
    with the sha256 of the file it describes (`completed_export` checks it)."""
    path = fs.join(workdir, "model.keras")
    atomic_write(path, model.save)
    write_json(fs.join(workdir, "model_info.json"), dict(info, model_sha256=file_sha256(path)),
               sort_keys=True)
