"""Every model family builds exactly the kinds its table lists and refuses any other with a
one-line ConfigError naming the known kinds (no family falls back to a default kind)."""

import pytest

from brats_tf.errors import ConfigError
from brats_tf.models import baselines, unet2d, unet3d


@pytest.mark.parametrize("build, known", [
    (lambda kind: unet3d.build_3d_model(kind, 4, 12), unet3d.KINDS),
    (lambda kind: unet2d.build_2d_model(kind, ("t1", "flair")), unet2d.KINDS),
    (lambda kind: baselines.build_baseline(baselines.BaselineSpec(kind)), baselines.KINDS),
])
@pytest.mark.parametrize("unknown", ["D", "unet", "", "a"])
def test_unknown_kinds_are_refused_with_the_known_ones(build, known, unknown):
    with pytest.raises(ConfigError) as error:
        build(unknown)
    message = str(error.value)
    assert repr(unknown) in message and all(kind in message for kind in known)
    assert "\n" not in message


def test_the_tables_are_the_kinds():
    assert unet3d.KINDS == ("standard", "A", "B", "C")
    assert unet2d.KINDS == ("model1", "model2", "unet_axial")
    assert baselines.KINDS == ("bcn", "fcn", "fifcn")
    assert set(unet3d.STREAMS) == set(unet3d.KINDS) and set(unet2d.BUILDERS) == set(unet2d.KINDS)
