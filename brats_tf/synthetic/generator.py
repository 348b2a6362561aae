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

from brats_tf.constants import MODALITIES
from brats_tf.errors import ConfigError
from brats_tf.io.cases import LoadedCase
from brats_tf.io.files import write_text
from brats_tf.io.labels import to_output_convention
from brats_tf.io.nifti import Geometry, save_volume
from brats_tf.synthetic.anatomy import (HEAD_EXTENT_MM, TISSUE_LABELS, Head, T, add_tumor, draw_fields,
                                      draw_parameters, mass_effect, paint_cortex, paint_deep_structures,
                                      paint_vessels, pose_box, render_images, tumor_box, tumor_radii,
                                      voxel_axes_mm)

GENERATOR_VERSION = 1
MANIFEST_NAME = "synthetic_dataset.json"
FILE_SUFFIXES = {"t1": "t1", "t1c": "t1ce", "t2": "t2", "flair": "flair"}  # BraTS 2017 names

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
        return to_output_convention(self.label, "brats2017")

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
    p = draw_parameters(rng, site, spacing)
    fields = draw_fields(rng, site.fov_mm)
    low_grade = is_low_grade(seed, index, site.name)
    # Work only inside the box that can hold the head; paste into the full grid at the end.
    full_axes = voxel_axes_mm(shape, spacing)
    head_box = pose_box(p, full_axes, spacing, HEAD_EXTENT_MM[0], HEAD_EXTENT_MM[1], Head.MARGIN_MM)
    axes_mm = [a[s] for a, s in zip(full_axes, head_box)]
    head = Head(axes_mm, spacing, p, fields["displacement"].sample(axes_mm))
    edema_r, _ = tumor_radii(p, spacing)
    tumor_coords = head.coords
    head.coords, dist2 = mass_effect(tumor_coords, p["tumor_center"], 0.8 * edema_r, p["mass_effect"])
    sampled = {k: fields[k].sample(axes_mm) for k in ("outline", "gyri", "vessels")}
    sampled["lesion"] = fields["lesion"]
    r = paint_cortex(head, sampled, p)
    paint_deep_structures(head, sampled, p)
    paint_vessels(head, sampled, r, max(spacing))
    tissue = head.tissue
    del head, sampled, r
    reach = edema_r * (1 + 2.5 * p["irregularity"][1]) * 1.4 + p["edema_margin_mm"] + 2 * max(spacing)
    box = tumor_box(dist2, reach)
    under, weight = add_tumor(tissue, tumor_coords, box, axes_mm, fields, p, spacing, low_grade)
    del tumor_coords, dist2
    local_images = render_images(tissue, (box, under, weight), axes_mm, spacing, fields, p, site, rng)
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
        from brats_tf.synthetic.preview import render_case   # matplotlib only when a picture is asked for
        first = synthesize_case(seed, 0, shape, site_obj.name)
        spacing = "x".join(f"{s:g}" for s in settings["spacing_mm"])
        render_case(first.as_loaded_case(), preview, caption=f"{first.case_id}: phantom, seed {seed}, site "
                    f"{site_obj.name}, {'x'.join(map(str, shape))} voxels of {spacing} mm")
    return folders


def _write_manifest(out_dir, settings, num_cases):
    write_text(os.path.join(out_dir, MANIFEST_NAME), json.dumps(dict(settings, num_cases=num_cases), indent=2) + "\n")


def _progress(items, enabled, unit):
    if not enabled:
        return items
    from tqdm import tqdm
    return tqdm(items, unit=unit, leave=False)
