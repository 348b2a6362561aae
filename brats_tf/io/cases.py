"""Finding cases on disk in every supported layout, and loading them with validation.

`discover_cases` returns `Case` records (file locations only, sorted by case id);
`load_case` reads one into arrays in the internal label convention, checking that its
files agree in shape and geometry.
"""

import fnmatch
import glob
import os
from dataclasses import dataclass, field

import numpy as np

from brats_tf.constants import MODALITIES
from brats_tf.errors import ConfigError, DataError
from brats_tf.io import layouts as layouts_lib
from brats_tf.io.labels import map_labels
from brats_tf.io.nifti import load_volume

LAYOUT_CHOICES = ("auto", "brats2017", "brats2023", "msd")


@dataclass(frozen=True)
class Source:
    """One image on disk; `channel` selects a volume of a 4D file (MSD)."""
    path: str
    channel: int = None


@dataclass(frozen=True)
class Case:
    case_id: str
    layout: str
    images: dict                 # modality -> Source, canonical order
    missing: dict                # modality -> expected path (layout lists it, file absent)
    label: Source = None
    mask: Source = None
    label_map: dict = field(default_factory=dict)
    normalization: str = None    # the layout's recommended normalization, if any

    @property
    def modalities(self):
        return tuple(self.images)


@dataclass
class LoadedCase:
    case_id: str
    image: np.ndarray            # (X, Y, Z, K) float32, channels in `modalities` order
    modalities: tuple
    geometry: object             # io.nifti.Geometry of the first modality
    label: np.ndarray = None     # (X, Y, Z) uint8, internal convention
    mask: np.ndarray = None      # (X, Y, Z) bool brain mask from a mask file
    paths: tuple = ()            # the file of each channel, for errors about one sequence


def requested_modalities(requested):
    """The sequences a `--modalities` flag names, in canonical order; an unknown name is a
    ConfigError."""
    unknown = [m for m in requested if m not in MODALITIES]
    if unknown:
        raise ConfigError(f"unknown modalities {unknown}; use {list(MODALITIES)}")
    return [m for m in MODALITIES if m in requested]


def discover_cases(data_dir, layout="auto", layout_file=None):
    """Lists the cases of a dataset folder (or a single case folder), sorted by case id."""
    data_dir = os.path.abspath(os.fspath(data_dir))
    if not os.path.isdir(data_dir):
        raise DataError(data_dir, "data directory not found")
    if not os.listdir(data_dir):
        raise DataError(data_dir, "empty folder: no cases")
    if layout_file:
        spec = layouts_lib.load_layout_file(layout_file)
    else:
        if layout not in LAYOUT_CHOICES:
            raise DataError(data_dir, f"unknown layout {layout!r}; use one of {LAYOUT_CHOICES}")
        if layout == "auto":
            layout = detect_layout(data_dir)
        if layout == "msd":
            return _discover_msd(data_dir)
        spec = layouts_lib.BUILTIN_LAYOUTS[layout]
    cases = [_case_from_folder(folder, spec) for folder in _case_folders(data_dir, spec)]
    if not cases:
        raise DataError(data_dir, f"no cases found for layout {spec.name}")
    return sorted(cases, key=lambda c: c.case_id)


def detect_layout(data_dir):
    """Guesses the layout from file names; raises DataError when nothing matches."""
    if os.path.isdir(os.path.join(data_dir, "imagesTr")) or os.path.isdir(os.path.join(data_dir, "imagesTs")):
        return "msd"
    candidates = [data_dir] + [os.path.join(data_dir, d) for d in sorted(os.listdir(data_dir))
                               if os.path.isdir(os.path.join(data_dir, d))][:20]
    for folder in candidates:
        names = os.listdir(folder)
        if any(n.endswith(("_flair.nii.gz", "_flair.nii", "_t1ce.nii.gz", "_t1ce.nii")) for n in names):
            return "brats2017"
        if any(n.endswith(("-t2f.nii.gz", "-t1n.nii.gz", "-t2f.nii", "-t1n.nii")) for n in names):
            return "brats2023"
    raise DataError(data_dir, "cannot detect the dataset layout (no BraTS 2017/2023 or MSD file names); "
                              "pass --layout or --layout_file")


def _case_folders(data_dir, spec):
    """A folder whose own files match the layout is one case; else each sub-folder holding NIfTI files."""
    if _matches_any(data_dir, spec):
        return [data_dir]
    folders = []
    for name in sorted(os.listdir(data_dir)):
        path = os.path.join(data_dir, name)
        if name.startswith(".") or not os.path.isdir(path):
            continue
        if any(f.endswith((".nii", ".nii.gz")) for f in os.listdir(path)):
            folders.append(path)
    return folders


def _matches_any(folder, spec):
    case_id = os.path.basename(folder)
    return any(_resolve(folder, case_id, patterns, modality) for modality, patterns in spec.modalities.items())


def _resolve(folder, case_id, patterns, what):
    """Path of the one file the patterns name; None when none does. File names compare
    case-insensitively and every pattern is tried, so two files of one sequence
    (`_flair.nii.gz` beside `_flair.nii` or `_FLAIR.nii.gz`) are refused, never chosen among."""
    found = []
    for pattern in patterns:
        head, tail = os.path.split(pattern.replace("{id}", glob.escape(case_id)))
        directories = glob.glob(os.path.join(glob.escape(folder), head)) if head else [folder]
        for directory in filter(os.path.isdir, directories):
            found += [os.path.join(directory, name) for name in sorted(os.listdir(directory))
                      if fnmatch.fnmatchcase(name.lower(), tail.lower())
                      and (tail.startswith(".") or not name.startswith("."))]
    found = list(dict.fromkeys(found))
    if len(found) > 1:
        names = ", ".join(os.path.relpath(path, folder) for path in found)
        raise DataError(folder, f"{len(found)} {what} files ({names}); keep one")
    return found[0] if found else None


def _case_from_folder(folder, spec):
    case_id = os.path.basename(folder)
    images, missing = {}, {}
    for modality, patterns in spec.modalities.items():
        path = _resolve(folder, case_id, patterns, modality)
        if path:
            images[modality] = Source(path)
        else:
            missing[modality] = os.path.join(folder, patterns[0].replace("{id}", case_id))
    label = _resolve(folder, case_id, spec.label, "label") if spec.label else None
    mask = _resolve(folder, case_id, spec.mask, "brain mask") if spec.mask else None
    if spec.mask and mask is None:
        raise DataError(os.path.join(folder, spec.mask[0]), "brain mask file named by the layout is missing")
    return Case(case_id, spec.name, images, missing,
                label=Source(label) if label else None, mask=Source(mask) if mask else None,
                label_map=dict(spec.label_map), normalization=spec.normalization)


def _discover_msd(data_dir):
    from brats_tf.constants import LABEL_MAPS
    cases = []
    for split in ("imagesTr", "imagesTs"):
        image_dir = os.path.join(data_dir, split)
        if not os.path.isdir(image_dir):
            continue
        for name in sorted(os.listdir(image_dir)):
            if name.startswith(".") or not name.endswith((".nii.gz", ".nii")):
                continue
            path = os.path.join(image_dir, name)
            case_id = name.split(".nii")[0]
            images = {m: Source(path, layouts_lib.MSD_CHANNELS[m]) for m in MODALITIES}
            label_path = os.path.join(data_dir, split.replace("images", "labels"), name)
            label = Source(label_path) if os.path.isfile(label_path) else None
            cases.append(Case(case_id, "msd", images, {}, label=label, label_map=dict(LABEL_MAPS["msd"])))
    if not cases:
        raise DataError(data_dir, "no cases found for layout msd (imagesTr/ is empty)")
    return cases


def load_case(case, modalities=None, with_label=True):
    """Reads a case: image channels in the order of `modalities` (default: all it has).

    Raises DataError naming the file for a missing requested modality, unreadable or
    non-finite data, a shape or affine that disagrees with the first modality, and
    label values outside the layout's label map.
    """
    modalities = tuple(modalities or case.modalities)
    for modality in modalities:
        if modality not in case.images:
            where = case.missing.get(modality, f"{case.case_id} ({case.layout})")
            raise DataError(where, f"missing {modality} image for case {case.case_id}")
    channels, geometry, cache = [], None, {}
    for modality in modalities:
        source = case.images[modality]
        data, geo = _read(source, cache)
        geometry = geometry or (geo, source.path)
        _check_same_grid(source.path, geo, *geometry)
        channels.append(data)
    image = np.stack(channels, axis=-1)
    label = mask = None
    if with_label and case.label is not None:
        raw, geo = load_volume(case.label.path)
        _check_same_grid(case.label.path, geo, *geometry)
        label = map_labels(raw, case.label_map, case.label.path)
    if case.mask is not None:
        raw, geo = load_volume(case.mask.path)
        _check_same_grid(case.mask.path, geo, *geometry)
        mask = raw > 0.5
    return LoadedCase(case.case_id, image, modalities, geometry[0], label=label, mask=mask,
                      paths=tuple(case.images[m].path for m in modalities))


def _read(source, cache):
    """Reads one modality; a 4D file (MSD) is read once per case and sliced."""
    if source.channel is None:
        return load_volume(source.path)
    if source.path not in cache:
        cache[source.path] = load_volume(source.path, allow_4d=True)
    data, geo = cache[source.path]
    if data.ndim != 4 or source.channel >= data.shape[3]:
        raise DataError(source.path, f"expected a 4D image with at least {source.channel + 1} channels, "
                                     f"found shape {data.shape}")
    return data[..., source.channel], geo


def _check_same_grid(path, geo, ref_geo, ref_path):
    if geo.shape != ref_geo.shape:
        raise DataError(path, f"shape {geo.shape} differs from {os.path.basename(ref_path)} {ref_geo.shape}")
    if not np.allclose(geo.affine, ref_geo.affine, atol=1e-3):
        raise DataError(path, f"affine differs from {os.path.basename(ref_path)}")

