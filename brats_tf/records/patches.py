"""3D patches from whole cropped cases: class-aware (every class in every batch when the
data allow) or tumor/background-balanced ([S]) center sampling, seeded per batch.

A patch is an input block of `input_size`³ voxels (image channels, then any feature
channels) and the label block of `label_size`³ voxels at its center (valid convolutions
predict a smaller center region: 70³ in -> 26³ out for the standard 3D model). Volumes are
zero-padded by half a patch so any brain voxel can be a center.
"""

import numpy as np

from brats_tf.constants import NUM_CLASSES
from brats_tf.records.batching import batch_dataset

SAMPLING = ("class_balanced", "tumor_balanced", "uniform")


class PatchSampler:
    """Random batches of (input patch, label patch).

    cases: PreparedCase-like objects (.image (X,Y,Z,K), .label (X,Y,Z), .brain (X,Y,Z));
    features: optional list of (X,Y,Z,F) arrays (2D feature channels) aligned with cases.
    sampling: "class_balanced" ([M]: one center per class present in the data, the rest in
    the brain), "tumor_balanced" ([S]: half the patches majority-tumor, half
    majority-background), "uniform" (centers anywhere in the brain).
    """

    def __init__(self, cases, input_size, label_size, batch_size, seed=0, features=None,
                 sampling="class_balanced", binary=False):
        if sampling not in SAMPLING:
            raise ValueError(f"sampling must be one of {SAMPLING}, got {sampling!r}")
        if label_size > input_size or (input_size - label_size) % 2:
            raise ValueError(f"label_size {label_size} must fit centered in input_size {input_size}")
        self.input_size, self.label_size = int(input_size), int(label_size)
        self.batch_size, self.seed, self.sampling, self.binary = batch_size, seed, sampling, binary
        self.half = self.input_size // 2
        self.volumes, self.labels = [], []
        for i, case in enumerate(cases):
            channels = [np.asarray(case.image, np.float16)]
            if features is not None:
                channels.append(np.asarray(features[i], np.float16))
            volume = np.concatenate(channels, axis=-1) if len(channels) > 1 else channels[0]
            pad = [(self.half, self.input_size)] * 3
            self.volumes.append(np.pad(volume, pad + [(0, 0)]))
            self.labels.append(np.pad(case.label, pad))
        self.num_channels = self.volumes[0].shape[-1]
        self._index_centers(cases)

    def _index_centers(self, cases):
        """Candidate centers (case, x, y, z) per class, and in the brain (unpadded coordinates)."""
        by_class = [[] for _ in range(NUM_CLASSES)]
        brain = []
        for i, case in enumerate(cases):
            for c in range(NUM_CLASSES):
                where = np.argwhere(case.label == c)
                if c == 0:
                    where = np.argwhere((case.label == 0) & case.brain)
                by_class[c].append(np.column_stack([np.full(len(where), i), where]))
            where = np.argwhere(case.brain)
            brain.append(np.column_stack([np.full(len(where), i), where]))
        self.centers_by_class = [np.concatenate(v) if v else np.zeros((0, 4), int) for v in by_class]
        self.brain_centers = np.concatenate(brain)
        self.tumor_centers = np.concatenate(self.centers_by_class[1:])
        self.guaranteed_classes = [c for c in (1, 2, 3, 0) if len(self.centers_by_class[c])]
        if self.sampling == "class_balanced" and self.batch_size < len(self.guaranteed_classes):
            raise ValueError(f"batch_size {self.batch_size} cannot hold all {len(self.guaranteed_classes)} classes")

    def batch_centers(self, batch_number):
        rng = np.random.default_rng([self.seed, batch_number])
        pick = lambda pool: pool[rng.integers(len(pool))]
        # A class's voxel anywhere in the label block keeps the class in the patch.
        half_label = self.label_size // 2
        jitter = lambda: rng.integers(-(self.label_size - half_label - 1), half_label + 1, size=3)
        centers = []
        if self.sampling == "class_balanced":
            for c in self.guaranteed_classes:
                center = pick(self.centers_by_class[c]).copy()
                if c:   # kept inside the case: a negative center would slice an empty patch
                    case_shape = np.asarray(self.labels[center[0]].shape) - self.half - self.input_size
                    center[1:] = np.clip(center[1:] + jitter(), 0, case_shape - 1)
                centers.append(center)
        while len(centers) < self.batch_size:
            if self.sampling == "tumor_balanced" and len(self.tumor_centers):
                want_tumor = len(centers) % 2 == 0
                centers.append(self._majority_center(rng, want_tumor))
            else:
                centers.append(pick(self.brain_centers))
        return np.asarray(centers)[rng.permutation(len(centers))]

    def _majority_center(self, rng, want_tumor, tries=20):
        """A center whose label block is mostly tumor (or mostly background), if one is found."""
        pool = self.tumor_centers if want_tumor else self.brain_centers
        center = pool[rng.integers(len(pool))]
        for _ in range(tries):
            block = self._label_block(center)
            if ((block > 0).mean() > 0.5) == want_tumor:
                return center
            center = pool[rng.integers(len(pool))]
        return center

    def _label_block(self, center):
        case, x, y, z = (int(v) for v in center)
        lo = self.half - self.label_size // 2   # padded offset of the label block start
        return self.labels[case][x + lo:x + lo + self.label_size, y + lo:y + lo + self.label_size,
                                 z + lo:z + lo + self.label_size]

    def batch(self, batch_number):
        """(x (B,P,P,P,C) float32, y (B,L,L,L) int32) for batch `batch_number`."""
        s = self.input_size
        x = np.empty((self.batch_size, s, s, s, self.num_channels), np.float32)
        y = np.empty((self.batch_size,) + (self.label_size,) * 3, np.int32)
        for i, center in enumerate(self.batch_centers(batch_number)):
            case, cx, cy, cz = (int(v) for v in center)
            # Padded coordinates: the patch [c - half, c - half + s) starts at c.
            x[i] = self.volumes[case][cx:cx + s, cy:cy + s, cz:cz + s]
            y[i] = self._label_block(center)
        if self.binary:
            y = (y > 0).astype(np.int32)
        return x, y

    def dataset(self, first_batch=0, num_batches=None):
        """tf.data.Dataset of batches starting at `first_batch` (resume), prefetched."""
        return batch_dataset(self.batch, (self.batch_size,) + (self.input_size,) * 3 + (self.num_channels,),
                             (self.batch_size,) + (self.label_size,) * 3, first_batch, num_batches)
