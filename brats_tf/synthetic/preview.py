"""Montage pictures of a case so a person can look at it: every modality and a label
overlay, in the three orientations, through the tumor center.

Works on anything shaped like `io.cases.LoadedCase` (image (X, Y, Z, K), modalities,
label in the internal convention or None, geometry with `.spacing` or None), so the same
picture can be drawn for a phantom and for a real case side by side.
"""

import io
import os

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from brats_tf.constants import CLASS_NAMES, ORIENTATIONS  # noqa: E402
from brats_tf.io.files import atomic_write  # noqa: E402

# Internal labels 1 (NCR/NET), 2 (edema), 3 (enhancing): red, green, yellow as in most
# BraTS figures; opaque, so that a palette of greys plus three colours holds the picture.
LABEL_COLORS = ((0.0, 0.0, 0.0, 0.0), (0.9, 0.1, 0.1, 1.0), (0.1, 0.75, 0.2, 1.0),
                (1.0, 0.9, 0.0, 1.0))
_DISPLAY_NAMES = {"t1": "T1", "t1c": "T1c", "t2": "T2", "flair": "FLAIR"}


def tumor_center(label, brain):
    """Voxel index of the whole-tumor center of mass, or of the brain when no tumor."""
    region = label > 0 if label is not None and np.any(label > 0) else brain
    if not np.any(region):
        return tuple(n // 2 for n in region.shape)
    return tuple(int(round(c.mean())) for c in np.nonzero(region))


def orient_slice(volume, orientation, index, box=None):
    """A 2D slice of an LPS-ordered volume, arranged for display (radiological view:
    patient left on the image right, anterior / superior at the top). `box` (three
    slices) crops the other two axes, e.g. to the brain."""
    bx, by, bz = box or (slice(None),) * 3
    if orientation == "axial":
        return volume[bx, by, index].T
    if orientation == "coronal":
        return volume[bx, index, bz].T[::-1]
    return volume[index, by, bz].T[::-1]


def brain_box(brain, margin=3):
    """Slices of the brain's bounding box plus `margin` voxels (whole volume if empty)."""
    if not np.any(brain):
        return (slice(None),) * 3
    box = []
    for axis in range(3):
        hits = np.nonzero(np.any(brain, axis=tuple(a for a in range(3) if a != axis)))[0]
        box.append(slice(max(int(hits[0]) - margin, 0), int(hits[-1]) + 1 + margin))
    return tuple(box)


def _aspect(orientation, spacing):
    sx, sy, sz = spacing
    return {"axial": sy / sx, "coronal": sz / sx, "sagittal": sz / sy}[orientation]


def _windows(image, brain):
    """Per-modality display range: 0.5th..99.5th percentile inside the brain."""
    windows = []
    for k in range(image.shape[-1]):
        values = image[..., k][brain] if np.any(brain) else image[..., k].ravel()
        lo, hi = np.percentile(values, [0.5, 99.5]) if values.size else (0.0, 1.0)
        windows.append((float(lo), float(hi) if hi > lo else float(lo) + 1.0))
    return windows


def _draw_case_rows(axes_rows, case, title, overlay_modality):
    """Draws one case into 3 rows (orientations) x (K + 1) columns of axes."""
    image = np.asarray(case.image, dtype=np.float32)
    modalities = tuple(case.modalities)
    brain = getattr(case, "mask", None)               # a mask file, when the layout has one
    brain = np.any(image != 0, axis=-1) if brain is None else np.asarray(brain, bool)
    label = case.label
    spacing = getattr(getattr(case, "geometry", None), "spacing", None) or (1.0, 1.0, 1.0)
    center = tumor_center(label, brain)
    box = brain_box(brain)
    windows = _windows(image, brain)
    base = modalities.index(overlay_modality) if overlay_modality in modalities else len(modalities) - 1
    cmap = ListedColormap(LABEL_COLORS)
    for row, orientation in enumerate(ORIENTATIONS):
        index = center[{"axial": 2, "coronal": 1, "sagittal": 0}[orientation]]
        aspect = _aspect(orientation, spacing)
        axes = axes_rows[row]
        for col, modality in enumerate(modalities):
            lo, hi = windows[col]
            axes[col].imshow(orient_slice(image[..., col], orientation, index, box), cmap="gray",
                             vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
            if row == 0:
                axes[col].set_title(_DISPLAY_NAMES.get(modality, modality), fontsize=9)
        lo, hi = windows[base]
        axes[-1].imshow(orient_slice(image[..., base], orientation, index, box), cmap="gray",
                        vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        if label is not None:
            axes[-1].imshow(orient_slice(np.asarray(label), orientation, index, box), cmap=cmap,
                            vmin=-0.5, vmax=3.5, aspect=aspect, interpolation="nearest")
        if row == 0:
            axes[-1].set_title(f"labels on {_DISPLAY_NAMES.get(modalities[base], modalities[base])}",
                               fontsize=9)
        axes[0].set_ylabel(f"{title}\n{orientation}" if row == 1 and title else orientation, fontsize=8)
    for ax in np.ravel(axes_rows):
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_facecolor("black")


def render_cases(cases, path, titles=None, overlay_modality="flair", dpi=90, caption=None):
    """Saves one PNG with each case as a block of 3 rows (axial, coronal, sagittal) and
    K + 1 columns (each modality, then the labels over `overlay_modality`), slices
    through the tumor centre. `titles` label the blocks; `caption` heads the figure.

    All cases must list the same number of modalities. Returns `path`.
    """
    cases = list(cases)
    titles = list(titles) if titles else [getattr(c, "case_id", "") for c in cases]
    num_cols = len(cases[0].modalities) + 1
    if any(len(c.modalities) + 1 != num_cols for c in cases):
        raise ValueError("all cases in one montage must have the same number of modalities")
    num_rows = len(ORIENTATIONS) * len(cases)
    fig, axes = plt.subplots(num_rows, num_cols, figsize=(1.9 * num_cols, 1.9 * num_rows),
                             squeeze=False, facecolor="white")
    for i, (case, title) in enumerate(zip(cases, titles)):
        _draw_case_rows(axes[3 * i:3 * i + 3], case, title, overlay_modality)
    handles = [Patch(color=LABEL_COLORS[k], label=CLASS_NAMES[k]) for k in (1, 2, 3)]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    if caption:
        fig.suptitle(caption, fontsize=9)
    fig.tight_layout(rect=(0, 0.03, 1, 1), h_pad=0.3, w_pad=0.2)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda tmp: _save_png(fig, tmp, dpi))
    plt.close(fig)
    return path


def _save_png(fig, path, dpi):
    """PNG with a palette of 253 greys and the three label colours: nothing visible is
    lost and the file is 2-3 times smaller than full RGB."""
    from PIL import Image  # installed with matplotlib

    greys = [(v, v, v) for v in np.linspace(0, 255, 253).round().astype(int)]
    labels = [tuple(int(round(255 * c)) for c in color[:3]) for color in LABEL_COLORS[1:]]
    palette = Image.new("P", (1, 1))
    palette.putpalette([c for rgb in greys + labels for c in rgb])
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(palette=palette, dither=Image.Dither.NONE).save(path, format="PNG", optimize=True)


def render_case(case, path, title=None, overlay_modality="flair", dpi=90, caption=None):
    """One case's montage (see `render_cases`)."""
    return render_cases([case], path, [title if title is not None else getattr(case, "case_id", "")],
                        overlay_modality, dpi, caption)
