"""Loss profiles (Feng & Tu 2021): ``loss_profiles`` against a plain point-by-point loop.

The Feng & Tu 2021 network (784-50-50-10, no bias) after brief SGD training, the full MNIST training set
(60,000 images) from --data-dir, only W2 (the hidden->hidden 50 x 50 weight) moving: 100 random unit
directions x 41 offsets in [-20, 20]. The loop is what one writes without this library: set W2, run
the model on all images, read the loss, for every point. With --quick the loop runs on the first
--loop-directions directions only and its time is scaled to all points (it is linear in the number
of points); the output says so. Agreement is checked on the points both computed.

    python bench/profiles.py --quick --json bench/results/profiles_cpu.json
"""
import os
import sys
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from landscape_kernels.training.data import load_mnist  # noqa: E402
from landscape_kernels.linalg.profiles import flatness, loss_profiles  # noqa: E402
from lanczos import trained_mlp  # noqa: E402
from results_io import base_parser, write_json  # noqa: E402
from timing import PeakRSS, timed  # noqa: E402

LAYER = "2.weight"


def point_loop(model, x, y, directions, deltas):
    """(K, G) losses, one forward pass over all of x per point."""
    weight = model[2].weight
    w0 = weight.detach().clone()
    out = torch.empty(directions.shape[0], len(deltas), dtype=torch.float64)
    try:
        with torch.no_grad():
            for k, d in enumerate(directions):
                for g, delta in enumerate(deltas):
                    weight.copy_(w0 + float(delta) * d.reshape(w0.shape))
                    out[k, g] = float(F.cross_entropy(model(x), y))
    finally:
        with torch.no_grad():
            weight.copy_(w0)
    return out


def main(argv=None):
    parser = base_parser(__doc__, data_dir=True)
    parser.add_argument("--directions", type=int, default=100)
    parser.add_argument("--points", type=int, default=41)
    parser.add_argument("--loop-directions", type=int, default=None,
                        help="directions the plain loop runs (default: 2 with --quick, all otherwise)")
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else 3
    x, y = load_mnist(args.data_dir, "train")
    model = trained_mlp(x[:10000], y[:10000], steps=200)
    g = torch.Generator().manual_seed(0)
    directions = torch.linalg.qr(torch.randn(2500, args.directions, generator=g))[0].T.contiguous()  # unit, orthogonal
    deltas = torch.linspace(-20, 20, args.points, dtype=torch.float64)
    K, G = directions.shape[0], deltas.numel()
    loop_k = args.loop_directions or (2 if args.quick else K)

    def ours(fast_path):
        return loss_profiles(model, F.cross_entropy, (x, y), directions, deltas, params=[LAYER], fast_path=fast_path)

    rows = {}
    for name, fn in (("landscape_kernels (one-layer fast path)", lambda: ours(None)),
                     ("landscape_kernels (generic vmap path)", lambda: ours(False))):
        with PeakRSS() as mem:
            result, seconds = timed(fn, repeats)
        rows[name] = {"s": seconds, "points": K * G, "peak_added_bytes": mem.added, "result": result}
    with PeakRSS() as mem:
        loop_result, loop_s = timed(lambda: point_loop(model, x, y, directions[:loop_k], deltas), repeats)
    rows["plain point-by-point loop"] = {"s": loop_s * K / loop_k, "points": loop_k * G, "peak_added_bytes": mem.added,
                                         "scaled_from_points": loop_k * G if loop_k < K else None}
    ours_s = rows["landscape_kernels (one-layer fast path)"]["s"]
    for r in rows.values():
        r["x_ours"] = r["s"] / ours_s
        if "result" in r:
            r["max_abs_diff_vs_loop"] = float((r.pop("result")[:loop_k] - loop_result).abs().max())
    with PeakRSS() as mem:
        flat, flat_s = timed(lambda: flatness(model, F.cross_entropy, (x, y), directions, params=[LAYER]), 1)
    report = {"benchmark": "profiles", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": "CPU",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "repeats": repeats,
              "model": "784-50-50-10 MLP, no bias, 200 SGD steps (B=50, lr=0.1) on 10k MNIST images",
              "samples": x.shape[0], "layer": LAYER, "directions": K, "points_per_direction": G, "methods": rows,
              "flatness": {"s": flat_s, "directions": K, "loss0": flat.loss0,
                           "saturated_sides": int(flat.saturated_left.sum() + flat.saturated_right.sum()),
                           "median_width": float(flat.widths.median())}}
    print(f"{K} directions x {G} points, {x.shape[0]} MNIST images, only {LAYER} moving")
    print(f"    {'method':42s} {'x ours':>8s} {'points run':>11s} {'max |diff| vs loop':>19s}")
    for name, r in rows.items():
        diff = f"{r['max_abs_diff_vs_loop']:19.1e}" if "max_abs_diff_vs_loop" in r else " " * 19
        note = f"  (time scaled from {r['scaled_from_points']} points)" if r.get("scaled_from_points") else ""
        print(f"    {name:42s} {r['x_ours']:8.2f} {r['points']:11d} {diff}{note}")
    print(f"flatness of {K} directions (Feng & Tu 2021 search, both sides): {flat_s / ours_s:.2f}x the profile time; "
          f"median width {report['flatness']['median_width']:.2f}")
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
