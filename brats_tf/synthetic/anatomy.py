"""Phantom anatomy, tumor and image rendering for `brats_tf.synthetic.generator` (METHOD §10).

Tissue classes and their contrasts, smooth random fields (B-spline), the random parameters
of a case, the head (cortex, ventricles, deep grey nuclei, vessels, look-alikes), the nested
tumor with mass effect, and the rendering of the four modalities with blur, bias and noise.
Everything is in millimetres; `synthetic.synthesize_case` puts the pieces together.
"""

import numpy as np
from scipy import ndimage

from brats_tf.constants import MODALITIES

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

def draw_parameters(rng, site, spacing):
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

def pose_box(p, axes_mm, spacing, low, high, margin_mm):
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


class Head:
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
        return pose_box(self.p, self.axes, self.spacing, low, high, self.MARGIN_MM)

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


def paint_cortex(head, fields, p):
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


def paint_deep_structures(head, fields, p):
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


def paint_vessels(head, fields, r, max_spacing):
    """Vessels in the sulci (where the zero sets of two random fields cross: curves)
    and the superior sagittal sinus; both bright in T1c like enhancing tumor."""
    lr, _, si = head.coords
    tube = 0.06 * max(1.0, max_spacing / 1.5)
    vessels = np.all(np.abs(fields["vessels"]) < tube, axis=0) & (r > 0.78)
    head.tissue[vessels & np.isin(head.tissue, (T["csf"], T["gm"]))] = T["vessel"]
    head.tissue[(r < 1) & (r > 0.95) & (si > 15) & (np.abs(lr) < 3.5)] = T["vessel"]


def mass_effect(coords, center, radius, strength):
    """Anatomy pushed away from the tumor: a voxel near the tumor shows the tissue that
    was closer to its centre (a smooth, fold-free radial compression)."""
    offsets = [c - np.float32(c0) for c, c0 in zip(coords, center)]
    dist2 = sum(o * o for o in offsets)
    shrink = 1 - np.float32(strength) * np.exp(-dist2 / np.float32(2 * radius ** 2))
    return [np.float32(c0) + o * shrink for c0, o in zip(center, offsets)], dist2


# ---------------------------------------------------------------- tumor

def tumor_radii(p, spacing):
    """Edema and core radii (mm) for the drawn whole-tumor fraction of the brain; never
    so small that the rim or the necrosis falls between voxels of this grid."""
    brain_mm3 = 1.3e6 * float(np.prod(p["head_scale"]))
    edema = (3 * p["wt_fraction"] * brain_mm3 / (4 * np.pi)) ** (1 / 3)
    core = max(edema * p["core_fraction"], p["rim_mm"] + 1.5 * max(spacing))
    return max(edema, core / 0.8), core


def tumor_box(dist2, reach):
    inside = dist2 < reach ** 2
    box = []
    for axis in range(3):
        hits = np.nonzero(np.any(inside, axis=tuple(a for a in range(3) if a != axis)))[0]
        box.append(slice(int(hits[0]), int(hits[-1]) + 1) if hits.size else slice(0, 0))
    return tuple(box)


def add_tumor(tissue, coords, box, axes_mm, fields, p, spacing, low_grade):
    """Writes the tumor into `tissue` (inside `box`); returns the edema contrast weight."""
    edema_r, core_r = tumor_radii(p, spacing)
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

def render_images(tissue, tumor, axes_mm, spacing, fields, p, site, rng):
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


def draw_fields(rng, fov):
    """Smooth random fields, always drawn in the same order (cell sizes in mm)."""
    cells = (("outline", 30, 1), ("gyri", 5, 1), ("vessels", 16, 2), ("lesion", 4, 1),
             ("core", 9, 1), ("edema", 7, 1), ("split", 5, 1), ("rim", 6, 1), ("texture", 4, 1),
             ("displacement", 45, 3), ("bias", 60, 5))
    return {name: SmoothField(rng, fov, cell, channels) for name, cell, channels in cells}


