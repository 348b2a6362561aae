"""Tests for the phantom generator (brats_tf.synthetic.generator), its montage (brats_tf.synthetic.preview)
and its command line (data_prep.synthesize)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brats_tf.synthetic import anatomy as phantom_anatomy
from brats_tf.synthetic import preview
from brats_tf.synthetic import generator as synthetic
from brats_tf.errors import ConfigError
from brats_tf.io.cases import discover_cases, load_case

REPO = Path(__file__).resolve().parents[1]
SMALL = (48, 48, 40)          # 5 x 5 x 3.9 mm voxels: coarse, but every class is visible


@pytest.fixture(scope="module")
def small_cases():
    """Twenty site-a phantoms at the small test shape (made once per module)."""
    return [synthetic.synthesize_case(11, i, SMALL) for i in range(20)]


def _tissue_median(phantom, modality, tissue):
    mask = phantom.tissue == synthetic.T[tissue]
    return float(np.median(phantom.images[modality][mask].astype(np.float64)))


def _dice(a, b):
    total = a.sum() + b.sum()
    return 2.0 * np.logical_and(a, b).sum() / total if total else 1.0


# ---------------------------------------------------------------- determinism

def test_same_seed_gives_identical_arrays():
    a = synthetic.synthesize_case(7, 3, (40, 40, 32))
    b = synthetic.synthesize_case(7, 3, (40, 40, 32))
    for m in synthetic.MODALITIES:
        assert a.images[m].dtype == np.int16
        np.testing.assert_array_equal(a.images[m], b.images[m])
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(a.affine, b.affine)


def test_other_seed_or_index_gives_another_case():
    base = synthetic.synthesize_case(7, 3, (40, 40, 32))
    for other in (synthetic.synthesize_case(8, 3, (40, 40, 32)), synthetic.synthesize_case(7, 4, (40, 40, 32))):
        assert not np.array_equal(base.label, other.label)
        assert not np.array_equal(base.images["flair"], other.images["flair"])


def test_growing_a_dataset_keeps_its_first_cases(tmp_path):
    synthetic.write_dataset(tmp_path / "two", 2, seed=5, shape=(32, 32, 24), progress=False)
    synthetic.write_dataset(tmp_path / "three", 3, seed=5, shape=(32, 32, 24), progress=False)
    for i in range(2):
        for suffix in ("t1", "t1ce", "t2", "flair", "seg"):
            name = f"Synth_a_{i:04d}/Synth_a_{i:04d}_{suffix}.nii.gz"
            a = np.asarray(nib.load(tmp_path / "two" / name).dataobj)
            b = np.asarray(nib.load(tmp_path / "three" / name).dataobj)
            np.testing.assert_array_equal(a, b)


def test_low_grade_cases_are_spread_evenly_over_indices():
    flags = np.array([synthetic.is_low_grade(3, i) for i in range(400)])
    assert 0.12 <= flags.mean() <= 0.18
    windows = np.convolve(flags, np.ones(20), mode="valid")      # every run of 20 cases
    assert windows.min() >= 1 and windows.max() <= 4


# ---------------------------------------------------------------- files on disk

def test_written_cases_load_with_the_brats2017_reader(tmp_path):
    folders = synthetic.write_dataset(tmp_path, 3, seed=2, shape=SMALL, progress=False)
    assert [os.path.basename(f) for f in folders] == ["Synth_a_0000", "Synth_a_0001", "Synth_a_0002"]
    cases = discover_cases(tmp_path, layout="auto")
    assert [c.case_id for c in cases] == ["Synth_a_0000", "Synth_a_0001", "Synth_a_0002"]
    assert all(c.layout == "brats2017" for c in cases)
    phantom = synthetic.synthesize_case(2, 1, SMALL)
    loaded = load_case(cases[1])
    assert loaded.image.shape == SMALL + (4,)
    for k, m in enumerate(loaded.modalities):
        np.testing.assert_array_equal(loaded.image[..., k], phantom.images[m].astype(np.float32))
    np.testing.assert_array_equal(loaded.label, phantom.label)
    seg = nib.load(Path(folders[1]) / "Synth_a_0001_seg.nii.gz")
    assert seg.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(seg.dataobj)).tolist()) == {0, 1, 2, 4}
    assert nib.load(Path(folders[1]) / "Synth_a_0001_t1.nii.gz").get_data_dtype() == np.int16
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]   # no temporary folders left


def test_affine_encodes_spacing_and_lps_orientation_like_real_brats():
    phantom = synthetic.synthesize_case(0, 0, (60, 60, 31))
    assert nib.aff2axcodes(phantom.affine) == ("L", "P", "S")
    np.testing.assert_allclose(phantom.geometry.spacing, (4.0, 4.0, 5.0))
    np.testing.assert_allclose(np.abs(np.diag(phantom.affine)[:3]), (4.0, 4.0, 5.0))
    full = synthetic.case_geometry((240, 240, 155), "a")
    expected = np.array([[-1, 0, 0, 0], [0, -1, 0, 239], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    np.testing.assert_allclose(full.affine, expected)    # the affine of the real BraTS cases


def test_site_b_default_matrix_spacing_and_contrast():
    b = synthetic.synthesize_case(4, 0, site="b")
    assert b.case_id == "Synth_b_0000"
    assert b.images["t1"].shape == (160, 160, 53)
    np.testing.assert_allclose(b.geometry.spacing, (1.5, 1.5, 3.0))
    a = synthetic.synthesize_case(4, 0, (160, 160, 53), site="a")
    gm_wm = {site: _tissue_median(p, "t1", "gm") / _tissue_median(p, "t1", "wm") for site, p in (("a", a), ("b", b))}
    assert gm_wm["b"] > gm_wm["a"] + 0.05           # flatter T1 grey/white contrast at site b


def test_interrupted_case_write_leaves_nothing_behind(tmp_path):
    (tmp_path / "Synth_a_0000").write_text("in the way")    # the final rename must fail
    with pytest.raises(OSError):
        synthetic.write_case(synthetic.synthesize_case(0, 0, (32, 32, 24)), tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["Synth_a_0000"]


def test_a_dataset_grows_in_place(tmp_path):
    synthetic.write_dataset(tmp_path, 1, seed=1, shape=(32, 32, 24), progress=False)
    first = tmp_path / "Synth_a_0000" / "Synth_a_0000_t1.nii.gz"
    stamp = first.stat().st_mtime_ns
    synthetic.write_dataset(tmp_path, 2, seed=1, shape=(32, 32, 24), progress=False)
    assert first.stat().st_mtime_ns == stamp                  # kept, not rewritten
    assert (tmp_path / "Synth_a_0001" / "Synth_a_0001_seg.nii.gz").is_file()
    manifest = json.loads((tmp_path / synthetic.MANIFEST_NAME).read_text())
    assert manifest["num_cases"] == 2 and manifest["seed"] == 1 and manifest["shape"] == [32, 32, 24]


def test_a_foreign_case_folder_is_refused(tmp_path):
    (tmp_path / "Synth_a_0000").mkdir()
    with pytest.raises(ConfigError, match="not written by this generator"):
        synthetic.write_dataset(tmp_path, 1, seed=1, shape=(32, 32, 24), progress=False)


def test_folder_with_other_settings_is_refused(tmp_path):
    synthetic.write_dataset(tmp_path, 1, seed=1, shape=(32, 32, 24), progress=False)
    with pytest.raises(ConfigError, match="seed=1"):
        synthetic.write_dataset(tmp_path, 1, seed=2, shape=(32, 32, 24), progress=False)


@pytest.mark.parametrize("text", ["12,a", "96,96", "8,8,8", "96,96,72,4", "-1,2,3"])
def test_bad_shapes_are_config_errors(text):
    with pytest.raises(ConfigError, match="--shape"):
        synthetic.parse_shape(text)


def test_shape_parsing():
    assert synthetic.parse_shape("96,96,72") == (96, 96, 72)
    assert synthetic.parse_shape("96x96x72") == (96, 96, 72)
    assert synthetic.parse_shape(None) is None


# ---------------------------------------------------------------- content

def test_class_balance_and_low_grade_cases(small_cases):
    classes = [set(np.unique(p.label).tolist()) for p in small_cases]
    assert sum(c == {0, 1, 2, 3} for c in classes) >= 16             # >= 80 % have every class
    no_enhancement = [c for c in classes if 3 not in c]
    assert len(no_enhancement) >= 1
    assert all({1, 2} <= c for c in no_enhancement)                 # still edema and core
    for p in small_cases:
        assert (3 not in np.unique(p.label)) == p.info["low_grade"]


def test_tumor_size_and_position(small_cases):
    fractions = [np.count_nonzero(p.label) / np.count_nonzero(p.tissue) for p in small_cases]
    assert 0.005 <= min(fractions) and max(fractions) <= 0.10
    assert max(fractions) / min(fractions) > 2                      # sizes vary
    centres = [np.argwhere(p.label > 0).mean(0) for p in small_cases]
    assert np.std(centres, axis=0).min() > 2                        # locations vary (voxels)
    for p in small_cases:
        tumor = p.label > 0
        assert np.all(p.tissue[tumor] > 0)                          # inside the brain
        for m in synthetic.MODALITIES:
            assert np.all(p.images[m][tumor] > 0)
            assert np.all(p.images[m][p.tissue == 0] == 0)          # skull-stripped background


def test_edema_surrounds_the_core(small_cases):
    from scipy import ndimage
    for p in small_cases:
        core = np.isin(p.label, (1, 3))
        shell = ndimage.binary_dilation(core) & ~core
        assert np.mean(p.label[shell] == 2) > 0.5


def test_tissue_contrasts_follow_real_mri():
    p = synthetic.synthesize_case(1, 0, (120, 120, 78))
    med = {(m, t): _tissue_median(p, m, t) / _tissue_median(p, m, "wm")
           for m in synthetic.MODALITIES for t in ("gm", "csf", "edema")}
    assert med["t1", "csf"] < med["t1", "gm"] < 1                   # T1: CSF < GM < WM
    assert med["flair", "csf"] < med["flair", "gm"] < 1             # FLAIR: CSF suppressed
    assert med["t2", "csf"] > 2 and med["t2", "gm"] > 1             # T2: CSF brightest
    assert med["flair", "edema"] > 1.2 and med["t2", "edema"] > 1.2  # edema bright in T2/FLAIR


def test_healthy_look_alikes_match_tumor_intensities(small_cases):
    """Long-range context: periventricular caps / lesions look like edema in FLAIR, and
    choroid plexus / vessels look like enhancement in T1c."""
    with_caps = [p for p in small_cases if np.any(p.tissue == synthetic.T["pv_cap"])]
    assert len(with_caps) >= 15
    for p in with_caps[:5]:
        ratio = _tissue_median(p, "flair", "pv_cap") / _tissue_median(p, "flair", "edema")
        assert 0.75 < ratio < 1.35
    hgg = [p for p in small_cases if not p.info["low_grade"]][:5]
    for p in hgg:
        bright = np.isin(p.tissue, (synthetic.T["vessel"], synthetic.T["choroid"]))
        assert bright.any()
        ratio = np.median(p.images["t1c"][bright]) / _tissue_median(p, "t1c", "enhancing")
        assert 0.7 < ratio < 1.5


def test_a_single_intensity_threshold_does_not_solve_whole_tumor(small_cases):
    """The best per-case FLAIR / T2 threshold (an oracle) stays well below a trained model."""
    best = []
    for p in small_cases[:8]:
        brain, wt = p.tissue > 0, p.label > 0
        scores = []
        for m in ("flair", "t2"):
            values = p.images[m][brain].astype(np.float64)
            for q in np.quantile(values, np.linspace(0.5, 0.995, 100)):
                scores.append(_dice(values > q, wt[brain]))
        best.append(max(scores))
    assert np.mean(best) < 0.85


# ---------------------------------------------------------------- smooth fields

def test_smooth_field_matches_a_direct_bspline_evaluation():
    rng = np.random.default_rng(0)
    field = phantom_anatomy.SmoothField(rng, (40.0, 30.0, 20.0), 6.0)
    axes = [np.array([-13.0, 0.5, 17.2]), np.array([-9.1, 3.3]), np.array([-7.7, 0.0, 8.8])]
    got = field.sample(axes)

    def b3(t):                       # the cubic B-spline kernel, written out
        t = abs(t)
        return 2 / 3 - t ** 2 + t ** 3 / 2 if t < 1 else ((2 - t) ** 3 / 6 if t < 2 else 0.0)
    nodes = field.nodes[0].astype(np.float64)
    for i, x in enumerate(axes[0]):
        for j, y in enumerate(axes[1]):
            for k, z in enumerate(axes[2]):
                u = [c / field.cell + (n - 1) / 2 for c, n in zip((x, y, z), field.counts)]
                want = sum(nodes[a, b, c] * b3(u[0] - a) * b3(u[1] - b) * b3(u[2] - c)
                           for a in range(nodes.shape[0]) for b in range(nodes.shape[1])
                           for c in range(nodes.shape[2]))
                assert got[i, j, k] == pytest.approx(want, abs=1e-4)


def test_smooth_field_is_the_same_on_any_grid_and_about_unit_std():
    field = phantom_anatomy.SmoothField(np.random.default_rng(1), (240.0, 240.0, 155.0), 10.0)
    fine = field.sample(synthetic.voxel_axes_mm((120, 120, 60), (2.0, 2.0, 2.5)))
    coarse = field.sample(synthetic.voxel_axes_mm((40, 40, 20), (6.0, 6.0, 7.5)))
    # Every coarse voxel centre is the middle one of three fine voxel centres.
    np.testing.assert_allclose(fine[1::3, 1::3, 1::3], coarse, atol=1e-5)
    assert 0.7 < fine.std() < 1.3


# ---------------------------------------------------------------- preview

def test_orient_slice_is_radiological():
    vol = np.zeros((4, 5, 6))
    vol[3, 0, 5] = 1                 # patient's far left, most anterior, most superior
    axial = preview.orient_slice(vol, "axial", 5)
    assert axial.shape == (5, 4) and axial[0, 3] == 1                # anterior top, left on the right
    coronal = preview.orient_slice(vol, "coronal", 0)
    assert coronal.shape == (6, 4) and coronal[0, 3] == 1            # superior on top
    sagittal = preview.orient_slice(vol, "sagittal", 3)
    assert sagittal.shape == (6, 5) and sagittal[0, 0] == 1          # anterior on the left


def test_render_case_writes_a_png(tmp_path):
    phantom = synthetic.synthesize_case(0, 1, SMALL)
    path = preview.render_case(phantom.as_loaded_case(), str(tmp_path / "p.png"))
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert preview.tumor_center(phantom.label, phantom.tissue > 0) == tuple(
        int(round(c)) for c in np.argwhere(phantom.label > 0).mean(0))


def test_render_cases_accepts_real_like_cases_with_a_mask(tmp_path):
    """Two modalities, z-scored data whose background is negative, a brain mask: like
    the BraTS 2013 samples. Blocks of different cases go into one picture."""
    from brats_tf.io.cases import LoadedCase
    phantom = synthetic.synthesize_case(0, 2, SMALL)
    brain = phantom.tissue > 0
    image = np.stack([phantom.images[m].astype(np.float32) for m in ("t1c", "flair")], -1)
    image = np.where(brain[..., None], image / image[brain].mean(0) - 1, -3.0)
    zscored = LoadedCase("z", image, ("t1c", "flair"), phantom.geometry, label=phantom.label, mask=brain)
    unlabeled = LoadedCase("u", image[::-1], ("t1c", "flair"), None)
    path = preview.render_cases([zscored, unlabeled], str(tmp_path / "two.png"), caption="two cases")
    assert Path(path).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="same number of modalities"):
        preview.render_cases([zscored, phantom.as_loaded_case()], str(tmp_path / "bad.png"))


# ---------------------------------------------------------------- command line

def _cli(*args):
    return subprocess.run([sys.executable, "-m", "data_prep.synthesize", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_cli_writes_cases_and_a_preview(tmp_path):
    out = tmp_path / "data"
    result = _cli("--out_dir", str(out), "--num_cases", "2", "--seed", "4", "--shape", "40,40,32",
                  "--preview", str(tmp_path / "preview.png"))
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == ["Synth_a_0000", "Synth_a_0001", synthetic.MANIFEST_NAME]
    assert (tmp_path / "preview.png").read_bytes()[:4] == b"\x89PNG"
    phantom = synthetic.synthesize_case(4, 1, (40, 40, 32))
    on_disk = np.asarray(nib.load(out / "Synth_a_0001" / "Synth_a_0001_flair.nii.gz").dataobj)
    np.testing.assert_array_equal(on_disk, phantom.images["flair"])


@pytest.mark.parametrize("args", [["--shape", "12,a"], ["--site", "c"], ["--num_cases", "0"],
                                  ["--num_cases", "abc"], []])
def test_cli_bad_flags_fail_in_one_line(tmp_path, args):
    if args:
        args = ["--out_dir", str(tmp_path / "d")] + args
    result = _cli(*args)
    assert result.returncode != 0
    lines = [l for l in result.stderr.splitlines() if l.strip() and "oneDNN" not in l]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and lines[0].startswith("error:")
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())
