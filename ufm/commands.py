"""The subcommands of ``ufm``, each a thin wrapper over one public function.

One ``@command`` function per subcommand; keep each one short: parse, call the library, print.
"""

from __future__ import annotations

import argparse

from .cli import command, print_json  # noqa: F401


@command
def _solve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("solve", help="closed-form global minimizer of the regularized square-loss UFM")
    p.add_argument("--classes", "-C", type=int, required=True, help="number of classes C")
    p.add_argument("--per-class", "-N", type=int, required=True, help="examples per class N")
    p.add_argument("--dim", "-p", type=int, required=True, help="feature dimension p")
    p.add_argument("--lam-w", type=float, required=True, help="weight decay of the classifier W")
    p.add_argument("--lam-h", type=float, required=True, help="weight decay of the features H")
    p.add_argument("--no-bias", action="store_true", help="bias-free classifier (default: unregularized bias)")
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
        raise ValueError(f"--dim {args.dim} is below {opt.min_dim} ({'C-1' if bias else 'C'}), the minimizer's rank")
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
