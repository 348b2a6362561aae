"""The anchor (issue 14 item 6): MONAI's SegResNet in the setting of MONAI's
`brats_mri_segmentation` bundle, PyTorch on the CPU, printing one JSON line.

Runs in its own environment (bench/requirements-anchor.txt: torch 2.13.0 CPU, MONAI,
nibabel), never the project's: it imports neither brats_tf nor TensorFlow.
`bench.bench_inference --anchor_python PATH` runs it as a subprocess beside our networks.

The setting, as the bundle's configs/inference.json (Project-MONAI/model-zoo,
models/brats_mri_segmentation, bundle 0.5.2) has it:
  network    SegResNet(blocks_down=[1,2,2,4], blocks_up=[1,1,1], init_filters=16,
             in_channels=4, out_channels=3, dropout_prob=0.2), eval mode (dropout off)
  inferer    SlidingWindowInferer(roi_size=[240,240,160], sw_batch_size=1, overlap=0.5),
             otherwise MONAI's defaults (constant blending, constant padding of a volume
             smaller than the window)
  input      the four modalities in the bundle's channel order (T1c, T1, T2, FLAIR: BraTS
             2023's t1c, t1n, t2w, t2f), NormalizeIntensity(nonzero=True, channel_wise=True)
  precision  float32: the bundle's `amp` is `torch.autocast("cuda")`, which does nothing
             on the CPU
Weights are random (speed only); torch.no_grad(), --threads intra-op threads (2).

The case: the real BraTS 2023 case (the first case folder under --case, the full
240x240x155 volume, as the bundle reads it: no crop), or with --phantom a random volume
(--phantom_shape, default 240x240x155; zero outside a centred ellipsoid, as a skull-stripped
scan) normalized the same way.

FLOPs: `torch.utils.flop_counter.FlopCounterMode` over one forward of the network at each
window shape the inferer ran (counted on the "meta" device: shapes only, no arithmetic),
times the windows the inferer ran (counted by wrapping the predictor). FlopCounterMode
counts convolutions and matrix products only (aten.convolution, mm, addmm, bmm, attention),
a multiply-add as 2 FLOPs, the whole kernel at every output voxel (borders' zero padding
included), biases not counted; GroupNorm, ReLU, additions and the trilinear upsampling are
not counted (for SegResNet every counted FLOP is a convolution's). Our side
(bench/flops.py, TensorFlow's profiler) also counts a multiply-add as 2 FLOPs.

Seconds: `first_s` the first call of the whole sliding-window inference (the network
built, the volume loaded and normalized before it), `warm_s` the second; `network_s` the
time inside the network in the warm call (the rest: window slicing, padding, blending).
`torch_peak_fp32_gflops`: best of --peak_repeats n x n float32 matmuls in torch (n =
--peak_size, 2 n^3 FLOPs), measured in the same run; `share_of_peak` = warm GFLOP/s over it.
`peak_rss_mb`: this process's peak resident memory (VmHWM).

    python bench/bench_monai.py [--case DIR] [--phantom] [--phantom_shape 240,240,155]
        [--roi 240,240,160] [--threads 2] [--peak_size 4096]
"""

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import monai
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import SegResNet
from monai.transforms import NormalizeIntensity

REAL_CASE = Path(__file__).resolve().parents[2] / "shared" / "data" / "brats2023_glioma_case"
MODALITIES = ("t1c", "t1n", "t2w", "t2f")   # the bundle's channels: T1c, T1, T2, FLAIR
NETWORK = {"blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1], "init_filters": 16, "in_channels": 4,
           "out_channels": 3, "dropout_prob": 0.2}
INFERER = {"roi_size": [240, 240, 160], "sw_batch_size": 1, "overlap": 0.5}
SETTING = "brats_mri_segmentation bundle (configs/inference.json), fp32 CPU"


def peak_rss_mb():
    """This process's peak RSS: VmHWM (ru_maxrss on Linux keeps the parent's peak across fork
    and exec, so under bench_inference it would report the TensorFlow process's)."""
    try:
        with open("/proc/self/status") as status:
            return round(next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024, 1)
    except (OSError, StopIteration, ValueError):
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def parse_shape(text):
    return [int(n) for n in text.split(",")]


def matmul_gflops(n, repeats):
    """Best GFLOP/s of an n x n x n float32 matmul (2 n^3 FLOPs) over `repeats` timed calls."""
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(n, n, generator=generator)
    b = torch.randn(n, n, generator=generator)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / best / 1e9


def real_case(folder):
    """(4, X, Y, Z) float32 of the first case under `folder` (or `folder` itself), the
    bundle's channel order; its case id."""
    folder = Path(folder)
    cases = sorted(p for p in folder.iterdir() if p.is_dir()) if not list(folder.glob("*-t1c.nii.gz")) else [folder]
    if not cases:
        raise FileNotFoundError(f"no case under {folder}")
    import nibabel
    case = cases[0]
    channels = [np.asarray(nibabel.load(next(case.glob(f"*-{m}.nii.gz"))).dataobj, dtype=np.float32)
                for m in MODALITIES]
    return np.stack(channels), case.name


def phantom(shape, seed=0):
    """(4, X, Y, Z) float32: random values in a centred ellipsoid, zero outside."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    inside = sum(g ** 2 for g in grid) < 0.8
    volume = rng.uniform(0.1, 1.0, (4, *shape)).astype(np.float32)
    return volume * inside


class Windows:
    """Stands in for the network as the inferer's predictor: counts the windows and their
    shapes, and the time inside the network."""

    def __init__(self, network):
        self.network = network
        self.reset()

    def reset(self):
        self.shapes, self.seconds = [], 0.0

    def __call__(self, x):
        self.shapes.append(tuple(x.shape))
        start = time.perf_counter()
        out = self.network(x)
        self.seconds += time.perf_counter() - start
        return out


def forward_flops(shape):
    """FLOPs of one forward of the bundle's SegResNet on an input of `shape`, counted on the
    meta device (no arithmetic runs)."""
    with torch.device("meta"):
        network = SegResNet(**NETWORK).eval()
        x = torch.empty(shape)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        network(x)
    return counter.get_total_flops(), {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", default=str(REAL_CASE), help="folder of the real case (or of case folders)")
    parser.add_argument("--phantom", action="store_true", help="a random volume instead of the real case")
    parser.add_argument("--phantom_shape", default=None, help="X,Y,Z of the phantom (implies --phantom; "
                                                              "default 240,240,155)")
    parser.add_argument("--roi", default=",".join(map(str, INFERER["roi_size"])), help="sliding-window size")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--peak_size", type=int, default=4096, help="side of the peak-measuring matmuls")
    parser.add_argument("--peak_repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    roi = parse_shape(args.roi)

    peak = matmul_gflops(args.peak_size, args.peak_repeats)
    if args.phantom or args.phantom_shape:
        image, source, case_id = phantom(parse_shape(args.phantom_shape or "240,240,155")), "phantom", None
    else:
        (image, case_id), source = real_case(args.case), "real"
    image = NormalizeIntensity(nonzero=True, channel_wise=True)(image)
    inputs = torch.as_tensor(np.asarray(image, dtype=np.float32))[None]   # (1, 4, X, Y, Z)

    network = SegResNet(**NETWORK).eval()
    windows = Windows(network)
    inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=INFERER["sw_batch_size"],
                                   overlap=INFERER["overlap"])
    with torch.no_grad():
        start = time.perf_counter()
        out = inferer(inputs, windows)
        first = time.perf_counter() - start
        windows.reset()
        start = time.perf_counter()
        out = inferer(inputs, windows)
        warm = time.perf_counter() - start

    counts = {shape: forward_flops(shape) for shape in set(windows.shapes)}
    total = sum(counts[shape][0] for shape in windows.shapes)
    ops = {}
    for shape in windows.shapes:
        for op, n in counts[shape][1].items():
            ops[op] = ops.get(op, 0) + n
    gflop_per_s = total / warm / 1e9
    print(json.dumps({
        "what": "monai", "model": "SegResNet", "setting": SETTING, "network": NETWORK,
        "roi_size": roi, "sw_batch_size": INFERER["sw_batch_size"], "overlap": INFERER["overlap"],
        "source": source, "case_id": case_id, "shape": list(inputs.shape[2:]), "output_shape": list(out.shape[1:]),
        "windows": sum(s[0] for s in windows.shapes), "predictor_calls": len(windows.shapes),
        "window_shape": list(windows.shapes[0][1:]), "gflop": round(total / 1e9, 3), "counted_ops": ops,
        "first_s": round(first, 3), "warm_s": round(warm, 3), "network_s": round(windows.seconds, 3),
        "gflop_per_s": round(gflop_per_s, 2), "torch_peak_fp32_gflops": round(peak, 1),
        "share_of_peak": round(gflop_per_s / peak, 4), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "monai": monai.__version__,
        "peak_rss_mb": peak_rss_mb()}), flush=True)


if __name__ == "__main__":
    main()
