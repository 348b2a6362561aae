"""PNG figures for the report ([M] Figs. 8, 10, 11, and Dice box plots).

Matplotlib's object-oriented API (`Figure`, no pyplot): renders with Agg without
touching the process-wide backend, so it is safe in a training process too.
Every function takes plain arrays/rows and an output path, and writes atomically.
"""

import textwrap

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import NullFormatter

from brats_tf.constants import CLASS_NAMES
from brats_tf.io.files import atomic_write
from brats_tf.report.tables import REGION_TITLES
from brats_tf.evaluation.stats import PAPER_REGIONS

FONT = {"title": 13, "label": 12, "tick": 10, "legend": 10}
# Tumor classes in the usual BraTS viewer colours: NCR/NET red, edema green, enhancing yellow.
CLASS_COLORS = {1: "#e41a1c", 2: "#4daf4a", 3: "#ffd92f"}
VAL_DICE_COLUMNS = {"val_dice_ncr_net": "NCR/NET", "val_dice_edema": "edema", "val_dice_enhancing": "enhancing"}


def save(fig, path):
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def training_curves(log, out_path, title):
    """Fig. 8: per-iteration loss (raw and smoothed, plus its parts) and validation
    Dice per class over iterations. `log` maps column name -> float array (NaN where
    a row has no value); whatever of the known columns exist is plotted."""
    iterations = log["iteration"]
    dice_columns = [c for c in VAL_DICE_COLUMNS if c in log and np.isfinite(log[c]).any()]
    panels = ["loss"] + (["dice"] if dice_columns else []) + (["lr"] if "learning_rate" in log else [])
    heights = {"loss": 3.0, "dice": 2.6, "lr": 1.4}
    fig = Figure(figsize=(9, sum(heights[p] for p in panels) + 0.8))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False,
                        gridspec_kw={"height_ratios": [heights[p] for p in panels]})[:, 0]
    fig.suptitle(title, fontsize=FONT["title"])
    ax = axes[panels.index("loss")]
    if "loss" in log:
        ax.plot(iterations, log["loss"], color="0.6", linewidth=0.8, label="loss (per iteration)")
        ax.plot(iterations, _smooth(log["loss"]), color="black", linewidth=2, label="loss (moving average)")
    parts = [c for c in log if c == "loss_main" or c.startswith("loss_aux_")]
    for column in parts:
        ax.plot(iterations, _smooth(log[column]), linewidth=1.2, label=f"{column} (moving average)")
    _style(ax, "", "training loss")
    ax.legend(fontsize=FONT["legend"], ncol=2 if len(parts) > 2 else 1, loc="upper right")
    if dice_columns:
        ax = axes[panels.index("dice")]
        for column, color in zip(dice_columns, ("#e41a1c", "#4daf4a", "#e6ab02")):
            have = np.isfinite(log[column])
            ax.plot(iterations[have], log[column][have], marker="o", markersize=4, color=color,
                    label=VAL_DICE_COLUMNS[column])
        ax.set_ylim(0, 1)
        _style(ax, "", "validation Dice")
        ax.legend(fontsize=FONT["legend"], loc="lower right")
    if "lr" in panels:
        ax = axes[panels.index("lr")]
        rates = log["learning_rate"]
        ax.plot(iterations, rates, color="#377eb8", drawstyle="steps-post")
        ax.set_yscale("log")
        distinct = np.unique(rates[np.isfinite(rates) & (rates > 0)])
        ax.yaxis.set_minor_formatter(NullFormatter())        # crowded "4x10^-2" labels otherwise
        if 0 < len(distinct) <= 5:                           # a few halvings: label each value
            ax.set_yticks(distinct, [f"{r:.3g}" for r in distinct])
        _style(ax, "", "learning rate")
    axes[-1].set_xlabel("iteration (optimizer updates)", fontsize=FONT["label"])
    save(fig, out_path)


def dice_boxplots(evaluations, out_path, regions=PAPER_REGIONS):
    """Per-case Dice per model, one panel per region; every case drawn as a dot."""
    models = list(evaluations)
    fig = Figure(figsize=(4.2 * len(regions), 1.2 + 0.55 * len(models)))
    axes = fig.subplots(1, len(regions), sharey=True, squeeze=False)[0]
    rng = np.random.default_rng(0)                     # fixed jitter: reproducible figures
    for ax, region in zip(axes, regions):
        data = [[row[f"Dice_{region}"] for row in evaluations[m]] for m in models]
        positions = np.arange(len(models))[::-1]      # first model on top
        ax.boxplot(data, positions=positions, orientation="horizontal", widths=0.6, showfliers=False,
                   medianprops={"color": "black", "linewidth": 2})
        for y, values in zip(positions, data):
            ax.scatter(values, y + rng.uniform(-0.15, 0.15, len(values)), s=12, alpha=0.6, color="#377eb8")
        ax.set_xlim(-0.02, 1.02)
        ax.set_title(REGION_TITLES[region], fontsize=FONT["title"])
        _style(ax, "Dice", "")
    axes[0].set_yticks(np.arange(len(models))[::-1], models, fontsize=FONT["label"])
    save(fig, out_path)


def segmentation_overlays(cases, out_path):
    """Fig. 11: one row per case: the image, each model's segmentation, the ground truth,
    on the axial slice where the ground truth has the most tumor.

    cases: [(case_id, image 3D array, reference labels or None, {model: labels})],
    labels in the internal convention.
    """
    models = list(cases[0][3])
    for case_id, _, _, predictions in cases:
        if set(predictions) != set(models):
            raise ValueError(f"overlay {case_id} has models {sorted(predictions)}; every case needs {sorted(models)}")
    columns = ["image"] + models + (["ground truth"] if any(c[2] is not None for c in cases) else [])
    fig = Figure(figsize=(2.9 * len(columns), 3.0 * len(cases) + 0.6))
    axes = fig.subplots(len(cases), len(columns), squeeze=False)
    colormap = ListedColormap([CLASS_COLORS[k] for k in (1, 2, 3)])
    for row, (case_id, image, reference, predictions) in enumerate(cases):
        z = best_axial_slice(reference if reference is not None else next(iter(predictions.values())))
        box = _foreground_box(image[..., z])
        background = _display(image[..., z][box])
        labels = [predictions[m] for m in models] + ([reference] if "ground truth" in columns else [])
        for col, title in enumerate(columns):
            ax = axes[row, col]
            ax.imshow(background, cmap="gray", interpolation="nearest")
            if col > 0 and labels[col - 1] is not None:
                overlay = np.ma.masked_equal(_display(labels[col - 1][..., z][box]), 0)
                ax.imshow(overlay, cmap=colormap, vmin=0.5, vmax=3.5, alpha=0.55, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(textwrap.fill(title, 24), fontsize=FONT["title"])   # long model names
        axes[row, 0].set_ylabel(f"{case_id}\n(axial {z})", fontsize=FONT["label"])
    handles = [Patch(color=CLASS_COLORS[k], label=CLASS_NAMES[k]) for k in (1, 2, 3)]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=FONT["legend"], frameon=False)
    fig.subplots_adjust(bottom=0.45 / (3.0 * len(cases) + 0.6), wspace=0.04, hspace=0.12)
    save(fig, out_path)


def feature_maps(cases, out_path):
    """Fig. 10: 2D features (pre-softmax outputs of the 2D nets) on one axial slice.

    cases: [(case_id, features (X, Y, Z, C), group names, channel names, image or None,
    axial slice index)]; channels are shown in rows of len(channel names) (one row per
    group, e.g. per orientation of the 2D net), each with its own colour scale.
    """
    per_row = len(cases[0][3])
    grid_rows = sum(case[1].shape[-1] // per_row for case in cases)
    with_image = any(c[4] is not None for c in cases)
    ncols = per_row + int(with_image)
    fig = Figure(figsize=(2.8 * ncols, 2.7 * grid_rows + 0.3))
    axes = fig.subplots(grid_rows, ncols, squeeze=False)
    row = 0
    for case_id, features, groups, channel_names, image, z in cases:
        for g, group in enumerate(groups):
            if with_image:
                ax = axes[row, 0]
                ax.axis("off")
                if image is not None and g == 0:
                    ax.imshow(_display(image[..., z]), cmap="gray")
                    ax.set_title(f"{case_id}\n(axial {z})", fontsize=FONT["label"])
            for c, name in enumerate(channel_names):
                ax = axes[row, c + int(with_image)]
                shown = ax.imshow(_display(features[..., z, g * per_row + c].astype(np.float32)), cmap="magma")
                fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=FONT["tick"] - 2)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"{group}: {name}", fontsize=FONT["label"])
            row += 1
    fig.subplots_adjust(wspace=0.25, hspace=0.3)
    save(fig, out_path)


def most_varied_axial_slice(features):
    """The axial index where the features vary most (summed per-channel std): where the
    2D nets see structure, when no reference says where the tumor is."""
    spread = features.astype(np.float32).std(axis=(0, 1)).sum(axis=-1)
    return int(np.argmax(spread))


def best_axial_slice(labels):
    """The axial index with the most non-zero voxels (the middle slice when there are none)."""
    area = np.count_nonzero(labels, axis=(0, 1))
    return int(np.argmax(area)) if area.any() else labels.shape[2] // 2


def _foreground_box(plane, margin=4):
    """Slices around what differs from the corner value (the background, which is not
    always 0: z-scored images have a negative one), so the brain fills the panel."""
    foreground = plane != plane[0, 0]
    if not foreground.any():
        return (slice(None), slice(None))
    box = []
    for axis in (0, 1):
        present = np.flatnonzero(foreground.any(axis=1 - axis))
        box.append(slice(max(int(present[0]) - margin, 0), int(present[-1]) + 1 + margin))
    return tuple(box)


def _display(plane):
    """An (x, y) plane rotated for display with the first array axis horizontal."""
    return np.rot90(plane)


def _smooth(values):
    """Moving average over ~2% of the points (NaN-aware), for a readable trend line."""
    values = np.asarray(values, dtype=np.float64)
    window = max(1, len(values) // 50)
    finite = np.isfinite(values)
    kernel = np.ones(window)
    sums = np.convolve(np.where(finite, values, 0.0), kernel, mode="same")
    counts = np.convolve(finite.astype(np.float64), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan)


def _style(ax, xlabel, ylabel):
    ax.set_xlabel(xlabel, fontsize=FONT["label"])
    ax.set_ylabel(ylabel, fontsize=FONT["label"])
    ax.tick_params(labelsize=FONT["tick"])
    ax.grid(alpha=0.3)


def subset_heatmaps(means, subsets, out_path, regions=PAPER_REGIONS):
    """Missing-sequence experiment: one panel per variant, mean Dice (x100) of each subset of
    sequences (rows) and region (columns). means: {variant title: (len(subsets), len(regions))}."""
    fig = Figure(figsize=(3.2 * len(means) + 1.5, 0.38 * len(subsets) + 1.6))
    axes = fig.subplots(1, len(means), sharey=True, squeeze=False)[0]
    image = None
    for ax, (title, values) in zip(axes, means.items()):
        image = ax.imshow(100 * np.asarray(values, float), cmap="viridis", vmin=0, vmax=100, aspect="auto")
        for (i, j), v in np.ndenumerate(100 * np.asarray(values, float)):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=FONT["tick"] - 2,
                    color="white" if v < 55 else "black")
        ax.set_xticks(range(len(regions)), regions, fontsize=FONT["tick"])
        ax.set_title("\n".join(textwrap.wrap(title, 28)), fontsize=FONT["label"])
    axes[0].set_yticks(range(len(subsets)), subsets, fontsize=FONT["tick"] - 1)
    fig.colorbar(image, ax=list(axes), label="mean Dice x100", shrink=0.8)
    save(fig, out_path)
