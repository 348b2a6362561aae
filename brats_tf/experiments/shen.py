"""The [S] experiments (Shen & Anderson; METHOD §9): the ablation and cross-site transfer.

    python run_experiment.py --experiment=shen_ablation --scale=demo --workdir=W
    python run_experiment.py --experiment=shen_transfer --scale=demo --workdir=W
    python run_experiment.py --experiment=shen_ablation --config.shen.bcn.train.iterations=50

The scale's settings (cases per site, the models' configs) are the `shen` section of
brats_tf/configs/experiments.py; --config.shen.KEY=VALUE overrides one.

`shen_ablation` ([S] Table 1, Fig. 5): BCN and patch FCN each without/with dropout and
batch normalization, and the FIFCN with softmax cross-entropy vs Dice loss, trained on
site A and evaluated on its held-out cases (binary whole-tumor Dice).
`shen_transfer` ([S] Table 2, Fig. 8): BCN and FCN trained on site A, then on site B
(another matrix, voxel size and contrast; Rembrandt in [S]) *pre-trained* (A weights as
they are), *re-trained* (A weights, trained on a small B subset) and *fine-tuned* (the
same with dropout and BN added).

Site A is the built-in phantom dataset (site "a") unless `--data_dir` is given; site B
the phantoms' second scanner (site "b") unless `--target_data_dir` is given. Both are
synthesized, recorded (z-score normalization, [S] §4.1) and split once under the work
dir; every model lives in its own trainer work dir (`models/site_<x>/<slug>`), so a
re-run skips what is finished and resumes what was interrupted. The two experiments
share site A's data, records, split and plain BCN/FCN when given the same work dir.
Outputs: `<workdir>/<experiment>/report.md`, `dice_histograms.png`, `timings.json`, and
per model `eval_site_<x>/evaluation.csv` + `predictions/` (label maps on the original grid).
"""

import copy
import dataclasses
import math
import os
import time

import keras
import numpy as np

from brats_tf.inference import baselines as baselines_inference
from brats_tf.evaluation.evaluate import evaluate_dirs, read_evaluation_csv, write_evaluation_csv
from brats_tf.training.baselines import BaselineTrainer
from brats_tf.configs import baselines as baseline_configs
from brats_tf.errors import ConfigError
from brats_tf.experiments import common
from brats_tf.report import shen as shen_report
from brats_tf.io.cases import discover_cases, load_case
from brats_tf.io import splits
from brats_tf.io.labels import write_label_map
from brats_tf.records import reader


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str                    # table row
    slug: str                    # model folder
    kind: str                    # bcn | fcn | fifcn
    dropout: bool = False
    batch_norm: bool = False
    loss: str = "cross_entropy"
    paper: float = None          # [S]'s mean Dice (%) where it gives one


ABLATION = (
    Variant("BCN", "bcn", "bcn", paper=82.7),
    Variant("BCN + Dropout", "bcn_dropout", "bcn", dropout=True, paper=84.2),
    Variant("BCN + Batch Normalization", "bcn_bn", "bcn", batch_norm=True, paper=83.4),
    Variant("BCN + Dropout + Batch Normalization", "bcn_dropout_bn", "bcn", True, True, paper=84.5),
    Variant("FCN", "fcn", "fcn", paper=83.8),
    Variant("FCN + Dropout", "fcn_dropout", "fcn", dropout=True, paper=83.6),
    Variant("FCN + Batch Normalization", "fcn_bn", "fcn", batch_norm=True, paper=84.1),
    Variant("FCN + Dropout + Batch Normalization", "fcn_dropout_bn", "fcn", True, True, paper=86.1),
    Variant("FIFCN, cross-entropy loss", "fifcn_ce", "fifcn", batch_norm=True),
    Variant("FIFCN, Dice loss", "fifcn_dice", "fifcn", batch_norm=True, loss="dice"),
)
VARIANTS = {v.slug: v for v in ABLATION}
TRANSFER_PAPER = {("bcn", "pre-trained"): 40.8, ("bcn", "re-trained"): 45.2, ("bcn", "fine-tuned"): 53.5,
                  ("fcn", "pre-trained"): 38.2, ("fcn", "re-trained"): 50.3, ("fcn", "fine-tuned"): 52.2}


@dataclasses.dataclass
class Site:
    name: str                    # "a" | "b"
    data_dir: str
    layout: str
    layout_file: str
    records_dir: str
    split: dict                  # train / val / test case ids


# ------------------------------------------------------------------ experiments

def shen_ablation(args):
    """[S] Table 1 / Fig. 5 on site A; returns the report path."""
    started, work = time.time(), os.path.abspath(args.workdir)
    config = common.experiment_config(args)
    scale = config.shen
    site_a = prepare_site(work, "a", args.data_dir, args, scale)
    out_dir = os.path.join(work, "shen_ablation")
    timings = common.Timings(os.path.join(out_dir, "timings.json"))
    results = []
    for variant in ABLATION:
        model_dir = train_variant(work, variant, site_a, scale, args.seed, timings)
        rows = evaluate(model_dir, site_a, timings, variant.name, _bcn_tile(scale))
        results.append((variant, rows))
    return shen_report.write_ablation_report(out_dir, results, timings.data, _settings(args, config, [site_a]),
                                             time.time() - started)


def shen_transfer(args):
    """[S] Table 2 / Fig. 8: site A -> site B; returns the report path."""
    started, work = time.time(), os.path.abspath(args.workdir)
    config = common.experiment_config(args)
    scale = config.shen
    site_a = prepare_site(work, "a", args.data_dir, args, scale)
    site_b = prepare_site(work, "b", args.target_data_dir, args, scale)
    out_dir = os.path.join(work, "shen_transfer")
    timings = common.Timings(os.path.join(out_dir, "timings.json"))
    results, source_results = [], []
    for plain in (VARIANTS["bcn"], VARIANTS["fcn"]):    # BCN and FCN as [S] built them
        pretrained = train_variant(work, plain, site_a, scale, args.seed, timings)
        source_results.append((plain, evaluate(pretrained, site_a, timings, plain.name, _bcn_tile(scale))))
        results.append((plain.kind, "pre-trained",
                        evaluate(pretrained, site_b, timings, f"{plain.name} pre-trained", _bcn_tile(scale)),
                        TRANSFER_PAPER[(plain.kind, "pre-trained")]))
        for method, extra in (("re-trained", {}), ("fine-tuned", {"dropout": True, "batch_norm": True})):
            variant = dataclasses.replace(plain, name=f"{plain.name} {method}",
                                          slug=f"{plain.slug}_{method.replace('-', '')}", **extra)
            model_dir = train_variant(work, variant, site_b, scale, args.seed, timings,
                                      init_from=pretrained, iterations=scale.transfer_iterations)
            rows = evaluate(model_dir, site_b, timings, variant.name, _bcn_tile(scale))
            results.append((plain.kind, method, rows, TRANSFER_PAPER[(plain.kind, method)]))
    return shen_report.write_transfer_report(out_dir, results, source_results, timings.data,
                                             _settings(args, config, [site_a, site_b]), time.time() - started)


def _bcn_tile(scale):
    return scale.bcn.train.inference_tile


def _settings(args, config, sites):
    scale = config.shen
    return {"scale": config.scale, "seed": args.seed, "workdir": os.path.abspath(args.workdir),
            "iterations": {kind: scale[kind].train.iterations for kind in baseline_configs.MODELS},
            "transfer_iterations": scale.transfer_iterations,
            "sites": {s.name: {"data_dir": s.data_dir, **{k: len(v) for k, v in s.split.items()}}
                      for s in sites}}


# ------------------------------------------------------------------ data

def prepare_site(work, site, data_dir, args, scale):
    """Data (given or synthesized), z-score records and the seeded split of one site."""
    layout, layout_file = (args.layout, args.layout_file) if data_dir else ("auto", None)
    print(f"[site {site}] data and records", flush=True)
    data_dir = common.synthesize_unless_given(data_dir, work, f"site_{site}", scale.site_cases[site], args.seed,
                                              scale.site_shapes[site], site)
    records_dir = os.path.join(work, "records", f"site_{site}")
    manifest = common.ensure_records(data_dir, records_dir, layout, layout_file, normalization="zscore")
    ids = common.labeled_ids(manifest)
    split = splits.load_or_make(os.path.join(work, f"split_site_{site}.json"),
                                lambda: split_case_ids(ids, site, scale, args.seed), known_ids=ids)
    return Site(site, data_dir, layout, layout_file, records_dir, split)


def split_case_ids(ids, site, scale, seed):
    """Seeded split over sorted ids. Site A: test (a fraction), val, train (the rest);
    site B: train (a small subset, [S]), val, test (the rest)."""
    order = splits.seeded_order(ids, seed)
    num_val = min(scale.num_val, max(len(ids) - 2, 0))
    if site == "a":
        num_test = max(1, round(len(ids) * scale.test_fraction))
        split = {"test": order[:num_test], "val": order[num_test:num_test + num_val],
                 "train": order[num_test + num_val:]}
    else:
        num_train = min(scale.target_train, len(ids) - num_val - 1)
        split = {"train": order[:num_train], "val": order[num_train:num_train + num_val],
                 "test": order[num_train + num_val:]}
    if not split["train"] or not split["test"]:
        raise ConfigError(f"site {site}: {len(ids)} labeled cases are too few for a train/test split")
    return {k: sorted(v) for k, v in split.items()}


# ------------------------------------------------------------------ training and evaluation

def variant_config(variant, scale, site, seed, iterations=None, init_from=None):
    """The trainer config of one model: the scale's config of its kind (`scale`: the `shen`
    section of configs/experiments.py), the variant's switches, the site's split."""
    c = copy.deepcopy(scale[variant.kind])
    c.seed = seed
    c.data.records_dir = site.records_dir
    c.data.train_cases, c.data.val_cases = list(site.split["train"]), list(site.split["val"])
    c.model.dropout, c.model.batch_norm = variant.dropout, variant.batch_norm
    c.loss.kind = variant.loss
    c.train.iterations = iterations or c.train.iterations
    c.train.init_from = init_from
    if variant.kind == "fifcn" and scale.fit_fifcn_volume:
        c.model.volume_size = fifcn_volume(site.records_dir, c.model.num_pools)
    return c


def fifcn_volume(records_dir, num_pools):
    """Demo-scale FIFCN window: the largest brain box of the records, rounded up to the
    network's pooling factor ([S] crops 240x240x155 -> 160x160x144 at paper scale)."""
    factor = 2 ** (1 + num_pools)
    boxes = np.array([[b - a for a, b in zip(c["crop"]["start"], c["crop"]["stop"])]
                      for c in reader.load_manifest(records_dir)["cases"]])
    return tuple(int(math.ceil(n / factor) * factor) for n in boxes.max(axis=0))


def train_variant(work, variant, site, scale, seed, timings, init_from=None, iterations=None):
    """Trains one model (or finds it finished); returns its work dir."""
    config = variant_config(variant, scale, site, seed, iterations, init_from)
    model_dir = os.path.join(work, "models", f"site_{site.name}", variant.slug)
    if common.finished(model_dir, config.train.iterations):
        print(f"[train] {variant.name}: finished earlier ({model_dir})", flush=True)
        return model_dir
    print(f"[train] {variant.name} on site {site.name}: {config.train.iterations} iterations", flush=True)
    keras.backend.clear_session()
    start = time.time()
    result = BaselineTrainer(config, model_dir).run()
    timings.record(variant.name, train_s=time.time() - start, **result["validation"])
    print(f"[train] {variant.name}: done in {time.time() - start:.0f} s, validation "
          f"{result['validation']}", flush=True)
    return model_dir


def evaluate(model_dir, site, timings, name, bcn_tile):
    """Whole-tumor Dice etc. of a model on the site's test cases (per-case rows). Label
    maps go to `<model_dir>/eval_site_<x>/predictions` on the original grid, then through
    the same evaluation as `python -m brats_tf.evaluate`; skipped when up to date."""
    out_dir = os.path.join(model_dir, f"eval_site_{site.name}")
    csv_path = os.path.join(out_dir, "evaluation.csv")
    if os.path.exists(csv_path) and os.path.getmtime(csv_path) > os.path.getmtime(
            os.path.join(model_dir, "model.keras")):
        return read_evaluation_csv(csv_path)[0]
    start = time.time()
    model, spec, info = baselines_inference.load_baseline(model_dir)
    cases = {c.case_id: c for c in discover_cases(site.data_dir, site.layout, site.layout_file)}
    pred_dir = os.path.join(out_dir, "predictions")
    for case_id in site.split["test"]:
        loaded = load_case(cases[case_id], info["preprocessing"]["modalities"])
        labels = baselines_inference.segment(model, spec, info, loaded, bcn_tile)
        write_label_map(os.path.join(pred_dir, f"{case_id}_seg.nii.gz"), labels,
                                               loaded.geometry)
    evaluation = evaluate_dirs(pred_dir, site.data_dir, site.layout, site.layout_file,
                                       workers=1, progress=False)
    write_evaluation_csv(csv_path, evaluation.rows)
    seconds = time.time() - start
    timings.record(name, **{f"predict_site_{site.name}_s": seconds,
                            f"predict_site_{site.name}_per_case_s": seconds / len(evaluation.rows)})
    print(f"[evaluate] {name} on site {site.name}: mean WT Dice "
          f"{np.mean([r['Dice_WT'] for r in evaluation.rows]):.3f} ({len(evaluation.rows)} cases, "
          f"{seconds:.0f} s)", flush=True)
    return evaluation.rows
