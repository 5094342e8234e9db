"""The main job's wall time by stage (issue 5 target on this CPU: under 20 minutes in all, the analysis
stages, everything after training, under 3 minutes), with the checkable numbers of the run.

The MNIST paper setting (B = 50, alpha = 0.1, window 12,000) by default; --dataset digits for the
embedded offline dataset. The run folder (report, figures, checkpoint) goes to --out.

    python bench/variance_flatness.py --json bench/results/variance_flatness_cpu.json
"""
import os
import sys
from datetime import datetime, timezone

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from landscape_kernels.reproduce import variance_flatness as vf  # noqa: E402
from results_io import base_parser, write_json  # noqa: E402

ANALYSIS = ("pca", "flatness", "mlf", "temperature")


def main(argv=None):
    parser = base_parser(__doc__, data_dir=True)
    parser.add_argument("--dataset", choices=["mnist", "digits"], default="mnist")
    parser.add_argument("--max-epochs", type=int, default=1000)
    parser.add_argument("--out", default="runs/bench-variance-flatness")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    cfg = vf.VarianceFlatnessConfig(dataset=args.dataset, data_dir=args.data_dir, max_epochs=args.max_epochs,
                                    quick=args.quick)
    s = vf.run(cfg, args.out, resume=args.resume, progress=False)
    t = s["timings_s"]
    analysis = sum(t.get(k, 0.0) for k in ANALYSIS)
    report = {"benchmark": "variance_flatness", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": "CPU", "threads": torch.get_num_threads(), "torch": torch.__version__, "dataset": args.dataset,
              "config": s["config"], "timings_s": t, "total_s": sum(t.values()), "analysis_s": analysis,
              "epochs": s["training"]["epochs"], "steps": s["training"]["steps"],
              "stopped_by": s["training"]["stopped_by"], "test_accuracy": s["training"]["test_accuracy"],
              "numbers": {"gamma": s["pca"]["gamma"], "n90": s["pca"]["n90"], "psi": s["psi"]["psi"],
                          "psi_ci95": [-s["psi"]["fit"]["ci95"][1], -s["psi"]["fit"]["ci95"][0]],
                          "cos_p1_mean": s["pca"]["cos_p1_mean"], "ratio_12": s["pca"]["ratio_12"]},
              "checks": s["checks"]}
    print(f"{args.dataset}: {report['epochs']} epochs, stopped by {report['stopped_by']}; total {report['total_s']:.0f} s, "
          f"training {t['training']:.0f} s, analysis {analysis:.0f} s "
          + ", ".join(f"{k} {t[k]:.1f}" for k in ANALYSIS))
    print("numbers: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in report["numbers"].items()
                                  if not isinstance(v, list)))
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
