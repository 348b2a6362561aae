"""Tables and figures of the [S] experiments: Table 1 / Fig. 5 (ablation), Table 2 / Fig. 8
(transfer), as markdown + PNG in the experiment's folder. Dice is the binary whole-tumor
Dice per test case (column `Dice_WT` of the evaluation rows), shown x100 like [S]."""

import json
import os
import textwrap

import numpy as np
from matplotlib.figure import Figure

from brats_tf.io.files import atomic_write
from brats_tf.report.figures import save
from brats_tf.report.tables import markdown_table

HISTOGRAM_BINS = np.linspace(0.0, 1.0, 21)


def dice_values(rows):
    return np.array([row["Dice_WT"] for row in rows], dtype=np.float64)


def summary_cells(rows):
    """Mean, std (ddof 1), median (x100, one decimal) and the number of cases."""
    d = 100 * dice_values(rows)
    std = f"{np.std(d, ddof=1):.1f}" if len(d) > 1 else "n/a"
    return [f"{d.mean():.1f}", std, f"{np.median(d):.1f}", len(d)]


def paper_cell(value):
    return "—" if value is None else f"{value:.1f}"


def dice_histograms(panels, out_path, title, columns=4):
    """One histogram of per-case whole-tumor Dice per panel ([S] Figs. 5, 8), mean marked.
    panels: [(title, rows)]."""
    rows_count = int(np.ceil(len(panels) / columns))
    fig = Figure(figsize=(3.4 * columns, 2.8 * rows_count + 0.6), layout="constrained")
    axes = fig.subplots(rows_count, columns, squeeze=False, sharex=True, sharey=True)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (name, rows) in zip(axes.flat, panels):
        values = dice_values(rows)
        ax.hist(values, bins=HISTOGRAM_BINS, color="#377eb8", edgecolor="white")
        ax.axvline(values.mean(), color="#e41a1c", linewidth=2)
        ax.set_title(f"{textwrap.fill(name, 26)}\nmean {values.mean():.2f}", fontsize=9)
        ax.set_xlim(0, 1)
    for ax in axes[-1]:
        ax.set_xlabel("whole-tumor Dice")
    for ax in axes[:, 0]:
        ax.set_ylabel("cases")
    fig.suptitle(title, fontsize=12)
    save(fig, out_path)


def timing_table(timings):
    header = ["Model", "Training (s)", "Prediction (s/case)", "Final validation WT Dice"]
    body = []
    for name, t in timings.items():
        per_case = [f"{v:.2f}" for k, v in t.items() if k.endswith("_per_case_s")]
        body.append([name, f"{t['train_s']:.0f}" if "train_s" in t else "—", " / ".join(per_case) or "—",
                     f"{t['val_dice_wt']:.3f}" if "val_dice_wt" in t else "—"])
    return markdown_table(header, body)


def settings_section(settings, wall_s):
    sites = ", ".join(f"site {name}: {s['train']} train / {s['val']} val / {s['test']} test cases "
                      f"({s['data_dir']})" for name, s in settings["sites"].items())
    return (f"Scale `{settings['scale']}`, seed {settings['seed']}; {sites}. Iterations on site A: "
            f"{json.dumps(settings['iterations'])}; on site B: {settings['transfer_iterations']}. "
            f"Wall time of this run: {wall_s / 60:.1f} min (steps finished by an earlier run are skipped "
            f"and not counted; per-model figures below come from the run that did them).\n")


def write_ablation_report(out_dir, results, timings, settings, wall_s):
    """results: [(Variant, per-case rows)] in table order. Returns report.md's path."""
    body = []
    for variant, rows in results:
        model = variant.kind.upper()
        version = variant.name[len(model):].strip(" ,") or "—"
        body.append([model, version] + summary_cells(rows) + [paper_cell(variant.paper)])
    table = markdown_table(["Model", "Version", "Mean WT Dice (%)", "Std", "Median", "Cases",
                            "[S] Table 1 (%)"], body)
    dice_histograms([(v.name, rows) for v, rows in results], os.path.join(out_dir, "dice_histograms.png"),
                    "Per-case whole-tumor Dice on the site-A test cases (cf. [S] Fig. 5)")
    text = "\n".join([
        "# [S] ablation: BCN / FCN ± dropout ± BN, FIFCN cross-entropy vs Dice (cf. Table 1, Fig. 5)\n",
        settings_section(settings, wall_s),
        "## Mean whole-tumor Dice on held-out site-A cases\n",
        "[S] trained on 178 BraTS 2017 HGG cases and tested on 44; it gives no FIFCN figure in Table 1 "
        "(Fig. 5: 'do not perform very well', Dice loss better than cross-entropy).\n",
        table,
        "## Per-case Dice histograms (cf. Fig. 5)\n",
        "![Dice histograms](dice_histograms.png)\n",
        "## Timings\n",
        timing_table(timings)])
    return _write(out_dir, text)


def write_transfer_report(out_dir, results, source_results, timings, settings, wall_s):
    """results: [(kind, method, rows on site B, [S]'s Dice or None)];
    source_results: [(Variant, rows on site A)]."""
    body = [[kind.upper(), method.capitalize()] + summary_cells(rows) + [paper_cell(paper)]
            for kind, method, rows, paper in results]
    table = markdown_table(["Model", "Method", "Mean WT Dice (%)", "Std", "Median", "Cases",
                            "[S] Table 2 (%)"], body)
    source = markdown_table(["Model", "Mean WT Dice (%)", "Std", "Median", "Cases"],
                            [[v.name] + summary_cells(rows) for v, rows in source_results])
    dice_histograms([(f"{kind.upper()} {method}", rows) for kind, method, rows, _ in results],
                    os.path.join(out_dir, "dice_histograms.png"),
                    "Per-case whole-tumor Dice on the site-B test cases (cf. [S] Fig. 8)", columns=3)
    text = "\n".join([
        "# [S] transfer learning: site A -> site B (cf. Table 2, Fig. 8)\n",
        settings_section(settings, wall_s),
        "## Mean whole-tumor Dice on held-out site-B cases\n",
        "*Pre-trained*: site-A weights as they are; *re-trained*: site-A weights trained further on the "
        "small site-B training subset; *fine-tuned*: the same with dropout and batch normalization added. "
        "[S]: BraTS -> Rembrandt, 11 training cases.\n",
        table,
        "For reference, the pre-trained models on site A's own held-out cases:\n",
        source,
        "## Per-case Dice histograms (cf. Fig. 8)\n",
        "![Dice histograms](dice_histograms.png)\n",
        "## Timings\n",
        timing_table(timings)])
    return _write(out_dir, text)


def _write(out_dir, text):
    path = os.path.join(out_dir, "report.md")

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)
    return path
