"""`run_experiment.py --experiment=missing_inference` (issue 15, item 3): Dice per region for
every non-empty subset of the sequences at test time, for
  (a) 2D model 1 axial trained with sequence dropout, the missing sequences gated out;
  (b) the same model trained without dropout, the missing sequences zero-filled;
  (c) the model of (b), each missing sequence replaced by a copy of a present one (the
      BraTS Toolkit advice; `COPY_FROM` says which),
with paired one-tailed t-tests of (a) vs (b) and (a) vs (c) per subset, a table and a heat map.

A subset is simulated on each test case prepared with all its sequences: the absent channels
are zeroed (or copied) on the prepared grid, so the crop box and brain mask stay those of the
complete case (`segment` on a case that really lacks files derives them from the files it
has; tests/test_missing_sequences.py runs that path).
"""

import itertools
import os

import numpy as np

from brats_tf import preprocess
from brats_tf.evaluation import stats
from brats_tf.evaluation.evaluate import case_row, read_evaluation_csv, write_evaluation_csv
from brats_tf.experiments.mlynarski import Model, Run, twod
from brats_tf.inference import exported, pipeline
from brats_tf.io.cases import discover_cases, load_case
from brats_tf.io.files import read_json, write_json, write_text
from brats_tf.report import figures, tables

STAGES = ("data and records", "2D models", "inference and evaluation", "report")
DROPOUT = Model("2D model 1 axial slices, sequence dropout", "2d_model1_axial_dropout", "2d", "model1")
PLAIN = twod("model1")
VARIANTS = {"dropout": "(a) sequence dropout, missing gated out",
            "zero_fill": "(b) no dropout, missing zero-filled",
            "copy": "(c) no dropout, a present sequence copied"}
# The present sequence copied into a missing slot: the one of similar contrast first.
COPY_FROM = {"t1": ("t1c", "t2", "flair"), "t1c": ("t1", "flair", "t2"),
             "t2": ("flair", "t1c", "t1"), "flair": ("t2", "t1c", "t1")}


def sequence_subsets(modalities):
    """Every non-empty subset of the sequences, the complete set first, then by size."""
    return [s for size in range(len(modalities), 0, -1) for s in itertools.combinations(modalities, size)]


def subset_name(subset):
    return "+".join(subset)


def copy_fill(image, modalities, subset):
    """The image with each sequence outside `subset` replaced by a present one (COPY_FROM)."""
    out = image.copy()
    for i, m in enumerate(modalities):
        if m not in subset:
            source = next((s for s in COPY_FROM.get(m, ()) if s in subset), subset[0])
            out[..., i] = image[..., modalities.index(source)]
    return out


def missing_inference(args):
    run = Run(args, "missing_inference", STAGES)
    with run.stage("data and records"):
        data = run.prepare_data()
    with run.stage("2D models"):
        iterations = run.scale.missing_iterations
        plain_dir = run.train(PLAIN, run.config_2d(PLAIN, data, iterations=iterations))
        config = run.config_2d(DROPOUT, data, iterations=iterations)
        config.data.sequence_dropout = run.scale.sequence_dropout
        dropout_dir = run.train(DROPOUT, config)
    with run.stage("inference and evaluation"):
        evaluations = score_subsets(run, data, dropout_dir, plain_dir)
    with run.stage("report"):
        return write_report(run, data, evaluations)


def score_subsets(run, data, dropout_dir, plain_dir):
    """{(variant, subset): per-case metric rows} over the test cases, each also written to
    evaluation/<variant>_<subset>.csv; skipped when those CSVs were made by these models."""
    (dropout, _), (plain, _) = exported.load_with_chains([dropout_dir, plain_dir])
    modalities = list(plain.info["modalities"])
    subsets = sequence_subsets(modalities)
    folder = os.path.join(run.out_dir, "evaluation")
    stamp = {"models": [dropout.sha256, plain.sha256], "cases": data.split["test"]}
    csv = {(v, s): os.path.join(folder, f"{v}_{subset_name(s)}.csv") for v in VARIANTS for s in subsets}
    if read_json(os.path.join(folder, "stamp.json"), {}) == stamp and all(map(os.path.exists, csv.values())):
        print("  evaluations: complete", flush=True)
        return {key: read_evaluation_csv(path)[0] for key, path in csv.items()}
    rows = {key: [] for key in csv}
    cases = {c.case_id: c for c in discover_cases(data.test_dir, data.test_layout, data.test_layout_file)}
    for number, case_id in enumerate(data.split["test"], 1):
        case = cases[case_id]
        inputs = pipeline.PreparedInputs(case)
        image = inputs.image_for(plain)
        prepared, _ = inputs.prepared(plain.info["preprocessing"])
        reference = load_case(case, [modalities[0]]).label
        spacing = inputs.geometry.spacing

        def score(model, x, present=None):
            logits = pipeline.predict_2d(model, x, pipeline.BATCH_SIZE_2D, present)
            labels = preprocess.paste(np.where(prepared.brain, np.argmax(logits, -1), 0).astype(np.uint8),
                                      prepared.box)
            return {"Label": case_id, **case_row(labels, reference, spacing)}

        for subset in subsets:
            mask = np.array([m in subset for m in modalities], np.float32)
            zeroed = image * mask
            rows[("dropout", subset)].append(score(dropout, zeroed, mask))
            rows[("zero_fill", subset)].append(score(plain, zeroed))
            rows[("copy", subset)].append(rows[("zero_fill", subset)][-1] if len(subset) == len(modalities)
                                          else score(plain, copy_fill(image, modalities, subset)))
        print(f"  [{number}/{len(data.split['test'])}] {case_id}: {len(subsets)} subsets x {len(VARIANTS)}",
              flush=True)
    for key, path in csv.items():
        write_evaluation_csv(path, rows[key])
    write_json(os.path.join(folder, "stamp.json"), stamp)
    return rows


def write_report(run, data, evaluations):
    subsets = list(dict.fromkeys(s for _, s in evaluations))
    regions = stats.PAPER_REGIONS
    means = {title: [[np.mean([r[f"Dice_{g}"] for r in evaluations[(v, s)]]) for g in regions] for s in subsets]
             for v, title in VARIANTS.items()}
    names = [subset_name(s) for s in subsets]
    mean_rows = [[name] + [f"{100 * means[title][i][j]:.1f}" for title in means for j in range(len(regions))]
                 for i, name in enumerate(names)]
    header = ["Sequences present"] + [f"{v} {g}" for v in ("(a)", "(b)", "(c)") for g in regions]
    test_rows = []
    for subset, name in zip(subsets, names):
        cells = [name]
        for baseline in ("zero_fill", "copy"):
            tests = stats.paired_tests(evaluations[(baseline, subset)], evaluations[("dropout", subset)],
                                       regions=regions, names=(baseline, "dropout"))
            cells += [stats.format_pvalue(t.t_pvalue, bold_if_significant=True) for t in tests]
        test_rows.append(cells)
    figure = os.path.join(run.out_dir, "subsets_dice.png")
    figures.subset_heatmaps(means, names, figure, regions)
    n = len(data.split["test"])
    text = "\n".join([
        "# Missing sequences at test time: every subset of the sequences\n",
        "Variants: " + "; ".join(VARIANTS.values()) + ". Copies: " +
        ", ".join(f"{m} <- {' / '.join(s)}" for m, s in COPY_FROM.items()) + " (first present).\n",
        f"## Mean Dice x100 per subset ({n} test cases)\n", tables.markdown_table(header, mean_rows),
        "## Paired one-tailed t-tests: (a) better than (b), (a) better than (c)\n",
        tables.markdown_table(["Sequences present"] + [f"a>{b} {g}" for b in ("b", "c") for g in regions], test_rows),
        "With every sequence present, (b) and (c) are the same predictions.\n",
        "## Figure\n", f"![Mean Dice per subset]({os.path.basename(figure)})\n",
        run._settings_note(data), run._timings_note()])
    path = os.path.join(run.out_dir, "report.md")
    write_text(path, text)
    print("\n" + tables.markdown_table(header, mean_rows), flush=True)
    return path
