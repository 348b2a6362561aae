"""The report from a small synthetic run: table numbers against NumPy/SciPy, figures
that exist and show something, and training logs read as the trainer writes them."""

import csv
import re

import matplotlib.image
import numpy as np
import pytest
from scipy import stats as scipy_stats

from brats_tf.report import markdown
from brats_tf.errors import DataError
from brats_tf.evaluation.metrics import COLUMNS
from brats_tf.evaluation.evaluate import write_evaluation_csv

MODELS = ["Standard 3D model", "2D-3D model A", "Ensemble"]
IDS = [f"case_{i:02d}" for i in range(8)]


def dice_values(seed=0):
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.4, 0.85, (len(IDS), 3))                  # columns: ET, TC, WT
    return {m: np.clip(base + 0.03 * k + rng.normal(0, 0.02, base.shape), 0, 1) for k, m in enumerate(MODELS)}


def write_evaluations(folder, values):
    paths = {}
    for k, (model, dice) in enumerate(values.items()):
        rows = [{"Label": cid, **{c: 0.0 for c in COLUMNS},
                 "Dice_ET": d[0], "Dice_TC": d[1], "Dice_WT": d[2]} for cid, d in zip(IDS, dice)]
        if k == 1:
            rows = rows[::-1]                     # another order: tables must join on case id
        paths[model] = folder / f"eval_{k}.csv"
        write_evaluation_csv(paths[model], rows)
    return paths


def write_training_log(path, iterations=300, with_validation=True):
    rng = np.random.default_rng(1)
    header = ["iteration", "loss", "loss_main", "loss_aux_0", "learning_rate"]
    header += ["val_dice_ncr_net", "val_dice_edema", "val_dice_enhancing"] if with_validation else []
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for it in range(1, iterations + 1):
            loss = np.exp(-it / 100) + rng.normal(0, 0.03)
            row = [it, loss, 0.75 * loss, 0.05 * loss, 0.25 / 2 ** (it // 100)]
            if with_validation:
                row += [0.8 * it / iterations] * 3 if it % 50 == 0 else ["", "", ""]
            writer.writerow(row)
    return path


def labels_volume(shift=0):
    grid = np.indices((40, 36, 16)).astype(float)
    r = np.sqrt((grid[0] - 20 - shift) ** 2 + (grid[1] - 18) ** 2 + ((grid[2] - 8) * 2) ** 2)
    labels = np.zeros((40, 36, 16), np.uint8)
    labels[r < 12] = 2
    labels[r < 7] = 3
    labels[r < 4] = 1
    return labels


def table_rows(text, heading):
    """The data rows of the first table after a heading, as lists of cells."""
    lines = text.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[start + 2:end]]


@pytest.fixture(scope="module")
def built_report(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("report_run")
    values = dice_values()
    paths = write_evaluations(tmp_path, values)
    image = labels_volume().astype(np.float32) * 40 + 100
    overlays = [markdown.Overlay("case_00", image, labels_volume(),
                               {"Standard 3D model": labels_volume(3), "Ensemble": labels_volume(1)})]
    rng = np.random.default_rng(2)
    features = rng.normal(size=(40, 36, 16, 12)).astype(np.float16)
    features[..., 7] += 4 * (labels_volume() == 2)
    np.save(tmp_path / "features.npy", features)
    report_path = markdown.write_report(
        tmp_path / "report", paths,
        comparisons=[("Standard 3D vs 2D-3D", "Standard 3D model", "2D-3D model A"),
                     ("2D-3D vs ensemble", "2D-3D model A", "Ensemble")],
        training_logs={"2D model 1 axial": write_training_log(tmp_path / "log.csv")},
        overlays=overlays,
        feature_maps=[markdown.FeatureMaps("case_00", tmp_path / "features.npy", image=image)],
        title="Synthetic run")
    return report_path, values


def test_tables_hold_the_right_numbers(built_report):
    report_path, values = built_report
    text = open(report_path).read()
    assert text.startswith("# Synthetic run")
    # Tables 1-3: mean Dice x100 per model, paper column order ET, TC, WT.
    means = table_rows(text, "## Mean Dice per model")
    assert [row[0] for row in means] == MODELS
    for row, model in zip(means, MODELS):
        assert [float(c) for c in row[1:4]] == pytest.approx(np.round(100 * values[model].mean(axis=0), 1), abs=0.051)
        assert row[4] == str(len(IDS))
    # Table 4: paired one-tailed t-test p-values, candidate better.
    pvalues = table_rows(text, "## Paired tests (Table 4)")
    for row, (base, cand) in zip(pvalues, (MODELS[:2], MODELS[1:])):
        expected = scipy_stats.ttest_rel(values[cand], values[base], axis=0, alternative="greater").pvalue
        for cell, p in zip(row[1:4], expected):
            shown = cell.strip("*")
            assert (cell.startswith("**")) == (p < 0.05)
            assert shown == "<0.0001" if p < 1e-4 else float(shown) == pytest.approx(p, abs=5e-5)
    # Table 6: distribution of the final model (the last one) per region.
    distribution = table_rows(text, "(Table 6)")
    final = values["Ensemble"]
    assert [row[0] for row in distribution] == ["Mean", "Median", "Quantile 25 %", "Quantile 75 %"]
    for k in range(3):
        mean, std = re.match(r"([\d.]+) \(([\d.]+)\)", distribution[0][k + 1]).groups()
        assert float(mean) == pytest.approx(100 * final[:, k].mean(), abs=0.051)
        assert float(std) == pytest.approx(100 * final[:, k].std(ddof=1), abs=0.051)
        for row, q in zip(distribution[1:], (50, 25, 75)):
            assert float(row[k + 1]) == pytest.approx(100 * np.percentile(final[:, k], q), abs=0.051)


def test_figures_exist_and_are_not_blank(built_report):
    report_path, _ = built_report
    folder = report_path.rsplit("/", 1)[0]
    text = open(report_path).read()
    names = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert set(names) == {"dice_boxplots.png", "training_2d_model_1_axial.png", "segmentations.png",
                          "feature_maps.png"}
    for name in names:
        pixels = matplotlib.image.imread(f"{folder}/{name}")
        assert pixels.shape[0] > 200 and pixels.shape[1] > 400, name
        assert pixels[..., :3].std() > 0.05, f"{name} looks blank"


def test_report_without_optional_parts_and_with_rows(tmp_path):
    values = dice_values(3)
    rows = {m: [{"Label": cid, "Dice_ET": d[0], "Dice_TC": d[1], "Dice_WT": d[2]} for cid, d in zip(IDS, v)]
            for m, v in values.items()}
    path = markdown.write_report(tmp_path, rows, final_model="Standard 3D model")
    text = open(path).read()
    assert "Table 4" not in text and "Fig. 8" not in text and "Distribution of Dice scores: Standard 3D" in text
    assert (tmp_path / "dice_boxplots.png").stat().st_size > 10_000


def test_comparisons_and_overlays_must_name_the_same_models(tmp_path):
    rows = {"A": [{"Label": "x", "Dice_ET": 1.0, "Dice_TC": 1.0, "Dice_WT": 1.0}]}
    with pytest.raises(ValueError, match="'B', which has no evaluation"):
        markdown.write_report(tmp_path, rows, comparisons=[("A vs B", "A", "B")])
    image = np.zeros((8, 8, 4), np.float32)
    overlays = [markdown.Overlay("x", image, None, {"A": labels_volume()[:8, :8, :4]}),
                markdown.Overlay("y", image, None, {"B": labels_volume()[:8, :8, :4]})]
    with pytest.raises(ValueError, match=r"overlay y has models \['B'\]; every case needs \['A'\]"):
        markdown.write_report(tmp_path, rows, overlays=overlays)


def test_training_logs_as_the_trainer_writes_them(tmp_path):
    log = markdown.read_training_log(write_training_log(tmp_path / "log.csv"))
    assert log["iteration"][0] == 1 and len(log["loss"]) == 300
    assert np.isnan(log["val_dice_edema"][0]) and log["val_dice_edema"][49] == pytest.approx(0.8 * 50 / 300)
    minimal = tmp_path / "minimal.csv"
    minimal.write_text("iteration,loss\n1,0.9\n2,0.8\n3,\n")
    log = markdown.read_training_log(minimal)
    assert np.isnan(log["loss"][2])
    from brats_tf.report import figures as report_figures
    report_figures.training_curves(log, tmp_path / "minimal.png", "minimal")   # loss only: one panel
    assert (tmp_path / "minimal.png").stat().st_size > 5_000
    for text, message in (("step,loss\n1,2\n", "'iteration'"), ("iteration,loss\n1,abc\n", "not a number"),
                          ("iteration,loss\n", "no rows")):
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        with pytest.raises(DataError, match=message):
            markdown.read_training_log(bad)
