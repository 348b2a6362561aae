"""Shared fixtures: tiny BraTS-layout cases written to a temp dir, and the ../shared/data location."""

import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Keep TensorFlow quiet in subprocesses the tests start.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def shared_data(*parts):
    """Path inside ../shared/data, or skip the test when that folder is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not available (../shared/data is absent in a user's clone)")
    return path


def tiny_volumes(shape=(24, 26, 20), seed=0, with_enhancing=True):
    """Four modality arrays and a BraTS 2017 label map (0/1/2/4): a sphere brain with a nested tumor."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), axis=-1)
    radius = np.linalg.norm(grid, axis=-1)
    brain = radius < 0.85
    tumor_r = np.linalg.norm(grid - np.array([0.25, 0.1, 0.0]), axis=-1)
    seg = np.zeros(shape, np.uint8)
    seg[(tumor_r < 0.45) & brain] = 2
    seg[tumor_r < 0.3] = 4 if with_enhancing else 1
    seg[tumor_r < 0.18] = 1
    images = {}
    for k, name in enumerate(("t1", "t1ce", "t2", "flair")):
        base = (100 + 20 * k) * brain + 30.0 * (seg > 0) * (k + 1)
        images[name] = (base * (1 + 0.05 * rng.standard_normal(shape)) * brain).astype(np.float32)
    return images, seg


def write_brats2017_case(root, case_id, shape=(24, 26, 20), seed=0, affine=None, with_enhancing=True):
    """Writes <root>/<case_id>/<case_id>_{t1,t1ce,t2,flair,seg}.nii.gz; returns the case folder."""
    folder = Path(root) / case_id
    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) if affine is None else affine
    images, seg = tiny_volumes(shape, seed, with_enhancing)
    for name, data in images.items():
        nib.save(nib.Nifti1Image(data, affine), folder / f"{case_id}_{name}.nii.gz")
    nib.save(nib.Nifti1Image(seg, affine), folder / f"{case_id}_seg.nii.gz")
    return folder


@pytest.fixture
def tiny_dataset(tmp_path):
    """Three tiny BraTS 2017-layout cases; the third has no enhancing tumor."""
    root = tmp_path / "data"
    for i in range(3):
        write_brats2017_case(root, f"Case_{i:03d}", seed=i, with_enhancing=i != 2)
    return root


def run_module(module, *args, cwd=REPO):
    """Runs `python -m module args` the way a user would; returns CompletedProcess."""
    import subprocess
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
