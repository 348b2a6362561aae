"""The experiment presets (configs/experiments.py): each says what its name says, and
run_experiment's --scale / --config.x flags resolve to them (unknown keys refused)."""

import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from brats_tf.configs import baselines, experiments, train2d, train3d
from brats_tf.constants import TILE_SIZE_3D
from brats_tf.errors import ConfigError

from tests.conftest import REPO


def test_every_preset_says_what_its_name_says():
    paper, demo, tiny = (experiments.get_config(p) for p in ("paper", "demo", "tiny"))
    assert [c.scale for c in (paper, demo, tiny)] == ["paper", "demo", "tiny"]
    # [M]: the paper's 285 cases at full size and 70³ patches; the demo's 20 small phantoms, 54³.
    assert (paper.num_cases, paper.shape, paper.num_val, paper.pretrain_iterations) == (285, None, 5, 5000)
    assert round(paper.test_fraction * 285) == 50
    assert (demo.num_cases, demo.shape, demo.test_fraction, demo.num_val) == (20, (80, 80, 64), 0.3, 2)
    assert (tiny.num_cases, tiny.shape) == (8, (48, 48, 40))
    assert (paper.threed.model.input_size, demo.threed.model.input_size, tiny.threed.model.input_size) == (70, 54, 46)
    assert (paper.twod.train.iterations, paper.threed.train.iterations) == (20000, 20000)
    assert (demo.twod.train.iterations, demo.threed.train.iterations) == (90, 45)
    assert paper.twod.preset == paper.threed.preset == "paper" and demo.twod.preset == demo.threed.preset == "small"
    assert (paper.twod.optim.learning_rate, paper.threed.optim.learning_rate) == (0.25, 0.25)
    for c in (paper, demo, tiny):
        assert c.tile_size == c.threed.train.tile_size == TILE_SIZE_3D == 64
        assert c.twod.stage == "2d" and c.threed.stage == "3d"
        assert c.twod.train.strategy == c.threed.train.strategy == "off"
    # Each model section is its train2d / train3d preset with the scale's settings, nothing else.
    assert experiments.changes(demo.twod, train2d.get_config("small")) == {
        "deterministic": True, "optim.learning_rate": 0.05, "train.checkpoint_every": 30, "train.iterations": 90,
        "train.val_every": 30, "train.precise_bn_batches": 40}
    cpu = experiments.get_config("cpu")   # as its leave-one-out run was measured
    assert cpu.twod.optim.learning_rate == 0.1 and cpu.twod.train.precise_bn_batches is None
    assert experiments.changes(demo.threed, train3d.get_config("small")) == {
        "deterministic": True, "model.input_size": 54, "optim.accumulation_steps": 1, "optim.learning_rate": 0.05,
        "train.checkpoint_every": 15, "train.iterations": 45, "train.val_every": 0, "train.average_last": 15}
    assert cpu.threed.train.average_last is None
    assert experiments.changes(paper.twod, train2d.get_config("paper")) == {}
    assert experiments.changes(paper.threed, train3d.get_config("paper")) == {}
    # [S]: BraTS 222 / Rembrandt 57 cases (44 test, 11 train) at paper scale; the demo's phantoms.
    s = paper.shen
    assert (s.site_cases.a, s.site_cases.b, s.site_shapes.a, s.target_train, s.num_val) == (222, 57, None, 11, 5)
    assert round(s.test_fraction * 222) == 44 and s.transfer_iterations == 2000 and not s.fit_fifcn_volume
    assert (demo.shen.site_cases.a, demo.shen.site_shapes.b, demo.shen.transfer_iterations) == (24, (54, 54, 22), 100)
    assert demo.shen.fit_fifcn_volume and tiny.shen.fit_fifcn_volume
    for kind in baselines.MODELS:
        assert experiments.changes(paper.shen[kind], baselines.get_config(f"{kind}_paper")) == {}
        assert experiments.changes(demo.shen[kind], baselines.get_config(f"{kind}_demo")) == {}
        assert tiny.shen[kind].train.iterations == 2 and tiny.shen[kind].preset == f"{kind}_demo"
    with pytest.raises(ValueError, match="unknown preset"):
        experiments.get_config("huge")


def test_baseline_config_kinds_are_the_models():
    from brats_tf.models import baselines as baseline_models
    assert baselines.MODELS == baseline_models.KINDS


def _from_argv(*argv):
    """run_experiment's flags (--scale, --config) parsed from `argv`, resolved as its main does."""
    values = flags.FlagValues()
    flags.DEFINE_enum("scale", "demo", experiments.SCALES, "", flag_values=values)
    argv = ["run_experiment.py", *argv]
    config_flags.DEFINE_config_file("config", f"{experiments.__file__}:demo", flag_values=values, sys_argv=argv)
    values(argv)
    return experiments.from_flags(values["config"], values["scale"])


def test_scale_and_config_overrides_resolve_like_run_experiment():
    assert _from_argv().to_json() == experiments.get_config("demo").to_json()
    assert _from_argv("--scale=paper").to_json() == experiments.get_config("paper").to_json()
    c = _from_argv("--scale=paper", "--config.twod.train.iterations=30", "--config.threed.model.input_size=60",
                   "--config.threed.model.levels=(4, 6, 8)", "--config.shape=(40, 40, 32)",
                   "--config.shen.bcn.train.iterations=5")
    assert c.scale == "paper" and c.twod.model.preset == "paper" and c.num_cases == 285   # paper, overridden
    assert (c.twod.train.iterations, c.threed.model.input_size, c.threed.model.levels) == (30, 60, (4, 6, 8))
    assert c.shape == (40, 40, 32) and c.shen.bcn.train.iterations == 5 and c.shen.fcn.train.iterations == 20000
    named = _from_argv(f"--config={experiments.__file__}:tiny", "--config.num_cases=6")
    assert named.scale == "tiny" and named.num_cases == 6 and named.threed.model.input_size == 46
    with pytest.raises(ConfigError, match="disagree"):
        _from_argv("--scale=paper", f"--config={experiments.__file__}:demo")


def test_unknown_override_keys_are_refused_in_one_line():
    assert experiments.unknown_override(["x", "--config.twod.train.iterations=3", "--config.shen.site_cases.b",
                                         "--config_2d=model.kind=x"]) is None
    assert experiments.unknown_override(["x", "--config.twod.model.widths=3"]) == "twod.model.widths"
    assert experiments.unknown_override(["x", "--config.num_cases.x=3"]) == "num_cases.x"
    result = subprocess.run([sys.executable, "run_experiment.py", "--config.threed.model.widths=3"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip() == ("error: --config.threed.model.widths: no such field in the experiment config "
                                     "(brats_tf/configs/experiments.py)")
