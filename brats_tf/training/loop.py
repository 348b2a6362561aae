"""The trainer: a custom loop under any tf.distribute strategy, shared by every stage.

`Trainer` owns the loop, checkpoints, logs, the LR schedule and the export; a stage
subclass (`trainer2d.Trainer2D`, ...) says what to train on and what to build through a
few hooks: `load_data`, `make_sampler`, `build_model`, `predict_labels` (and optionally
`loss_heads`, `make_optimizer`).

Why a custom loop rather than `model.fit`: Keras 3 `fit` fails under
MultiWorkerMirroredStrategy out of the box (KERAS3_NOTES), and the paper's schedule needs
per-iteration losses. The loop keeps Keras pieces: the NormalizedMomentum optimizer (which
accumulates N batches itself), Keras losses, `Progbar`, `.keras` export.

Re-running on the same work dir resumes from the newest checkpoint: weights, optimizer
slots (momentum, accumulators, counters), LR-schedule state and the position in the data
stream (batch b is always drawn from seed (seed, b)), so nothing done before it is lost.
"""

import csv
import json
import math
import os
import signal

import keras
import numpy as np
import tensorflow as tf

from brats_tf.training import losses
from brats_tf.evaluation import metrics
from brats_tf.training.checkpoints import CheckpointStore
from brats_tf.constants import CLASS_NAMES, NUM_CLASSES
from brats_tf.errors import ConfigError
from brats_tf.io.files import atomic_write, write_json
from brats_tf.training.optim import NormalizedMomentum
from brats_tf.records import reader
from brats_tf.training.schedules import PlateauHalving
from brats_tf.training.data import case_split

STRATEGIES = ("off", "mirrored", "multi_worker", "tpu")
VAL_COLUMNS = tuple(f"val_dice_{name.replace('/', '_').replace('-', '_')}" for name in CLASS_NAMES[1:])


class TrainingError(Exception):
    """Training cannot go on (e.g. a non-finite loss); the message says why."""


def make_strategy(name):
    """tf.distribute strategy from its config name."""
    if name == "off":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":   # cluster from TF_CONFIG
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ConfigError(f"train.strategy={name!r}: use one of {STRATEGIES}")


def is_chief(strategy):
    """Only the chief writes checkpoints, logs and exports (multi-worker)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    return resolver.task_type == "chief" or (resolver.task_type == "worker" and resolver.task_id == 0
                                             and "chief" not in resolver.cluster_spec().as_dict())


def record_config(workdir, config):
    """Writes the resolved config before step 0; a resumed run must use the same config
    (only the number of iterations may grow)."""
    path = os.path.join(workdir, "config.json")
    current = json.loads(config.to_json_best_effort())
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        strip = lambda c: {**c, "train": {k: v for k, v in c["train"].items() if k != "iterations"}}
        if strip(previous) != strip(current):
            raise ConfigError(f"{path}: this work dir was started with another config; "
                              f"use a new --workdir (or the same config)")
    write_json(path, current, sort_keys=True)


class Trainer:
    """Trains one model as its config says, in `workdir`; subclasses supply the stage hooks."""

    stage = None   # the `config.stage` a subclass trains (see training/registry.py)

    def __init__(self, config, workdir):
        self.config, self.workdir = config, os.path.abspath(workdir)
        self.chief = True

    # --- stage hooks ---------------------------------------------------------------------------
    def load_data(self, manifest):
        """Sets self.train_cases, self.val_cases and self.model_spec (a JSON-able dict)."""
        raise NotImplementedError

    def make_sampler(self, global_batch_size):
        """An object with `.dataset(first_batch)` yielding (x, y) global batches."""
        raise NotImplementedError

    def build_model(self):
        raise NotImplementedError

    def predict_labels(self, case):
        """Label map (internal convention) of a validation case from the model being trained."""
        raise NotImplementedError

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

    # --- setup -------------------------------------------------------------------------------
    def _setup(self):
        c = self.config
        if c.data.records_dir is None:
            raise ConfigError("--config.data.records_dir is required")
        os.makedirs(self.workdir, exist_ok=True)
        keras.utils.set_random_seed(c.seed)
        if c.deterministic:
            tf.config.experimental.enable_op_determinism()
        self.strategy = make_strategy(c.train.strategy)
        self.chief = is_chief(self.strategy)
        if self.chief:
            record_config(self.workdir, c)
        manifest = reader.load_manifest(c.data.records_dir)
        self.split = case_split(self.workdir, manifest, c)
        self.load_data(manifest)
        # How inputs were prepared: inference on new cases must do the same.
        self.model_spec["preprocessing"] = {k: manifest[k] for k in (
            "normalization", "median_scale", "crop_margin", "modalities")}
        self.sampler = self.make_sampler(c.data.batch_size * self.strategy.num_replicas_in_sync)
        with self.strategy.scope():
            self.model = self.build_model()
            self.optimizer = self.make_optimizer()
            self.optimizer.build(self.model.trainable_variables)
        self.schedule = self.make_schedule()
        self.store = CheckpointStore(os.path.join(self.workdir, "checkpoints"), c.train.keep_checkpoints)

    # --- the loop ------------------------------------------------------------------------------
    def run(self):
        self._setup()
        c = self.config
        state = self.store.restore(self.model, self.optimizer) or {}
        if state:
            self.schedule.set_state(state["schedule"])
        pending = list(state.get("pending_losses", []))
        self.optimizer.learning_rate = self.schedule.learning_rate
        iteration = _to_int(self.optimizer.iterations)
        batch = _to_int(getattr(self.optimizer, "batches_seen", self.optimizer.iterations))
        log = TrainLog(self.workdir, iteration, self.chief)
        if iteration >= c.train.iterations:
            return self._finish(iteration, log)
        train_step = build_train_step(self.model, self.optimizer, self.strategy, *self.loss_heads(),
                                      jit_compile=c.train.jit_compile)
        steps = getattr(self.optimizer, "accumulation_steps", 1)
        data = self.strategy.experimental_distribute_dataset(self.sampler.dataset(first_batch=batch))
        progbar = keras.utils.Progbar(c.train.iterations, stateful_metrics=["loss", "lr"]) if self.chief else None
        if progbar and iteration:
            progbar.update(iteration)
        previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
        head_sums = {}
        try:
            for x, y in data:
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
                iteration_loss = float(np.mean(pending))
                row = {"iteration": iteration, "learning_rate": self.schedule.learning_rate,
                       **{k: v / len(pending) for k, v in head_sums.items()}}
                pending, head_sums = [], {}
                self.optimizer.learning_rate = self.schedule.update(iteration_loss)
                if c.train.val_every and iteration % c.train.val_every == 0:
                    row.update(self.validate())
                log.write(row)
                if progbar:
                    progbar.update(iteration, [("loss", iteration_loss), ("lr", row["learning_rate"])])
                if iteration % c.train.checkpoint_every == 0:
                    self._checkpoint(iteration, pending, log)
                if iteration >= c.train.iterations:
                    break
        except KeyboardInterrupt:
            self._checkpoint(iteration, pending, log)
            log.close()
            raise
        finally:
            signal.signal(signal.SIGTERM, previous_handler)
        self._checkpoint(iteration, pending, log)
        return self._finish(iteration, log)

    def _checkpoint(self, iteration, pending, log):
        log.flush()
        state = {"schedule": self.schedule.get_state(), "pending_losses": pending,
                 "batches_seen": _to_int(getattr(self.optimizer, "batches_seen", self.optimizer.iterations))}
        self.store.save(iteration, self.model, self.optimizer, state, write=self.chief)

    def validate(self):
        """Mean per-class Dice (classes 1..C-1) over the validation cases."""
        if not self.val_cases:
            return {}
        num_classes = self.model_spec.get("num_classes", NUM_CLASSES)
        names = VAL_COLUMNS if num_classes == NUM_CLASSES else [f"val_dice_class{c}" for c in range(1, num_classes)]
        scores = np.zeros((len(self.val_cases), num_classes - 1))
        for i, case in enumerate(self.val_cases):
            labels = self.predict_labels(case)
            for c in range(1, num_classes):
                scores[i, c - 1] = metrics.dice(labels == c, case.label == c)
        return dict(zip(names, scores.mean(axis=0).tolist()))

    def _finish(self, iteration, log):
        final = self.validate() if self.val_cases else {}
        log.close()
        if self.chief:
            export_model(self.model, self.workdir, dict(self.model_spec, iterations=iteration,
                                                        final_validation=final))
        return {"iterations": iteration, "workdir": self.workdir, "validation": final}


def build_train_step(model, optimizer, strategy, names, weights, loss_fn, jit_compile=False):
    """A compiled step: forward-backward on one global batch, then `optimizer.apply_gradients`
    (NormalizedMomentum accumulates, and updates every N-th batch). `names` are the model's
    outputs in order, `weights` their loss coefficients. Returns global-batch losses per head;
    the regularization losses of the model (L2) are added to the total."""

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

    @tf.function(jit_compile=jit_compile)
    def train_step(x, y):
        per_replica = strategy.run(replica_step, args=(x, y))
        # Keras losses are already scaled by 1/replicas: the sum is the global-batch loss.
        return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in per_replica.items()}

    return train_step


def _to_int(value):
    """A scalar Keras/TF variable (mirrored ones included) as a Python int."""
    return int(keras.ops.convert_to_numpy(value))


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def export_model(model, workdir, info):
    """`model.keras` (full training model, heads included) and `model_info.json` beside it."""
    atomic_write(os.path.join(workdir, "model.keras"), model.save)
    write_json(os.path.join(workdir, "model_info.json"), info, sort_keys=True)


class TrainLog:
    """Per-iteration CSV (`train_log.csv`) and TensorBoard scalars; rows after a resume
    point are dropped so a resumed run's log has each iteration once."""

    def __init__(self, workdir, resume_iteration, enabled=True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "train_log.csv")
        self.rows = []
        if enabled and os.path.exists(self.path):
            with open(self.path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["iteration"]) <= resume_iteration]
        self.writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard")) if enabled else None

    def write(self, row):
        if not self.enabled:
            return
        self.rows.append(row)
        with self.writer.as_default(step=row["iteration"]):
            for key, value in row.items():
                if key != "iteration":
                    tf.summary.scalar(key, value)
        if len(self.rows) % 10 == 0:
            self.flush()

    def flush(self):
        if not self.enabled:
            return
        columns = list(dict.fromkeys(k for r in self.rows for k in r))
        columns = ["iteration"] + [k for k in columns if k != "iteration"]

        def write(p):
            with open(p, "w", newline="") as f:
                w = csv.DictWriter(f, columns, restval="")
                w.writeheader()
                w.writerows(self.rows)
        atomic_write(self.path, write)

    def close(self):
        if self.enabled:
            self.flush()
            self.writer.flush()
