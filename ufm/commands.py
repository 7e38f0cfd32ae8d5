"""The subcommands of ``ufm``, each a thin wrapper over one public function.

One ``@command`` function per subcommand; keep each one short: parse, call the library, print.
"""

from __future__ import annotations

import argparse

from .cli import command, print_json  # noqa: F401

# ufm flow's default path tolerance for ETD2: the loss along the path within ~4e-7 (relative) of BDF
# at rtol 1e-10, at (C, N, p) = (10, 100, 64), lam = 5e-4; stationary at tol 1e-8 after 2191 gradients
# (BDF at its rtol 1e-12: 6510, and 7x the wall time). Measured 2026-11-30.
ETD2_RTOL = 1e-5


def _add_problem_arguments(p: argparse.ArgumentParser) -> None:
    """The UFM problem's flags, shared by ``solve`` and ``flow``."""
    p.add_argument("--classes", "-C", type=int, required=True, help="number of classes C")
    p.add_argument("--per-class", "-N", type=int, required=True, help="examples per class N")
    p.add_argument("--dim", "-p", type=int, required=True, help="feature dimension p")
    p.add_argument("--lam-w", type=float, required=True, help="weight decay of the classifier W")
    p.add_argument("--lam-h", type=float, required=True, help="weight decay of the features H")
    p.add_argument(
        "--no-bias", action="store_true", help="bias-free classifier (default: unregularized bias)"
    )


@command
def _solve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("solve", help="closed-form global minimizer of the regularized square-loss UFM")
    _add_problem_arguments(p)
    p.add_argument("--verify", action="store_true", help="also minimize numerically (L-BFGS, random starts)")
    p.add_argument("--starts", type=int, default=4, help="random starts for --verify (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed for --verify (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=_run_solve)


def _run_solve(args: argparse.Namespace) -> int:
    from .closed_form import ufm_optimum
    from .optimize import check_optimum

    bias = not args.no_bias
    opt = ufm_optimum(args.classes, args.per_class, args.lam_w, args.lam_h, bias=bias)
    if args.dim < opt.min_dim:
        raise ValueError(
            f"--dim {args.dim} is below {opt.min_dim} ({'C-1' if bias else 'C'}), the minimizer's rank"
        )
    out = {"p": args.dim, **opt.as_dict()}
    if args.verify:
        chk = check_optimum(
            args.classes, args.per_class, args.dim, args.lam_w, args.lam_h,
            bias=bias, n_starts=args.starts, seed=args.seed,
        )  # fmt: skip
        out["verify"] = {
            "loss_numeric": chk.numeric.loss,
            "loss_built": chk.loss_built,
            "rel_gap": chk.rel_gap,
            "grad_norm": chk.numeric.grad_norm,
            "nfev": chk.numeric.nfev,
            "starts": args.starts,
        }
    if args.json:
        print_json(out)
        return 0
    rows = [
        ("geometry", opt.geometry), ("collapsed", opt.collapsed),
        ("delta = C sqrt(N lam_w lam_h)", opt.delta), ("lam_w lam_h threshold 1/(N C^2)", opt.lam_product_max),
        ("eps (1 - correct output)", opt.eps), ("f_correct", opt.f_correct), ("f_other", opt.f_other),
        ("||W_c||^2", opt.w_row_norm_sq), ("||mu_c - mu_G||^2", opt.h_norm_sq),
        ("cos(W_c, W_c')", opt.cos_w), ("cos(mu_c, mu_c')", opt.cos_h),
        ("W_c / (mu_c - mu_G)", opt.w_scale), ("minimal loss", opt.loss),
    ]  # fmt: skip
    if args.verify:
        v = out["verify"]
        rows += [
            ("loss at built (W, H, b)", v["loss_built"]), (f"L-BFGS best of {args.starts}", v["loss_numeric"]),
            ("relative gap", v["rel_gap"]), ("L-BFGS ||grad||", v["grad_norm"]),
        ]  # fmt: skip
    b = "unregularized bias" if bias else "no bias"
    print(f"UFM global minimizer: C={args.classes} N={args.per_class} p={args.dim} "
          f"lam_w={args.lam_w:g} lam_h={args.lam_h:g}, {b}")  # fmt: skip
    for name, value in rows:
        shown = "-" if value is None else f"{value:.10g}" if isinstance(value, float) else str(value)
        print(f"  {name:<34} {shown}")
    return 0


@command
def _register_metrics(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "metrics",
        help="neural-collapse measurements NC1-NC4 of saved features",
        description="NC1-NC4 of features saved in a .npz or torch .pt file holding 'features' (n, p), "
        "'labels' (n,) and optionally 'weight' (C, p), 'bias' (C,) and 'outputs' (n, C).",
    )
    p.add_argument("file", metavar="FILE", help=".npz or .pt file")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(run=_run_metrics)


def _run_metrics(args: argparse.Namespace) -> int:
    from .metrics import load_features, nc_metrics

    data = load_features(args.file)
    result = nc_metrics(
        data["features"], data["labels"], data.get("weight"), data.get("bias"), outputs=data.get("outputs")
    )
    if args.json:
        print_json(result.as_dict())
    else:
        print(f"# {args.file}")
        print(result.table())
    return 0


# Flags of ``ufm train`` that map one to one onto TrainConfig fields.
_TRAIN_FIELDS = (
    "dataset", "arch", "depth", "width", "wd", "lr", "epochs", "batch_size", "per_class",
    "weight_norm", "seed", "device",
)  # fmt: skip


@command
def _register_train(sub: argparse._SubParsersAction) -> None:
    # Defaults are left to TrainConfig (flags default to None), so building the parser imports no torch.
    p = sub.add_parser(
        "train",
        help="train a bias-free homogeneous ReLU network with the square loss and measure NC1-NC4",
        description="Train with SGD on 1/(2NC) sum ||y - f(x)||^2 + lambda/2 sum_k ||W_k||^2 and record "
        "NC1-NC4, norms, ranks, SQI residuals and the theorem's predictions every epoch. Unset flags "
        "take the defaults of ufm.TrainConfig (print them with --show-defaults).",
    )
    p.add_argument("--dataset", help="default | mnist:DIR | fashion:DIR | cifar10:DIR")
    p.add_argument("--arch", choices=("mlp", "cnn"))
    p.add_argument("--depth", type=int, help="number of weight layers L")
    p.add_argument("--width", type=int, help="hidden units (mlp) or channels (cnn)")
    p.add_argument("--wd", type=float, metavar="LAMBDA", help="weight decay on every layer")
    p.add_argument("--lr", type=float, metavar="ETA", help="initial learning rate")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--per-class", type=int, metavar="N", help="training examples per class")
    p.add_argument(
        "--weight-norm", action="store_true", default=None, help="W_k = rho_k V_k with ||V_k|| = 1 (Lagrange)"
    )
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", default=None, metavar="DIR", help="checkpoints, history.csv, config.json")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    p.add_argument("--json", action="store_true", help="print the final epoch as one JSON line")
    p.add_argument(
        "--show-defaults",
        action="store_true",
        help="print the configuration (flags over TrainConfig defaults) as JSON and exit",
    )
    p.set_defaults(run=_train)


def _train(args: argparse.Namespace) -> int:
    import sys

    from .training import TrainConfig, format_theory_table, train

    given = {k: getattr(args, k) for k in _TRAIN_FIELDS if getattr(args, k) is not None}
    config = TrainConfig(**given)
    if args.show_defaults:
        print_json(config.as_dict())
        return 0
    result = train(config, out=args.out, resume=args.resume, progress=not args.json)
    summary = result.final | {
        "status": result.status,
        "nsteps": result.nsteps,
        "wall_s": round(result.wall_s, 2),
    }
    if args.json:
        print_json(summary)
    else:
        print(result.message)
        print(format_theory_table([summary | {"wd": config.wd}]))
        if result.out is not None:
            print(f"history and checkpoint in {result.out}")
    if result.status != 0:
        print(f"ufm train: {result.message}", file=sys.stderr)
    return result.status


@command
def _register_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="run a grid of gradient-flow or training runs into one results table",
        description="Run every combination of a sweep CONFIG (TOML or JSON: kind, grid, fixed, out, "
        "workers; see ufm.sweep) on a local process pool or a Dask cluster. Rows are appended to the "
        "table as runs finish; a re-run skips the runs already ok and retries the failed ones.",
    )
    p.add_argument("config", metavar="CONFIG", help="sweep configuration, .toml or .json")
    p.add_argument("--scheduler", metavar="ADDRESS", help="Dask scheduler address (tcp://HOST:PORT)")
    p.add_argument("--workers", type=int, help="local worker processes (default: config, else min(2, CPUs))")
    p.add_argument("--json", action="store_true", help="print one JSON summary instead of text")
    p.set_defaults(run=_run_sweep)


def _run_sweep(args: argparse.Namespace) -> int:
    from .sweep import run_sweep

    res = run_sweep(args.config, scheduler=args.scheduler, workers=args.workers, progress=not args.json)
    failed = [r for r in res.rows if r["status"] != "ok"]
    if args.json:
        print_json({
            "table": str(res.table), "n_total": res.n_total, "n_done": res.n_done,
            "n_skipped": res.n_skipped, "n_failed": res.n_failed,
            "failed": [{"run_id": r["run_id"], "error": r["error"]} for r in failed],
        })  # fmt: skip
    else:
        print(f"{res.n_total} runs: {res.n_done} done, {res.n_skipped} skipped (already done), "
              f"{res.n_failed} failed -> {res.table}")  # fmt: skip
        for r in failed:
            print(f"  failed {r['run_id']}: {r['error']}")
    return 0 if res.success else 1


@command
def _prove(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prove", help="verify every formula ufm claims, symbolically in SymPy (ufm.proofs)")
    p.add_argument("names", nargs="*", help="proof keys to run (default: all)")
    p.add_argument("--points", type=int, default=3, help="random points per symbolic claim (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random points (default 0)")
    p.add_argument("--json", action="store_true", help="print a JSON list of results")

    def run(args: argparse.Namespace) -> int:
        from .proofs import run_proofs

        results = run_proofs(args.names or None, numeric_points=args.points, seed=args.seed)
        if args.json:
            print_json([r.as_dict() for r in results])
        else:
            width = max(len(r.key) for r in results)
            print(f"{'proof':<{width}}  {'status':<8}  {'seconds':>7}  statement [source]")
            for r in results:
                print(f"{r.key:<{width}}  {r.status:<8}  {r.seconds:7.2f}  {r.name} [{r.source}]")
                if not r.success:
                    print(f"{'':<{width}}  {r.message}; residual: {r.residual}")
            n_ok = sum(r.success for r in results)
            print(f"{n_ok}/{len(results)} verified in {sum(r.seconds for r in results):.1f} s")
        return 0 if all(r.success for r in results) else 1

    p.set_defaults(run=run)


@command
def _reproduce(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reproduce", help="the main job: proofs, flows, phase diagram, network; figures + report"
    )
    p.add_argument("--quick", action="store_true", help="small sizes (about 2 minutes on 2 CPU cores)")
    p.add_argument("--out", default="figures", help="output directory (default: figures/)")
    p.add_argument("--seed", type=int, default=0, help="seed of random starts and training (default 0)")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of progress bars")
    p.set_defaults(run=_run_reproduce)


def _run_reproduce(args: argparse.Namespace) -> int:
    from .reproduce import reproduce

    res = reproduce(args.out, quick=args.quick, seed=args.seed, progress=not args.json)
    summary = {
        "report": str(res.report),
        "figures": [str(f) for f in res.figures],
        "tables": [str(t) for t in res.tables],
        "proofs_verified": res.proofs_verified,
        "proofs_total": res.proofs_total,
        "flows_agree": res.flows_agree,
        "seconds": round(res.seconds, 1),
        "success": res.success,
    }
    if args.json:
        print_json(summary)
    else:
        print(f"proofs: {res.proofs_verified}/{res.proofs_total} verified")
        print(f"flows reach the closed form: {'yes' if res.flows_agree else 'NO'}")
        print(f"report: {res.report}  ({res.seconds:.0f} s)")
        for f in res.figures:
            print(f"figure: {f}")
    return 0 if res.success else 1


@command
def _register_flow(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("flow", help="integrate gradient flow of the UFM from a random start to stationarity")
    _add_problem_arguments(p)
    p.add_argument(
        "--loss", choices=["mse", "ce"], default="mse", help="square loss (default) or cross-entropy"
    )
    p.add_argument("--method", default="ETD2", help="integrator, one of ufm.dynamics.METHODS (default ETD2)")
    p.add_argument(
        "--rtol", type=float, default=None,
        help=f"relative tolerance of the path (default {ETD2_RTOL:g} for ETD2; for the others min(1e-8, tol/1e4), "
        "since at a loose tolerance their error floors ||grad L||)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the random start (default 0)")
    p.add_argument(
        "--t-max", type=float, default=1e6, help="final time if not stationary before (default 1e6)"
    )
    p.add_argument(
        "--tol", type=float, default=1e-8, help="stationarity threshold on ||grad L|| (default 1e-8)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", help="directory for trajectory.csv and flow.png")
    p.add_argument("--progress", action="store_true", help="show a progress bar on stderr")
    p.set_defaults(run=_run_flow)


def _run_flow(args: argparse.Namespace) -> int:
    import math

    from .closed_form import ufm_optimum
    from .dynamics import gradient_flow
    from .model import UFMParams, UFMProblem

    bias = not args.no_bias
    problem = UFMProblem(args.classes, args.per_class, args.lam_w, args.lam_h, bias=bias, loss=args.loss)
    start = UFMParams.random(problem, args.dim, rng=args.seed)
    rtol = args.rtol
    if rtol is None:
        # ETD2 ends at the fixed point at any rtol (its step cap), so rtol only sets the path's accuracy.
        # The others hover at their stability limit with errors of the size of the tolerance, which
        # floors ||grad L||: 1e4x below the stationarity threshold.
        rtol = ETD2_RTOL if args.method == "ETD2" else min(1e-8, args.tol * 1e-4)
    r = gradient_flow(problem, start, method=args.method, t_max=args.t_max, tol=args.tol, rtol=rtol,
                      atol=rtol * 1e-2, progress=args.progress)  # fmt: skip
    opt = (
        ufm_optimum(args.classes, args.per_class, args.lam_w, args.lam_h, bias=bias)
        if args.loss == "mse"
        else None
    )

    def final(name: str):
        v = float(r.metrics[name][-1])
        return None if math.isnan(v) else v

    out = {
        "success": r.success, "status": r.status, "message": r.message, "method": r.method,
        "t": r.t_final, "n_grad_evals": r.nfev, "grad_norm": r.grad_norm, "loss": float(r.loss[-1]),
        "eps": final("eps"), "nc1": final("nc1"), "cos_w": final("cos_w"),
        "nc2_equinorm_w": final("nc2_equinorm_w") if "nc2_equinorm_w" in r.metrics else None,
        "nc3": final("nc3") if "nc3" in r.metrics else None,
        "closed_form": None if opt is None else {
            "eps": opt.eps, "loss": opt.loss, "cos_w": opt.cos_w, "w_row_norm_sq": opt.w_row_norm_sq,
            "geometry": opt.geometry, "delta": opt.delta,
        },
        "closed_form_note": None if opt is not None else "no closed form for cross-entropy",
    }  # fmt: skip
    if args.out:
        out["files"] = _write_flow_outputs(args.out, r, opt)
    if args.json:
        print_json(out)
        return 0 if r.success else 1
    print(f"gradient flow ({r.method}): {r.message}; {r.nfev} gradient evaluations")
    print(f"  {'':<12} {'flow':>16} {'closed form':>16}")
    cf = out["closed_form"] or {}
    for name in ("loss", "eps", "cos_w", "nc1", "grad_norm"):
        v, c = out[name], cf.get(name)
        shown = "-" if v is None else f"{v:.10g}"
        print(f"  {name:<12} {shown:>16} {'-' if c is None else format(c, '.10g'):>16}")
    if opt is None:
        print("  (no closed form for cross-entropy)")
    for path in out.get("files", []):
        print(f"  wrote {path}")
    return 0 if r.success else 1


def _write_flow_outputs(directory: str, r, opt) -> list[str]:
    """trajectory.csv (t, loss, measures) and flow.png (measures and eps against t, closed form dashed)."""
    from pathlib import Path

    from .plots import plot_flow_measures
    from .tables import write_csv

    d = Path(directory)
    columns = {"t": r.t, "loss": r.loss, **r.metrics}
    rows = [{k: float(v[i]) for k, v in columns.items()} for i in range(len(r.t))]
    csv = write_csv(d / "trajectory.csv", rows)
    png = plot_flow_measures(r.t, r.metrics, d / "flow.png", eps_closed_form=None if opt is None else opt.eps)
    return [str(csv), str(png)]
