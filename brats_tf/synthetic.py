"""The built-in synthetic dataset ("phantoms", METHOD §10).

A phantom is a skull-stripped brain (white matter, cortex with sulci, deep grey nuclei,
CSF and ventricles, cerebellum, brainstem) with a nested tumor: edema around a core that
is an enhancing rim around necrosis, or only non-enhancing tissue in low-grade-like
cases. Healthy look-alikes of tumor that only long-range context tells apart are
included: bilateral periventricular caps and symmetric white-matter lesions (bright in
T2/FLAIR like edema), choroid plexus and vessels (bright in T1c like enhancement).
Acquisition effects: partial-volume blur, multiplicative bias field, Rician noise,
per-case and per-modality scanner scaling.

Everything is defined in millimetres and sampled on the requested matrix, so a case
looks the same at any matrix size. Site "b" is a second scanner: coarser matrix,
thicker slices, other contrasts, stronger bias and noise ([S] transfer learning).
Case i of a dataset depends only on (seed, i, site, shape). Contrasts are calibrated
on the real cases in ../shared/data (table in BUILD_NOTES.md).
"""

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
from scipy import ndimage

from brats_tf.constants import MODALITIES, OUTPUT_LABEL_MAPS
from brats_tf.errors import ConfigError
from brats_tf.io.cases import LoadedCase
from brats_tf.io.nifti import Geometry, atomic_write, save_volume

GENERATOR_VERSION = 1
MANIFEST_NAME = "synthetic_dataset.json"
FILE_SUFFIXES = {"t1": "t1", "t1c": "t1ce", "t2": "t2", "flair": "flair"}  # BraTS 2017 names

# Tissue classes of the generator, and their intensity relative to white matter per
# modality (t1, t1c, t2, flair) at site a, before blur and noise. Chosen so that tissue
# medians measured on full-resolution phantoms match those of the real cases
# (TCGA-DU-7294 with its peer-fusion labels; BraTS-GLI-00001-000 for enhancement).
TISSUES = ("background", "wm", "gm", "deep_gm", "csf", "choroid", "vessel", "pv_cap",
           "wm_lesion", "edema", "necrosis", "net", "enhancing")
T = {name: code for code, name in enumerate(TISSUES)}
CONTRAST_A = np.array([
    [0.00, 0.00, 0.00, 0.00],   # background
    [1.00, 1.00, 1.00, 1.00],   # wm
    [0.68, 0.72, 1.10, 0.88],   # gm (cortex)
    [0.80, 0.82, 1.05, 0.92],   # deep_gm
    [0.22, 0.25, 3.90, 0.20],   # csf (set darker/brighter than measured: thin sulci blur)
    [0.75, 1.85, 1.60, 1.20],   # choroid plexus: enhances like tumor
    [0.65, 1.90, 0.55, 0.55],   # vessel / sinus: bright T1c, flow void in T2/FLAIR
    [0.80, 0.78, 1.90, 1.80],   # periventricular cap / rim: edema-like in every sequence
    [0.74, 0.70, 2.00, 1.80],   # symmetric white-matter lesion: edema-like
    [0.72, 0.68, 2.00, 1.80],   # edema (label 2)
    [0.35, 0.38, 2.70, 1.15],   # necrosis (label 1)
    [0.45, 0.45, 2.20, 1.40],   # non-enhancing tumor (label 1)
    [0.85, 1.85, 1.45, 1.45],   # enhancing (label 4)
], dtype=np.float32)
TISSUE_LABELS = {T["edema"]: 2, T["necrosis"]: 1, T["net"]: 1, T["enhancing"]: 3}  # internal
# Rows whose contrast varies strongly from case to case (lesions and look-alikes).
_VARIABLE_ROWS = [T[n] for n in ("choroid", "vessel", "pv_cap", "wm_lesion", "edema",
                              "necrosis", "net", "enhancing")]


@dataclass(frozen=True)
class Site:
    name: str
    code: int
    default_shape: tuple
    fov_mm: tuple                 # physical field of view; spacing = fov / shape
    contrast_changes: dict        # (tissue, modality index) -> ratio replacing site a's
    bias_strength: float          # std of the log bias field
    noise_range: tuple            # Rician noise std, fraction of white matter
    wm_levels: tuple              # typical stored grey value of white matter per modality
    blur_mm: float                # in-plane partial-volume blur (sigma)


SITES = {
    "a": Site("a", 0, (240, 240, 155), (240.0, 240.0, 155.0), {}, 0.08, (0.025, 0.05),
              (650.0, 700.0, 450.0, 380.0), 0.6),
    # Rembrandt-like: 160x160x53 at 1.5x1.5x3 mm, weaker T1 contrast, other T2/FLAIR.
    "b": Site("b", 1, (160, 160, 53), (240.0, 240.0, 159.0),
              {(T["gm"], 0): 0.80, (T["gm"], 1): 0.82, (T["csf"], 0): 0.45, (T["csf"], 1): 0.45,
               (T["csf"], 2): 3.10, (T["gm"], 2): 1.05, (T["edema"], 2): 1.75,
               (T["edema"], 3): 1.60, (T["enhancing"], 1): 1.65, (T["pv_cap"], 3): 1.55},
              0.15, (0.05, 0.08), (1200.0, 1300.0, 2200.0, 900.0), 0.9),
}


@dataclass
class Phantom:
    """One synthetic case: int16 images, labels, geometry and the drawn parameters."""
    case_id: str
    images: dict                  # modality -> (X, Y, Z) int16
    label: np.ndarray             # (X, Y, Z) uint8, internal convention 0..3
    geometry: Geometry
    info: dict = field(default_factory=dict)
    tissue: np.ndarray = None     # generator tissue codes (see TISSUES), for analysis only

    @property
    def affine(self):
        return self.geometry.affine

    @property
    def seg(self):
        """Labels as stored on disk (BraTS 2017: 0, 1, 2, 4)."""
        lookup = np.array([OUTPUT_LABEL_MAPS["brats2017"][k] for k in range(4)], np.uint8)
        return lookup[self.label]

    def as_loaded_case(self):
        image = np.stack([self.images[m].astype(np.float32) for m in MODALITIES], axis=-1)
        return LoadedCase(self.case_id, image, MODALITIES, self.geometry, label=self.label)


# ---------------------------------------------------------------- options and geometry

def get_site(site):
    if site not in SITES:
        raise ConfigError(f"unknown site {site!r}; use one of {sorted(SITES)}")
    return SITES[site]


def parse_shape(text):
    """'96,96,72' (or '96x96x72') -> (96, 96, 72); None or '' -> None (site default)."""
    if text is None or isinstance(text, (tuple, list)):
        shape = None if text is None else tuple(text)
    else:
        if not str(text).strip():
            return None
        parts = str(text).lower().replace("x", ",").split(",")
        try:
            shape = tuple(int(p) for p in parts)
        except ValueError:
            raise ConfigError(f"--shape {text!r}: expected three integers like 96,96,72") from None
    if shape is not None and (len(shape) != 3 or not all(16 <= int(n) <= 512 for n in shape)):
        raise ConfigError(f"--shape {text!r}: expected three integers between 16 and 512, like 96,96,72")
    return None if shape is None else tuple(int(n) for n in shape)


def case_geometry(shape, site):
    """Geometry of a phantom grid: LPS voxel axes like the real BraTS files (x = -i*sx,
    y = (Y-1-j)*sy, z = k*sz), spacing = the site's field of view / matrix."""
    site = get_site(site) if isinstance(site, str) else site
    spacing = tuple(f / n for f, n in zip(site.fov_mm, shape))
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[1, 3] = (shape[1] - 1) * spacing[1]
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_zooms(spacing)
    header.set_xyzt_units("mm")
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    return Geometry(tuple(shape), affine, header)


# ---------------------------------------------------------------- smooth random fields

def _bspline_weights(u):
    return np.stack([(1 - u) ** 3 / 6, (3 * u ** 3 - 6 * u ** 2 + 4) / 6,
                     (-3 * u ** 3 + 3 * u ** 2 + 3 * u + 1) / 6, u ** 3 / 6], axis=-1)


# Std of a cubic B-spline interpolant of unit white noise, per axis (for unit-std fields).
_BSPLINE_GAIN = float(np.sqrt(np.mean(np.sum(_bspline_weights(np.linspace(0, 1, 1001)) ** 2, -1))))


class SmoothField:
    """Smooth random fields in millimetres, about unit std: random values on a coarse node
    grid (spacing `cell_mm`) over the field of view, cubic B-spline interpolated.
    `channels` independent fields share one grid. Sampling is separable (three small
    matrix products), so it is cheap on any grid, and gives the same field whatever the
    matrix size."""

    def __init__(self, rng, fov_mm, cell_mm, channels=1):
        self.cell, self.channels = float(cell_mm), channels
        self.counts = [int(np.ceil(f / cell_mm)) + 4 for f in fov_mm]
        self.nodes = rng.standard_normal([channels] + self.counts).astype(np.float32) / _BSPLINE_GAIN ** 3

    def _matrix(self, axis, coords_mm):
        """Interpolation weights (points x nodes) restricted to the nodes in use."""
        t = coords_mm / self.cell + (self.counts[axis] - 1) / 2
        base = np.floor(t).astype(np.int64)
        first = int(base.min()) - 1
        matrix = np.zeros((len(coords_mm), int(base.max()) + 3 - first), np.float32)
        taps = base[:, None] - 1 + np.arange(4) - first
        matrix[np.arange(len(coords_mm))[:, None], taps] = _bspline_weights(t - base)
        return matrix, slice(first, first + matrix.shape[1])

    def sample(self, axes_mm):
        """Values on the grid spanned by per-axis coordinate vectors (x, y, z) in mm:
        an (X, Y, Z) array, or (channels, X, Y, Z) when there are several channels."""
        (mx, sx), (my, sy), (mz, sz) = (self._matrix(a, np.asarray(c, np.float64))
                                        for a, c in enumerate(axes_mm))
        out = np.tensordot(self.nodes[:, sx, sy, sz], mx, axes=(1, 1))   # (C, ny, nz, X)
        out = np.tensordot(out, my, axes=(1, 1))                         # (C, nz, X, Y)
        out = np.tensordot(out, mz, axes=(1, 1))                         # (C, X, Y, Z)
        return out[0] if self.channels == 1 else out


def voxel_axes_mm(shape, spacing):
    """Voxel-centre coordinates per axis in mm, origin at the centre of the field of view.
    Axis 0 grows to the patient's left, axis 1 to posterior, axis 2 to superior."""
    return [((np.arange(n) - (n - 1) / 2) * s).astype(np.float32) for n, s in zip(shape, spacing)]


def _ellipsoid(lr, ap, si, center, radii):
    """Normalized ellipsoid radius (<1 inside)."""
    return np.sqrt(sum(((c - c0) / r) ** 2 for c, c0, r in zip((lr, ap, si), center, radii)))


# ---------------------------------------------------------------- random case parameters

def _draw_parameters(rng, site, spacing):
    """All scalar random choices for one case, always drawn in the same order."""
    p = {}
    p["head_scale"] = rng.uniform(0.93, 1.07) * rng.uniform(0.97, 1.03, 3)
    p["head_shift"] = rng.normal(0.0, 3.0, 3)
    p["yaw"], p["roll"] = np.deg2rad(rng.normal(0.0, 3.0)), np.deg2rad(rng.normal(0.0, 2.0))
    p["ventricle_scale"] = rng.uniform(0.8, 1.3)
    p["sulcus_width"] = rng.uniform(0.8, 1.4)
    p["cap_strength"] = rng.uniform(0.5, 1.1)
    p["lesion_pairs"] = [tuple(float(v) for v in rng.uniform((14, -45, 0, 4), (34, 40, 40, 9)))
                         for _ in range(rng.choice([0, 1, 2, 2, 3, 4]))]
    p["wt_fraction"] = float(np.exp(rng.uniform(np.log(0.012), np.log(0.07))))
    p["core_fraction"] = rng.uniform(0.45, 0.75)
    p["rim_mm"] = max(rng.uniform(2.5, 5.0), 0.9 * max(spacing))
    p["edema_margin_mm"] = rng.uniform(2.0, 6.0)
    p["tumor_axes"] = rng.uniform(0.8, 1.25, 3)
    p["tumor_rotation"] = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    p["irregularity"] = rng.uniform([0.08, 0.15], [0.2, 0.35])
    p["edema_floor"] = rng.uniform(0.3, 0.55)       # edema contrast at its outer border
    p["mass_effect"] = rng.uniform(0.15, 0.4)
    p["tumor_center"] = _draw_tumor_center(rng)
    jitter = np.ones_like(CONTRAST_A)
    jitter[2:5] = np.exp(rng.normal(0.0, 0.04, (3, 4)))
    jitter[_VARIABLE_ROWS] = np.exp(rng.normal(0.0, 0.15, (len(_VARIABLE_ROWS), 4)))
    p["contrast_jitter"] = jitter
    p["scanner_scale"] = np.exp(rng.normal(0.0, 0.3, 4))
    p["noise"] = rng.uniform(*site.noise_range)
    return _as_python_floats(p)


def _as_python_floats(p):
    """NumPy float64 scalars would silently promote the float32 volumes to float64."""
    out = {}
    for key, value in p.items():
        if isinstance(value, np.ndarray) and value.ndim == 1:
            value = tuple(float(v) for v in value)
        elif isinstance(value, np.ndarray):
            value = value.astype(np.float32)
        elif isinstance(value, (np.floating, float)):
            value = float(value)
        out[key] = value
    return out


def _draw_tumor_center(rng):
    """A point deep in one hemisphere's white matter, away from the ventricles (mm)."""
    while True:
        lr = rng.choice([-1.0, 1.0]) * rng.uniform(14, 50)
        ap, si = rng.uniform(-65, 55), rng.uniform(-20, 50)
        near_ventricles = abs(lr) < 22 and -32 < ap < 36 and -5 < si < 26
        if 0.3 < _cerebrum_radius(lr, ap, si) < 0.7 and not near_ventricles:
            return np.array([lr, ap, si])


def _cerebrum_radius(lr, ap, si):
    """Normalized radius of the cerebrum (< 1 inside) at canonical coordinates (mm).
    Below its centre it is shallow medially and deep laterally (temporal lobes)."""
    temporal = np.clip((np.abs(lr) - 12) / 25, 0, 1) * np.exp(-((ap + 5) / 40) ** 2)
    half_si = np.where(si > 8, np.float32(62), 24 + 20 * temporal)
    narrowing = 1 - 0.12 * np.clip(-ap / 84, 0, 1) ** 2            # narrower frontal lobes
    return np.sqrt((lr / (66 * narrowing)) ** 2 + (ap / 84) ** 2 + ((si - 8) / half_si) ** 2)


def _contrast_table(site, p):
    table = CONTRAST_A.copy()
    for (tissue, modality), value in site.contrast_changes.items():
        table[tissue, modality] = value
    table = 1 + (table - 1) * p["contrast_jitter"]     # jitter the contrast, not the level
    table[T["background"]] = 0
    table[T["pv_cap"]] = 1 + (table[T["pv_cap"]] - 1) * p["cap_strength"]
    return np.clip(table, 0.05, None)


# ---------------------------------------------------------------- anatomy

def _pose_box(p, axes_mm, spacing, low, high, margin_mm):
    """Voxel slices of the grid `axes_mm` covering the canonical-head box [low, high]
    (mm) under the case's head pose, plus a margin for the smooth deformation."""
    corners = np.array(np.meshgrid(*zip(low, high), indexing="ij")).reshape(3, -1)
    corners = corners * np.array(p["head_scale"])[:, None]
    cy, sy, cr, sr = np.cos(p["yaw"]), np.sin(p["yaw"]), np.cos(p["roll"]), np.sin(p["roll"])
    lr, z = cr * corners[0] + sr * corners[2], -sr * corners[0] + cr * corners[2]
    x, y = cy * lr + sy * corners[1], -sy * lr + cy * corners[1]
    slices = []
    for axis, mm in enumerate((x, y, z)):
        mm, n = mm + p["head_shift"][axis] - axes_mm[axis][0], len(axes_mm[axis])
        start = int(np.floor((mm.min() - margin_mm) / spacing[axis]))
        stop = int(np.ceil((mm.max() + margin_mm) / spacing[axis])) + 1
        slices.append(slice(min(max(start, 0), n), min(max(stop, 0), n)))
    return tuple(slices)


# Canonical-head box (mm) holding every structure: cerebrum, cerebellum, brainstem.
HEAD_EXTENT_MM = ((-72.0, -88.0, -95.0), (72.0, 88.0, 76.0))


class _Head:
    """Anatomical coordinates (mm, canonical head) of every voxel, and the tissue map
    being painted. Local structures are evaluated only in their voxel box, found by
    inverting the head pose (the smooth deformation is covered by a safety margin)."""

    MARGIN_MM = 18.0

    def __init__(self, axes_mm, spacing, p, displacement):
        self.axes, self.spacing, self.p = axes_mm, spacing, p
        x, y, z = np.meshgrid(*axes_mm, indexing="ij", sparse=True)
        x, y, z = x - p["head_shift"][0], y - p["head_shift"][1], z - p["head_shift"][2]
        cy, sy, cr, sr = np.cos(p["yaw"]), np.sin(p["yaw"]), np.cos(p["roll"]), np.sin(p["roll"])
        lr, ap = cy * x - sy * y, sy * x + cy * y
        lr, si = cr * lr - sr * z, sr * lr + cr * z
        self.coords = [((c + 2.0 * d) / s).astype(np.float32)
                       for c, d, s in zip((lr, ap, si), displacement, p["head_scale"])]
        self.tissue = np.zeros([len(a) for a in axes_mm], np.uint8)

    def box(self, low, high):
        return _pose_box(self.p, self.axes, self.spacing, low, high, self.MARGIN_MM)

    def local(self, center, radii):
        box = self.box([c - r for c, r in zip(center, radii)], [c + r for c, r in zip(center, radii)])
        return box, [c[box] for c in self.coords]

    def paint(self, box, inside, code, only=None):
        view = self.tissue[box]
        if only is not None:
            inside = inside & np.isin(view, only)
        view[inside] = code

    def paint_ellipsoid(self, center, radii, code, only=None):
        box, (lr, ap, si) = self.local(center, radii)
        self.paint(box, _ellipsoid(lr, ap, si, center, radii) < 1, code, only)


def _ventricle(lr, ap, si, side, v, grow=0.0):
    """Lateral ventricle (frontal horn, body, atrium) as a tube whose centre line and
    width follow the antero-posterior position; `grow` mm thicker when > 0."""
    t = np.clip((ap + 30) / 62, 0, 1)
    arch = np.sin(np.pi * t)
    taper = np.sqrt(np.clip(1 - (2 * t - 1) ** 8, 0, 1))
    w_lr = v * (2.5 + 2.5 * t) * taper + grow + 1e-3
    w_si = v * (4.0 + 2.0 * arch) * taper + grow + 1e-3
    inside = ((lr - side * (8 + 9 * t ** 2)) / w_lr) ** 2 + ((si - 10 - 9 * arch) / w_si) ** 2 < 1
    return inside & (ap > -30 - grow) & (ap < 32 + grow), t


def _temporal_horn(lr, ap, si, side, v):
    u = np.clip((ap + 8) / 34, 0, 1)
    taper = np.sqrt(np.clip(1 - (2 * u - 1) ** 8, 0, 1))
    inside = ((lr - side * (28 - 10 * u)) / (2.2 * v * taper + 1e-3)) ** 2 \
        + ((si + 14 - 22 * u ** 2) / (2.8 * v * taper + 1e-3)) ** 2 < 1
    return inside & (ap > -8) & (ap < 26)


def _paint_cortex(head, fields, p):
    """Cerebrum outline, cortex with sulci (zero set of a random field, lined with grey
    matter) and the interhemispheric fissure. Returns the normalized radius r."""
    lr, ap, si = head.coords
    r = _cerebrum_radius(lr, ap, si) + 0.025 * fields["outline"]
    depth = (1 - r) * 68                                          # mm below the surface
    cerebrum = r < 1
    gyri = np.abs(fields["gyri"])
    sulcal = cerebrum & (depth < 18 + 6 * fields["outline"])
    sw = p["sulcus_width"]
    head.tissue[cerebrum] = T["wm"]
    head.tissue[cerebrum & ((depth < 3) | (sulcal & (gyri < 0.12 * sw + 0.55)))] = T["gm"]
    head.tissue[cerebrum & ((depth < 1) | (sulcal & (gyri < 0.12 * sw)))] = T["csf"]
    fissure = cerebrum & (si > -12) & ((si > 30) | (depth < 14))
    head.tissue[fissure & (np.abs(lr) < 4.5)] = T["gm"]
    head.tissue[fissure & (np.abs(lr) < 1.3 * sw)] = T["csf"]
    return r


def _paint_deep_structures(head, fields, p):
    """Cerebellum, brainstem, deep grey nuclei, ventricles, choroid plexus and the
    healthy look-alikes of tumor (periventricular caps, symmetric lesions)."""
    v = p["ventricle_scale"]
    box, (lr, ap, si) = head.local((0, 46, -28), (54, 28, 24))
    cerebellum = np.minimum(*(_ellipsoid(lr, ap, si, (side * 20, 46, -28), (34, 28, 24)) for side in (-1, 1)))
    below = (cerebellum < 1) & (head.tissue[box] == 0)              # under the occipital lobes
    folia = np.sin(si * (2 * np.pi / 5.0) + 4.0 * fields["gyri"][box]) > 0.75
    head.paint(box, below, T["gm"])
    head.paint(box, below & (cerebellum < 0.5), T["wm"])
    head.paint(box, below & (((cerebellum > 0.6) & folia) | (cerebellum > 0.95)), T["csf"])
    box, (lr, ap, si) = head.local((0, 18, -50), (13, 14, 45))
    taper = np.clip((si + 85) / 75, 0, 1)                            # pons wider than medulla
    stem = np.hypot(lr / (8 + 5 * taper), (ap - 22 + 6 * taper) / (8 + 4 * taper)) < 1
    head.paint(box, stem & (si < -5), T["wm"])
    for side in (-1, 1):
        for center, radii in (((14, -14, 12), (5, 10, 8)), ((10, 8, 3), (8, 13, 9)), ((24, -2, 2), (6, 14, 9))):
            head.paint_ellipsoid((side * center[0],) + center[1:], radii, T["deep_gm"])
        box, (lr, ap, si) = head.local((side * 18, 0, 8), (18, 40, 24))
        grown, t = _ventricle(lr, ap, si, side, v, grow=2.0 + 4.0 * p["cap_strength"])
        rim, _ = _ventricle(lr, ap, si, side, v, grow=1.5)
        head.paint(box, (grown & ((t < 0.2) | (t > 0.8))) | rim, T["pv_cap"], only=(T["wm"],))
        head.paint(box, _ventricle(lr, ap, si, side, v)[0] | _temporal_horn(lr, ap, si, side, v), T["csf"])
        head.paint_ellipsoid((side * 16.5, 24, 14), (3.5, 6, 3.5), T["choroid"], only=(T["csf"],))
    head.paint_ellipsoid((0, 4, 3), (1.5 * v, 13, 8), T["csf"])     # third ventricle
    head.paint_ellipsoid((0, 31, -34), (4, 2.5, 6), T["csf"])        # fourth ventricle
    for x0, y0, z0, radius in p["lesion_pairs"]:
        for side in (-1, 1):
            box, (lr, ap, si) = head.local((side * x0, y0, z0), (radius,) * 3)
            lumpy = 0.25 * fields["lesion"].sample([a[s] for a, s in zip(head.axes, box)])
            head.paint(box, _ellipsoid(lr, ap, si, (side * x0, y0, z0), (radius,) * 3) + lumpy < 1,
                       T["wm_lesion"], only=(T["wm"],))


def _paint_vessels(head, fields, r, max_spacing):
    """Vessels in the sulci (where the zero sets of two random fields cross: curves)
    and the superior sagittal sinus; both bright in T1c like enhancing tumor."""
    lr, _, si = head.coords
    tube = 0.06 * max(1.0, max_spacing / 1.5)
    vessels = np.all(np.abs(fields["vessels"]) < tube, axis=0) & (r > 0.78)
    head.tissue[vessels & np.isin(head.tissue, (T["csf"], T["gm"]))] = T["vessel"]
    head.tissue[(r < 1) & (r > 0.95) & (si > 15) & (np.abs(lr) < 3.5)] = T["vessel"]


def _mass_effect(coords, center, radius, strength):
    """Anatomy pushed away from the tumor: a voxel near the tumor shows the tissue that
    was closer to its centre (a smooth, fold-free radial compression)."""
    offsets = [c - np.float32(c0) for c, c0 in zip(coords, center)]
    dist2 = sum(o * o for o in offsets)
    shrink = 1 - np.float32(strength) * np.exp(-dist2 / np.float32(2 * radius ** 2))
    return [np.float32(c0) + o * shrink for c0, o in zip(center, offsets)], dist2


# ---------------------------------------------------------------- tumor

def _tumor_radii(p, spacing):
    """Edema and core radii (mm) for the drawn whole-tumor fraction of the brain; never
    so small that the rim or the necrosis falls between voxels of this grid."""
    brain_mm3 = 1.3e6 * float(np.prod(p["head_scale"]))
    edema = (3 * p["wt_fraction"] * brain_mm3 / (4 * np.pi)) ** (1 / 3)
    core = max(edema * p["core_fraction"], p["rim_mm"] + 1.5 * max(spacing))
    return max(edema, core / 0.8), core


def _tumor_box(dist2, reach):
    inside = dist2 < reach ** 2
    box = []
    for axis in range(3):
        hits = np.nonzero(np.any(inside, axis=tuple(a for a in range(3) if a != axis)))[0]
        box.append(slice(int(hits[0]), int(hits[-1]) + 1) if hits.size else slice(0, 0))
    return tuple(box)


def _add_tumor(tissue, coords, box, axes_mm, fields, p, spacing, low_grade):
    """Writes the tumor into `tissue` (inside `box`); returns the edema contrast weight."""
    edema_r, core_r = _tumor_radii(p, spacing)
    offsets = np.stack([c[box] - c0 for c, c0 in zip(np.broadcast_arrays(*coords), p["tumor_center"])], -1)
    local = offsets @ p["tumor_rotation"] / (p["tumor_axes"] / np.prod(p["tumor_axes"]) ** (1 / 3))
    dist = np.sqrt(np.sum(local ** 2, axis=-1))
    crop_axes = [a[s] for a, s in zip(axes_mm, box)]
    irr_core, irr_edema = p["irregularity"]
    core_d = dist / core_r + irr_core * fields["core"].sample(crop_axes)
    edema_d = dist / edema_r + irr_edema * fields["edema"].sample(crop_axes)
    split = fields["split"].sample(crop_axes)
    under = tissue[box].copy()
    core = (core_d < 1) & (under > 0)
    if low_grade:
        necrosis, enhancing = core & (split > 1.2), np.zeros_like(core)
    else:
        rim = p["rim_mm"] * (1 + 0.3 * np.clip(fields["rim"].sample(crop_axes), -1.5, 1.5))
        enhancing = core & (core_d > 1 - rim / core_r)
        necrosis = core & ~enhancing & (split < 0.5)
    margin = p["edema_margin_mm"] / core_r
    grows_into = np.isin(under, (T["wm"], T["deep_gm"], T["pv_cap"], T["wm_lesion"]))
    grows_into |= (under == T["gm"]) & (core_d < 1 + 2 * margin)     # cortex only next to the core
    edema = ((edema_d < 1) | (core_d < 1 + margin)) & grows_into & ~core
    components, _ = ndimage.label(edema | core)
    edema &= np.isin(components, np.unique(components[core]))        # edema touches the core
    crop = tissue[box]
    crop[edema] = T["edema"]
    crop[core] = T["net"]
    crop[necrosis] = T["necrosis"]
    crop[enhancing] = T["enhancing"]
    # Edema is brightest next to the core and fades toward its outer border.
    depth = np.maximum(np.clip((1 - edema_d) / 0.35, 0, 1), np.clip((1 + margin - core_d) / margin, 0, 1))
    weight = p["edema_floor"] + (1 - p["edema_floor"]) * depth
    return under, weight


# ---------------------------------------------------------------- images

def _render_images(tissue, tumor, axes_mm, spacing, fields, p, site, rng):
    """Intensities from tissue codes, then partial-volume blur, bias field, Rician noise
    and the scanner's scaling; int16 like real scanners, zero outside the brain."""
    box, under, weight = tumor
    table = _contrast_table(site, p)
    edema = tissue[box] == T["edema"]
    tumor_mask = np.isin(tissue[box], (T["edema"], T["necrosis"], T["net"], T["enhancing"]))
    # Heterogeneous tumor; enhancement is patchy (weak in places, like real rims).
    patchiness = np.where(tissue[box] == T["enhancing"], np.float32(0.25), np.float32(0.12))
    texture = 1 + patchiness * fields["texture"].sample([a[s] for a, s in zip(axes_mm, box)])
    blur = [max(site.blur_mm / s, 0.45) for s in spacing]
    inside = np.flatnonzero(tissue)                  # noise and scaling only where brain is
    bias = fields["bias"].sample(axes_mm).reshape(5, -1)[:, inside]
    images = {}
    for m, modality in enumerate(MODALITIES):
        image = table[:, m][tissue]
        crop = image[box]
        base = table[:, m][under[edema]]
        crop[edema] = base + (table[T["edema"], m] - base) * weight[edema]
        crop[tumor_mask] *= texture[tumor_mask]
        values = ndimage.gaussian_filter(image, blur, truncate=3.0).ravel()[inside]
        log_bias = 0.75 * bias[0] + 0.66 * bias[m + 1]     # partly shared by all sequences
        values *= np.exp(site.bias_strength * log_bias)
        noise = p["noise"] * rng.standard_normal((2, values.size), np.float32)
        values = np.hypot(values + noise[0], noise[1]) * (site.wm_levels[m] * p["scanner_scale"][m])
        out = np.zeros(tissue.shape, np.int16)
        out.ravel()[inside] = np.clip(np.rint(values), 0, 32767)
        images[modality] = out
    return images


def _draw_fields(rng, fov):
    """Smooth random fields, always drawn in the same order (cell sizes in mm)."""
    cells = (("outline", 30, 1), ("gyri", 5, 1), ("vessels", 16, 2), ("lesion", 4, 1),
             ("core", 9, 1), ("edema", 7, 1), ("split", 5, 1), ("rim", 6, 1), ("texture", 4, 1),
             ("displacement", 45, 3), ("bias", 60, 5))
    return {name: SmoothField(rng, fov, cell, channels) for name, cell, channels in cells}


LOW_GRADE_FRACTION = 0.15
_GOLDEN = 0.6180339887498949


def is_low_grade(seed, index, site="a"):
    """Whether case `index` has no enhancement. A low-discrepancy sequence (with a
    seed-dependent start) rather than a coin per case, so that any run of consecutive
    cases holds close to LOW_GRADE_FRACTION of them."""
    start = np.random.default_rng([seed, get_site(site).code, 7919]).random()
    return bool((start + index * _GOLDEN) % 1.0 < LOW_GRADE_FRACTION)


def synthesize_case(seed, index=0, shape=None, site="a"):
    """Builds phantom `index` of the dataset with this seed; returns a `Phantom`.

    Deterministic: the result depends only on (seed, index, shape, site).
    """
    site = get_site(site)
    if not isinstance(seed, (int, np.integer)) or seed < 0 or index < 0:
        raise ConfigError(f"seed and index must be non-negative integers (got {seed!r}, {index!r})")
    shape = parse_shape(shape) or site.default_shape
    geometry = case_geometry(shape, site)
    spacing = geometry.spacing
    rng = np.random.default_rng([int(seed), int(index), site.code])
    p = _draw_parameters(rng, site, spacing)
    fields = _draw_fields(rng, site.fov_mm)
    low_grade = is_low_grade(seed, index, site.name)
    # Work only inside the box that can hold the head; paste into the full grid at the end.
    full_axes = voxel_axes_mm(shape, spacing)
    head_box = _pose_box(p, full_axes, spacing, HEAD_EXTENT_MM[0], HEAD_EXTENT_MM[1], _Head.MARGIN_MM)
    axes_mm = [a[s] for a, s in zip(full_axes, head_box)]
    head = _Head(axes_mm, spacing, p, fields["displacement"].sample(axes_mm))
    edema_r, _ = _tumor_radii(p, spacing)
    tumor_coords = head.coords
    head.coords, dist2 = _mass_effect(tumor_coords, p["tumor_center"], 0.8 * edema_r, p["mass_effect"])
    sampled = {k: fields[k].sample(axes_mm) for k in ("outline", "gyri", "vessels")}
    sampled["lesion"] = fields["lesion"]
    r = _paint_cortex(head, sampled, p)
    _paint_deep_structures(head, sampled, p)
    _paint_vessels(head, sampled, r, max(spacing))
    tissue = head.tissue
    del head, sampled, r
    reach = edema_r * (1 + 2.5 * p["irregularity"][1]) * 1.4 + p["edema_margin_mm"] + 2 * max(spacing)
    box = _tumor_box(dist2, reach)
    under, weight = _add_tumor(tissue, tumor_coords, box, axes_mm, fields, p, spacing, low_grade)
    del tumor_coords, dist2
    local_images = _render_images(tissue, (box, under, weight), axes_mm, spacing, fields, p, site, rng)
    images = {}
    for modality, local in local_images.items():
        images[modality] = np.zeros(shape, np.int16)
        images[modality][head_box] = local
    label = np.zeros(shape, np.uint8)
    for code, value in TISSUE_LABELS.items():
        label[head_box][tissue == code] = value
    brain = np.count_nonzero(tissue)
    info = {"seed": int(seed), "index": int(index), "site": site.name, "shape": list(shape),
            "spacing_mm": [round(s, 4) for s in spacing], "low_grade": low_grade,
            "whole_tumor_fraction": round(float(np.count_nonzero(label) / max(brain, 1)), 4)}
    full_tissue = np.zeros(shape, np.uint8)
    full_tissue[head_box] = tissue
    return Phantom(f"Synth_{site.name}_{int(index):04d}", images, label, geometry, info, full_tissue)


# ---------------------------------------------------------------- writing a dataset

def case_files(case_id):
    """File names of a case in the BraTS 2017 layout (modality -> name, plus 'seg')."""
    names = {m: f"{case_id}_{FILE_SUFFIXES[m]}.nii.gz" for m in MODALITIES}
    names["seg"] = f"{case_id}_seg.nii.gz"
    return names


def write_case(phantom, out_dir):
    """Writes a phantom as <out_dir>/<case_id>/<case_id>_{t1,t1ce,t2,flair,seg}.nii.gz.
    The folder is filled under a hidden temporary name and renamed into place, so an
    interrupted run never leaves a partial case that looks complete."""
    final = os.path.join(out_dir, phantom.case_id)
    tmp = tempfile.mkdtemp(prefix=f".{phantom.case_id}.", suffix=".tmp", dir=out_dir)
    try:
        os.chmod(tmp, 0o755)                        # mkdtemp makes it private
        names = case_files(phantom.case_id)
        for modality in MODALITIES:
            save_volume(os.path.join(tmp, names[modality]), phantom.images[modality], phantom.geometry)
        save_volume(os.path.join(tmp, names["seg"]), phantom.seg, phantom.geometry)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)      # only our own temporary folder
        raise
    return final


def _check_manifest(out_dir, settings):
    """A folder holds one synthetic dataset: refuse to mix settings in it."""
    path = os.path.join(out_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            existing = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: unreadable dataset manifest ({err}); use another --out_dir") from None
    keys = ("generator_version", "seed", "site", "shape")
    if any(existing.get(k) != settings[k] for k in keys):
        found = ", ".join(f"{k}={existing.get(k)}" for k in keys)
        raise ConfigError(f"{out_dir} already holds phantoms made with {found}; use another --out_dir")
    return existing


def write_dataset(out_dir, num_cases, seed, shape=None, site="a", preview=None, progress=True):
    """Writes `num_cases` phantoms (case ids Synth_<site>_0000, ...) in the BraTS 2017
    layout, plus `synthetic_dataset.json` recording the settings. Cases already present
    from an earlier run with the same settings are kept (they are identical), so a
    dataset can be grown or an interrupted run resumed. `preview` (a .png path) saves a
    montage of the first case. Returns the case folders."""
    site_obj = get_site(site)
    shape = parse_shape(shape) or site_obj.default_shape
    if not isinstance(num_cases, (int, np.integer)) or num_cases < 1:
        raise ConfigError(f"--num_cases must be a positive integer (got {num_cases!r})")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"--seed must be a non-negative integer (got {seed!r})")
    if preview and not str(preview).lower().endswith(".png"):
        raise ConfigError(f"--preview {preview!r}: expected a .png file name")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"--out_dir {out_dir!r} exists and is not a directory")
    os.makedirs(out_dir, exist_ok=True)
    settings = {"generator_version": GENERATOR_VERSION, "seed": int(seed), "site": site_obj.name,
                "shape": list(shape), "spacing_mm": list(case_geometry(shape, site_obj).spacing)}
    existing = _check_manifest(out_dir, settings)
    done = (existing or {}).get("num_cases", 0)
    _write_manifest(out_dir, settings, done)          # claims the folder before any case
    folders = []
    for index in _progress(range(num_cases), progress, "phantoms"):
        case_id = f"Synth_{site_obj.name}_{index:04d}"
        folder = os.path.join(out_dir, case_id)
        if not os.path.isdir(folder):
            write_case(synthesize_case(seed, index, shape, site_obj.name), out_dir)
        elif existing is None or not all(os.path.isfile(os.path.join(folder, n))
                                         for n in case_files(case_id).values()):
            raise ConfigError(f"{folder} exists but was not written by this generator; use another --out_dir")
        folders.append(folder)
    _write_manifest(out_dir, settings, max(done, int(num_cases)))
    if preview:
        from brats_tf.preview import render_case   # matplotlib only when a picture is asked for
        first = synthesize_case(seed, 0, shape, site_obj.name)
        spacing = "x".join(f"{s:g}" for s in settings["spacing_mm"])
        render_case(first.as_loaded_case(), preview, caption=f"{first.case_id}: phantom, seed {seed}, site "
                    f"{site_obj.name}, {'x'.join(map(str, shape))} voxels of {spacing} mm")
    return folders


def _write_manifest(out_dir, settings, num_cases):
    def write(path):
        with open(path, "w") as f:
            json.dump(dict(settings, num_cases=num_cases), f, indent=2)
            f.write("\n")
    atomic_write(os.path.join(out_dir, MANIFEST_NAME), write)


def _progress(items, enabled, unit):
    if not enabled:
        return items
    from tqdm import tqdm
    return tqdm(items, unit=unit, leave=False)
