"""The ``landscape-kernels`` command."""
import argparse
import json
import sys


def _reproduce_parser(sub):
    p = sub.add_parser("reproduce", help="reproduce a published analysis into a report folder")
    jobs = p.add_subparsers(dest="job", required=True)
    vf = jobs.add_parser("variance-flatness", help="Feng & Tu's inverse variance-flatness relation (SPEC §1)")
    vf.add_argument("--dataset", choices=["digits", "mnist"], default="digits",
                    help="digits: the embedded scikit-learn 8x8 digits (offline, minutes on 2 cores); mnist: the paper")
    vf.add_argument("--data-dir", default=None, help="ROOT holding MNIST/raw (default $LANDSCAPE_KERNELS_DATA or ~/.cache)")
    vf.add_argument("--batch-size", type=int, default=50)
    vf.add_argument("--lr", type=float, default=0.1)
    vf.add_argument("--window", type=int, default=None, help="snapshots in the PCA window (default 12000 MNIST, 6000 digits)")
    vf.add_argument("--max-epochs", type=int, default=1000)
    vf.add_argument("--pcs-every", type=int, default=10, help="analyse PCs 1, 1+k, 1+2k, ... (default 10)")
    vf.add_argument("--center", choices=["final", "mean"], default="final", help="flatness from w0 or from <w>")
    vf.add_argument("--gamma-max-pc", type=int, default=1000, help="upper end of the gamma fit over PCs 20.. (default 1000)")
    vf.add_argument("--device", default="cpu")
    vf.add_argument("--seed", type=int, default=0)
    vf.add_argument("--out", default="runs/variance-flatness", help="report folder")
    vf.add_argument("--quick", action="store_true", help="a short smoke run of the whole pipeline")
    vf.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    vf.add_argument("--no-progress", action="store_true")
    _forgetting_parser(jobs)
    _sharpness_parsers(jobs)
    _noise_parsers(jobs)
    _escape_parser(jobs)
    vf.add_argument("--grid", action="store_true",
                    help="run every (B, lr) of --grid-batch-sizes x --grid-lrs into OUT/B{B}_lr{lr}/ and overlay them")
    vf.add_argument("--grid-batch-sizes", type=_int_list, default=(25, 50, 100), help="comma list (default 25,50,100)")
    vf.add_argument("--grid-lrs", type=_float_list, default=(0.05, 0.1, 0.2), help="comma list (default 0.05,0.1,0.2)")


def _forgetting_parser(jobs):
    fg = jobs.add_parser("forgetting", help="landscape-dependent constraints against catastrophic forgetting (SPEC §1.7)")
    fg.add_argument("--dataset", choices=["digits", "mnist"], default="digits")
    fg.add_argument("--data-dir", default=None)
    fg.add_argument("--batch-size", type=int, default=50)
    fg.add_argument("--lr", type=float, default=0.1)
    fg.add_argument("--task1-epochs", type=int, default=200)
    fg.add_argument("--task2-epochs", type=int, default=30)
    fg.add_argument("--num-constraints", type=int, default=20, help="N_c, the sharpest task-1 directions held")
    fg.add_argument("--lam", type=float, default=10.0)
    fg.add_argument("--seed", type=int, default=0)
    fg.add_argument("--out", default="runs/forgetting")
    fg.add_argument("--quick", action="store_true")


def _noise_parsers(jobs):
    nc = jobs.add_parser("noise-curvature", help="the superlinear noise covariance-curvature relation (SPEC §4)")
    nc.add_argument("--dataset", choices=["digits", "mnist"], default="mnist")
    nc.add_argument("--data-dir", default=None, help="ROOT holding MNIST/raw (default $LANDSCAPE_KERNELS_DATA or ~/.cache)")
    nc.add_argument("--per-class", type=int, default=2000, help="training samples per class (SPEC §4: 2000)")
    nc.add_argument("--batch-size", type=int, default=50)
    nc.add_argument("--lr", type=float, default=0.1, help="initial lr, cosine decay to lr/100 over --epochs")
    nc.add_argument("--epochs", type=int, default=500)
    nc.add_argument("--clip", type=float, default=5.0, help="gradient-norm clipping")
    nc.add_argument("--losses", type=_str_list, default=("ce", "mse"), help="ce, mse (MSE on softmax); default both")
    nc.add_argument("--seeds", type=_int_list, default=(0,), help="comma list (the paper: 4 seeds)")
    nc.add_argument("--top", type=int, default=500, help="top eigen-directions of H in the fit")
    nc.add_argument("--out", default="runs/noise-curvature")
    nc.add_argument("--quick", action="store_true", help="a short run on the embedded digits")
    nc.add_argument("--resume", action="store_true", help="reuse finished runs and continue unfinished ones")
    nc.add_argument("--no-progress", action="store_true")


def _escape_parser(jobs):
    er = jobs.add_parser("escape-rate", help="SGD's power-law escape: phi, first passage, noise strength, decoupling (SPEC §3)")
    er.add_argument("--parts", type=_str_list, default=("linear", "noise", "decoupling"),
                    help="comma list of linear, noise, decoupling (default all)")
    er.add_argument("--dataset", choices=["digits", "mnist"], default="mnist", help="for the even/odd MLP parts")
    er.add_argument("--data-dir", default=None, help="ROOT holding MNIST/raw (default $LANDSCAPE_KERNELS_DATA or ~/.cache)")
    er.add_argument("--stationary-lrs", type=_float_list, default=(0.1, 0.05))
    er.add_argument("--stationary-batch-sizes", type=_int_list, default=(1, 2, 4, 8))
    er.add_argument("--passage-dims", type=_int_list, default=(1, 2, 3))
    er.add_argument("--passage-thresholds", type=_float_list, default=(1.1, 1.2, 1.3, 1.4, 1.5, 1.6),
                    help="factors c of L* (default 1.1,...,1.6)")
    er.add_argument("--passage-datasets", type=int, default=8,
                    help="independent datasets for the first-passage slopes (100 runs each; default 8)")
    er.add_argument("--noise-epochs", type=int, default=100)
    er.add_argument("--decoupling-epochs", type=_int_list, default=(0, 50, 500), help="default 0,50,500")
    er.add_argument("--spectrum-samples", type=int, default=4000, help="samples in the dense decoupling spectra")
    er.add_argument("--seed", type=int, default=0)
    er.add_argument("--out", default="runs/escape-rate")
    er.add_argument("--quick", action="store_true", help="a short run on the embedded digits")
    er.add_argument("--resume", action="store_true", help="reuse finished parts and continue unfinished ones")
    er.add_argument("--no-progress", action="store_true")


def _run_escape_rate(args):
    from .reproduce import escape_rate as er

    cfg = er.EscapeRateConfig(parts=args.parts, dataset=args.dataset, data_dir=args.data_dir, seed=args.seed,
                              stationary_lrs=args.stationary_lrs, stationary_batch_sizes=args.stationary_batch_sizes,
                              passage_dims=args.passage_dims, passage_thresholds=args.passage_thresholds,
                              passage_datasets=args.passage_datasets,
                              noise_epochs=args.noise_epochs, decoupling_epochs=args.decoupling_epochs,
                              spectrum_samples=args.spectrum_samples, quick=args.quick)
    s = er.run(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    held = sum(c["holds"] for c in s["checks"])
    print(f"report: {args.out}/report.md  ({held} of {len(s['checks'])} checks hold)")
    return 0


def _run_noise_curvature(args):
    from .reproduce import noise_curvature as nc

    cfg = nc.NoiseCurvatureConfig(dataset=args.dataset, data_dir=args.data_dir, per_class=args.per_class,
                                  batch_size=args.batch_size, lr=args.lr, epochs=args.epochs, clip=args.clip,
                                  losses=args.losses, seeds=args.seeds, top=args.top, quick=args.quick)
    s = nc.run(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    print(f"report: {args.out}/report.md  (gamma " + ", ".join(
        f"{loss} {b['gamma']['mean']:.3f}" for loss, b in s["by_loss"].items()) + ")")
    return 0


def _tracked_arguments(p, epochs, quick_help):
    p.add_argument("--dataset", choices=["digits", "mnist"], default="mnist")
    p.add_argument("--data-dir", default=None, help="ROOT holding MNIST/raw (default $LANDSCAPE_KERNELS_DATA or ~/.cache)")
    p.add_argument("--model", choices=["mlp", "simple_cnn"], default="mlp",
                   help="mlp: 784-50-50-10 ReLU (default, minutes on a CPU); simple_cnn: SPEC §2.3's SimpleCNN (a GPU)")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--train-samples", type=int, default=None, help="train on a seeded random subset of this size")
    p.add_argument("--subset", type=int, default=2560, help="the fixed Hessian subset (SPEC §2.1: 2560)")
    p.add_argument("--k", type=int, default=5, help="top-K eigenpairs (SPEC: 5 or 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--resume", action="store_true", help="reuse finished settings and continue unfinished ones")
    p.add_argument("--no-progress", action="store_true")


def _sharpness_parsers(jobs):
    sd = jobs.add_parser("sharpest-directions", help="lambda_1 along training over lr and B grids (SPEC §2.1-2.3)")
    _tracked_arguments(sd, 30, "a short run on the embedded digits")
    sd.add_argument("--lrs", type=_float_list, default=(0.1, 0.01, 0.001), help="the lr grid (default 0.1,0.01,0.001)")
    sd.add_argument("--lr-grid-batch-size", type=int, default=128)
    sd.add_argument("--batch-sizes", type=_int_list, default=(8, 128, 1024), help="the B grid (default 8,128,1024)")
    sd.add_argument("--batch-grid-lr", type=float, default=0.05)
    sd.add_argument("--measure-examples", type=int, default=3000,
                    help="measure every this many training examples during the first --dense-epochs")
    sd.add_argument("--dense-epochs", type=int, default=1, help="then once per epoch (default 1)")
    sd.add_argument("--step-analyses", type=int, default=4,
                    help="decomposed step and cross-sections at the first this many measurements")
    sd.add_argument("--out", default="runs/sharpest-directions")
    ns = jobs.add_parser("nsgd", help="Nudged SGD over gamma (SPEC §2.4)")
    _tracked_arguments(ns, 10, "a short run on the embedded digits")
    ns.add_argument("--lr", type=float, default=0.01)
    ns.add_argument("--batch-size", type=int, default=128)
    ns.add_argument("--gammas", type=_float_list, default=(0.01, 0.1, 1.0, 5.0), help="default 0.01,0.1,1,5 (1 is SGD)")
    ns.add_argument("--out", default="runs/nsgd")


def _run_sharpness_job(args):
    common = dict(dataset=args.dataset, data_dir=args.data_dir, model=args.model, epochs=args.epochs,
                  train_samples=args.train_samples, subset=args.subset, k=args.k, seed=args.seed, quick=args.quick)
    progress = not args.no_progress
    if args.job == "sharpest-directions":
        from .reproduce import sharpest_directions as sd

        cfg = sd.SharpestDirectionsConfig(lrs=args.lrs, lr_grid_batch_size=args.lr_grid_batch_size,
                                          batch_sizes=args.batch_sizes, batch_grid_lr=args.batch_grid_lr,
                                          measure_examples=args.measure_examples, dense_epochs=args.dense_epochs,
                                          step_analyses=args.step_analyses,
                                          **common)
        s = sd.run(cfg, args.out, resume=args.resume, progress=progress)
        print(f"report: {args.out}/report.md  (peak lambda_1 " + ", ".join(
            f"{name} {r['peak_lambda1']:.3g}" for name, r in s["runs"].items()) + ")")
    else:
        from .reproduce import nsgd

        cfg = nsgd.NSGDConfig(lr=args.lr, batch_size=args.batch_size, gammas=args.gammas, **common)
        s = nsgd.run(cfg, args.out, resume=args.resume, progress=progress)
        print(f"report: {args.out}/report.md  (final lambda_1 " + ", ".join(
            f"gamma {r['gamma']:g} {r['final_lambda1']:.3g}" for r in s["runs"].values()) + ")")
    return 0


def _int_list(text):
    return tuple(int(v) for v in text.split(","))


def _str_list(text):
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _float_list(text):
    return tuple(float(v) for v in text.split(","))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="landscape-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="show the active backends (compiled CPU / CUDA, reference), torch, threads, GPU")
    p_info.add_argument("--json", action="store_true", help="print the information as JSON")
    _reproduce_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "info":
        from .kernels.info import format_info, info

        d = info()
        print(json.dumps(d, indent=2) if args.json else format_info(d))
        return 0
    runners = {"noise-curvature": _run_noise_curvature, "escape-rate": _run_escape_rate}
    if args.job in ("sharpest-directions", "nsgd", *runners):
        try:
            return runners.get(args.job, _run_sharpness_job)(args)
        except (FileNotFoundError, ValueError) as exc:  # a missing dataset or a bad setting: one clear line
            print(f"landscape-kernels: error: {exc}", file=sys.stderr)
            return 2
    if args.job == "forgetting":
        from .reproduce import forgetting as fg

        cfg = fg.ForgettingConfig(dataset=args.dataset, data_dir=args.data_dir, batch_size=args.batch_size, lr=args.lr,
                                  task1_epochs=args.task1_epochs, task2_epochs=args.task2_epochs,
                                  num_constraints=args.num_constraints, lam=args.lam, seed=args.seed, quick=args.quick)
        try:
            s = fg.run(cfg, args.out)
        except FileNotFoundError as exc:
            print(f"landscape-kernels: error: {exc}", file=sys.stderr)
            return 2
        print(f"report: {args.out}/report.md  (" + ", ".join(f"{r['method']}: eps1 {r['eps1']:.3f} eps2 {r['eps2']:.3f}"
                                                          for r in s["runs"]) + ")")
        return 0
    if args.job == "variance-flatness":
        from .reproduce import variance_flatness as vf

        cfg = vf.VarianceFlatnessConfig(dataset=args.dataset, data_dir=args.data_dir, batch_size=args.batch_size,
                                        lr=args.lr, window=args.window, max_epochs=args.max_epochs,
                                        pcs_every=args.pcs_every, gamma_max_pc=args.gamma_max_pc,
                                        center=args.center, device=args.device,
                                        seed=args.seed, quick=args.quick)
        try:
            if args.grid:
                g = vf.run_grid(cfg, args.out, args.grid_batch_sizes, args.grid_lrs, resume=args.resume,
                                progress=not args.no_progress)
                print(f"report: {args.out}/grid.md  (psi " + ", ".join(f"{r['psi']:.2f}" if "psi" in r else "failed"
                                                                     for r in g["settings"]) + ")")
                return 0
            s = vf.run(cfg, args.out, resume=args.resume, progress=not args.no_progress)
        except FileNotFoundError as exc:  # a missing dataset or checkpoint: one clear line, not a traceback
            print(f"landscape-kernels: error: {exc}", file=sys.stderr)
            return 2
        print(f"report: {args.out}/report.md  (gamma {s['pca']['gamma']:.2f}, n90 {s['pca']['n90']}, "
              f"psi {s['psi']['psi']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
