"""bfloat16 against float32 inference with trained models (issue 14 item 4), JSON lines.

For each case, each network of the six-model 2D-3D ensemble of a `run_experiment` work dir
is run at both precisions through the project's own inference code (`segment --precision`):
the 2D feature models one orientation at a time (`pipeline.predict_2d`), then each 2D-3D
model on its chain's features (`pipeline.predict_model`, layer-wise or tiled as segment
chooses). Per network and precision: warm seconds (the second of two runs). Per final model
and for the hierarchical vote of the six: Dice between the fp32 and the bf16 label maps per
region (WT, TC, ET; 1.0 when both are empty) and the share of voxels whose label changes.

    python -m bench.bench_precision --workdir W [--cases 2] [--no_real]

W: a run_experiment work dir (the demo's: `W/models/3d_{A,B,C}_model{1,2}` and their 2D
models; the test cases of `W/split.json` from the data the run synthesized). Also the real
BraTS 2023 case of ../shared/data when it is there (models trained on phantoms: its maps
show agreement between precisions, not quality). Lines: one per network and case
("network"), one per final model and case ("agreement"), one per case for the vote
("ensemble"), and a last "summary" with the speed-ups and the smallest Dice.
"""

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from bench.bench_3d import REAL_CASE
from brats_tf.constants import ORIENTATIONS, PRECISIONS, REGIONS
from brats_tf.evaluation import metrics
from brats_tf.inference import ensemble, exported, pipeline
from brats_tf.io.cases import discover_cases

FINAL = [f"3d_{kind}_{features}" for features in ("model1", "model2") for kind in ("A", "B", "C")]


def emit(**record):
    print(json.dumps(record), flush=True)


def the_cases(workdir, count, real):
    """[(source, Case)]: `count` test phantoms of the work dir, then the real case."""
    split = json.loads((workdir / "split.json").read_text())
    found = {c.case_id: c for folder in (workdir / "data").iterdir() for c in discover_cases(folder)}
    cases = [("phantom", found[case_id]) for case_id in split["test"][:count]]
    if real and REAL_CASE.is_dir():
        cases.append(("real", discover_cases(REAL_CASE)[0]))
    return cases


def warm_seconds(fn):
    """(result, seconds of the second run): the first loads and traces."""
    fn()
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def run_precision(plan, case):
    """{network name: warm s}, {final model name: label map} of one case at the plan's precision."""
    inputs, seconds, maps, cache = pipeline.PreparedInputs(case), {}, {}, {}
    for chain in plan.chains:
        for orientation in ORIENTATIONS:
            model = chain[orientation]
            name = Path(model.path).parent.name
            if name not in seconds:
                _, seconds[name] = warm_seconds(lambda: pipeline.predict_2d(
                    model, inputs.image_for(model), pipeline.BATCH_SIZE_2D, inputs.present_for(model)))
        pipeline.chain_features(chain, inputs, pipeline.BATCH_SIZE_2D, cache)   # once per chain, untimed here
    for model, chain in zip(plan.final, plan.chains):
        name = Path(model.path).parent.name
        (labels, _), seconds[name] = warm_seconds(
            lambda: pipeline.model_labels(model, chain, inputs, feature_cache=cache))
        maps[name] = labels
    return seconds, maps


def agreement(fp32, bf16):
    """Dice per region between two internal label maps, and the share of changed voxels."""
    dice = {region: round(metrics.dice(metrics.region_mask(bf16, region), metrics.region_mask(fp32, region)), 5)
            for region in REGIONS}
    return {"dice": dice, "changed_share": float(np.mean(fp32 != bf16))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, type=Path, help="a run_experiment work dir (the demo's)")
    parser.add_argument("--cases", type=int, default=2, help="test phantoms of the work dir")
    parser.add_argument("--no_real", action="store_true", help="leave out the real case of ../shared")
    args = parser.parse_args()
    paths = [str(args.workdir / "models" / name) for name in FINAL]
    plans = {p: exported.plan_models(paths, precision=p) for p in PRECISIONS}
    speedups, smallest = {}, {}
    for source, case in the_cases(args.workdir, args.cases, not args.no_real):
        runs = {p: run_precision(plans[p], case) for p in PRECISIONS}
        for name, fp32_s in runs["fp32"][0].items():
            bf16_s = runs["bf16"][0][name]
            speedups.setdefault(name, []).append(fp32_s / bf16_s)
            emit(what="network", case=case.case_id, source=source, network=name, fp32_s=round(fp32_s, 3),
                 bf16_s=round(bf16_s, 3), speedup=round(fp32_s / bf16_s, 3))
        maps = {p: runs[p][1] for p in PRECISIONS}
        for name in maps["fp32"]:
            line = agreement(maps["fp32"][name], maps["bf16"][name])
            emit(what="agreement", case=case.case_id, source=source, model=name, **line)
            for region, value in line["dice"].items():
                smallest[region] = min(smallest.get(region, 1.0), value)
        fused = {p: ensemble.hierarchical_vote(list(maps[p].values()), with_proportions=False)[0] for p in PRECISIONS}
        line = agreement(fused["fp32"], fused["bf16"])
        emit(what="ensemble", case=case.case_id, source=source, **line)
        for region, value in line["dice"].items():
            smallest[region] = min(smallest[region], value)
    emit(what="summary", workdir=os.fspath(args.workdir),
         speedup={name: round(float(np.mean(v)), 3) for name, v in speedups.items()},
         min_dice=smallest, all_regions_at_least_0_99=all(v >= 0.99 for v in smallest.values()))


if __name__ == "__main__":
    main()
