"""inference/heap.py: inside `reused_heap`, freed large arrays are reused instead of being
page-faulted in again."""

import resource

import numpy as np
import pytest

from brats_tf.inference import heap

pytestmark = pytest.mark.skipif(heap._LIBC is None, reason="glibc only")


def _faults_of_touching_a_fresh_array(megabytes=64):
    """Minor page faults of filling a new array after an equal one was freed."""
    np.ones(megabytes * 2 ** 20, np.uint8)   # allocated, touched, freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    np.ones(megabytes * 2 ** 20, np.uint8)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_freed_arrays_are_reused_inside_the_scope_and_given_back_after():
    outside = _faults_of_touching_a_fresh_array()
    with heap.reused_heap():
        with heap.reused_heap():   # nested scopes (models inside a segment run) are one scope
            inside = _faults_of_touching_a_fresh_array()
        assert heap._depth == 1
    after = _faults_of_touching_a_fresh_array()
    assert heap._depth == 0
    assert inside * 4 < outside, (inside, outside)
    assert after * 4 > outside, (after, outside)   # glibc's defaults are back: fresh pages again
