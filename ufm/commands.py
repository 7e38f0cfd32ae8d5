"""The subcommands of ``ufm``, each a thin wrapper over one public function.

One ``@command`` function per subcommand; keep each one short: parse, call the library, print.
``ufm.cli`` builds the parser from ``COMMANDS``. Building it imports no torch, SymPy or SciPy: the
library modules behind a command are imported inside its handler.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Callable
from typing import Any

from .losses import LOSSES

# Where ``ufm reproduce`` writes by default: the full run regenerates the committed figures/; the
# quick run (the README's quick start) writes under the ignored runs/, leaving tracked files alone.
FULL_OUT, QUICK_OUT = "figures", "runs/reproduce-quick"

# Tables wrap their long text columns to this width: a 100-column terminal shows every line whole.
TABLE_COLUMNS = 100

# Each entry adds one subcommand to the parser and sets ``run`` to its handler (``ufm.cli``).
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def command(register: Callable[[argparse._SubParsersAction], None]):
    """Decorator: add a subcommand registration function to the CLI."""
    COMMANDS.append(register)
    return register


def print_json(obj) -> None:
    """Print one JSON object on one line (NaN is not valid JSON, so it is refused)."""
    print(json.dumps(obj, allow_nan=False, default=_json_default))


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _one_or_list(kind: type, expected: str) -> Callable[[str], Any]:
    """An argparse type: one value, or comma-separated values as a tuple (``8,4,2``)."""

    def parse(text: str):
        try:
            values = tuple(kind(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        return values[0] if len(values) == 1 else values

    return parse


# ``-N``: one count or C per-class counts; ``--lam-w``: one decay or one per layer, W_1 first.
_counts = _one_or_list(int, "a count or comma-separated per-class counts (8,4,2)")
_decays = _one_or_list(float, "a decay or L comma-separated decays, W_1 first (1e-3,2e-3)")


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``, refused with a message naming the flag."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    return parse


_seed = _int_at_least(0)  # NumPy's generators refuse negative seeds


def _add_problem_arguments(p: argparse.ArgumentParser) -> None:
    """The UFM problem's flags, shared by ``solve`` and ``flow`` (``_problem`` builds the problem)."""
    p.add_argument("--classes", "-C", type=int, required=True, help="number of classes C")
    p.add_argument(
        "--per-class", "-N", type=_counts, required=True, metavar="N",
        help="examples per class: one count N, or C comma-separated counts N_1,...,N_C (e.g. 8,4,2)",
    )  # fmt: skip
    p.add_argument("--dim", "-p", type=int, required=True, help="feature dimension p")
    p.add_argument(
        "--depth", type=int, default=1, metavar="L",
        help="weight layers after H: L - 1 linear hidden layers (p x p), then the classifier (default 1)",
    )  # fmt: skip
    p.add_argument(
        "--lam-w", type=_decays, required=True, metavar="LAM",
        help="weight decay of the layers: one value for all, or L comma-separated values "
        "(W_1 first, the classifier last)",
    )  # fmt: skip
    p.add_argument("--lam-h", type=float, required=True, help="weight decay of the features H")
    p.add_argument(
        "--lam-b", type=float, default=0.0, metavar="X",
        help="weight decay of the bias (default 0: unregularized)",
    )  # fmt: skip
    p.add_argument(
        "--no-bias", action="store_true", help="bias-free classifier (default: a bias, decay --lam-b)"
    )
    p.add_argument(
        "--loss", choices=tuple(LOSSES), default="mse", help="loss, one of ufm.losses.LOSSES (default mse)"
    )
    _add_label_smoothing(p)


def _problem(args: argparse.Namespace):
    """The UFMProblem of the flags of ``_add_problem_arguments`` (the library checks the values)."""
    from .model import UFMProblem

    if args.no_bias and args.lam_b:
        raise ValueError(f"--lam-b {args.lam_b:g} is the decay of a bias, but --no-bias removes it")
    return UFMProblem(
        args.classes, args.per_class, args.lam_w, args.lam_h, lam_b=args.lam_b, bias=not args.no_bias,
        loss=args.loss, depth=args.depth, label_smoothing=args.label_smoothing or 0.0,
    )  # fmt: skip


def _add_label_smoothing(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--label-smoothing", type=float, default=None, metavar="A",
        help="label smoothing a in [0, 1): targets (1 - a) y + a/C (default 0)",
    )  # fmt: skip


@command
def _solve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "solve",
        help="closed-form global minimizer of the regularized UFM (square loss or cross-entropy)",
        description="The global minimizer of the regularized UFM in closed form (docs/theory.md §5; "
        "ufm.ufm_optimum, Loss.closed_form): with delta = C sqrt(N lam_w lam_h), a simplex ETF with a bias "
        "or an orthogonal frame without one when delta < 1 - a, else a rank-one or zero solution. Prints "
        "eps, the outputs, norms, cosines and the minimal loss, for a regularized bias (--lam-b), deep linear "
        "layers (--depth, per-layer --lam-w), per-class counts and cross-entropy (docs/theory.md §6-§9); "
        "--verify compares with L-BFGS from random starts. Problems without a closed form exit 2 saying why.",
    )
    _add_problem_arguments(p)
    p.add_argument("--verify", action="store_true", help="also minimize numerically (L-BFGS, random starts)")
    p.add_argument("--starts", type=int, default=4, help="random starts for --verify (default 4)")
    p.add_argument("--seed", type=_seed, default=0, help="seed for --verify (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=_run_solve)


# Rows of the ``ufm solve`` table: (label, key of the JSON object); absent keys are skipped.
_SOLVE_ROWS = (
    ("regime", "regime"), ("geometry", "geometry"), ("rank of Z = W_L...W_1 H", "rank"),
    ("collapsed", "collapsed"), ("spectrum of the targets", "spectrum"),
    ("delta (threshold ratio)", "delta"),
    ("lam product threshold", "lam_product_max"), ("label smoothing a", "label_smoothing"),
    # The poster: SQI is "similar to label smoothing"; the two eps side by side.
    ("eps of SQI (1 - correct output)", "eps"), ("eps of the smoothing a(C-1)/C", "eps_label_smoothing"),
    ("p_wrong (1 - softmax correct)", "p_wrong"), ("f_correct", "f_correct"), ("f_other", "f_other"),
    ("b", "b"), ("singular values of Z", "z_singular_values"), ("||W_c||^2", "w_row_norm_sq"),
    ("||mu_c||^2", "h_norm_sq"), ("||W_k||^2 per layer", "layer_norm_sq"), ("cos(W_c, W_c')", "cos_w"),
    ("cos(mu_c - mu_G, mu_c' - mu_G)", "cos_h"), ("W_c / mu_c", "w_scale"),
    ("a root exists, zero wins", "zero_wins_over_root"), ("minimal loss", "loss"),
)  # fmt: skip
# Keys that describe a minimizer's point; dropped (null) where the infimum is not attained.
_POINT_KEYS = (
    "w_row_norm_sq", "h_norm_sq", "layer_norm_sq", "h_total_norm_sq", "w_scale", "cos_w", "cos_h",
)  # fmt: skip


# Entries of a list that a table shows (runs of equal entries count once); --json has every one.
_LIST_SHOWN = 12


def _shown(value) -> str:
    """A value for a table: runs of list entries equal as shown (to 10 digits) as one ``v (x k)`` (C
    equal singular values or biases), and a list still longer than _LIST_SHOWN cut to its ends."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.10g}"
    if isinstance(value, list | tuple):
        runs = [(text, sum(1 for _ in group)) for text, group in itertools.groupby(map(_shown, value))]
        items = [text if k == 1 else f"{text} (x {k})" for text, k in runs]
        if len(items) > _LIST_SHOWN:
            items[_LIST_SHOWN - 2 : -1] = [f"... {len(value)} entries in all, every one in --json"]
        return "[" + ", ".join(items) + "]"
    return str(value)


def _run_solve(args: argparse.Namespace) -> int:
    # The library says when there is no closed form (e.g. ReLU layers): NoClosedForm, exit 2.
    problem = _problem(args)
    opt = problem.loss.closed_form(problem)
    if args.dim < opt.min_dim:
        raise ValueError(
            f"--dim {args.dim} is below {opt.min_dim}, the rank of the minimizer ({opt.geometry})"
        )
    out = {"p": args.dim, **opt.as_dict(), "attained": opt.attained}
    if not opt.attained:
        out |= dict.fromkeys(_POINT_KEYS)
        out["note"] = "infimum not attained: a decay is zero on one side, so rescaling lowers the loss"
    if args.verify:
        from .optimize import verify_optimum  # SciPy's optimizers: only --verify needs them

        chk = verify_optimum(problem, args.dim, n_starts=args.starts, seed=args.seed)
        out["verify"] = {
            "loss_numeric": chk.numeric.loss,
            "loss_built": chk.loss_built,
            "rel_gap": chk.rel_gap,
            "grad_norm": chk.numeric.grad_norm,
            "nfev": chk.numeric.nfev,
            "starts": args.starts,
            "losses": chk.numeric.losses.tolist(),
        }
    if args.json:
        print_json(out)
        return 0
    # For cross-entropy f_correct is a logit; its eps (1 - f_correct, as ``ufm flow`` measures it)
    # means nothing beside p_wrong, so the table leaves it out.
    skip = {"eps"} if "p_wrong" in out else set()
    rows = [(label, out[key]) for label, key in _SOLVE_ROWS if key in out and key not in skip]
    if args.verify:
        v = out["verify"]
        rows += [
            ("loss at built point", v["loss_built"]), (f"L-BFGS best of {args.starts}", v["loss_numeric"]),
            ("relative gap", v["rel_gap"]), ("L-BFGS ||grad||", v["grad_norm"]),
        ]  # fmt: skip
    b = (
        "no bias"
        if args.no_bias
        else ("unregularized bias" if args.lam_b == 0 else f"bias decay {args.lam_b:g}")
    )
    print(f"UFM global minimizer ({problem.loss.description}, depth {problem.depth}): C={args.classes} "
          f"N={_shown(args.per_class)} p={args.dim} lam_w={_shown(args.lam_w)} lam_h={args.lam_h:g}, {b}")  # fmt: skip
    if not opt.attained:
        print(f"  infimum not attained: {out['note'].split(': ', 1)[1]}; no minimizer exists")
    for name, value in rows:
        print(f"  {name:<38} {_shown(value)}")
    return 0


@command
def _register_metrics(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "metrics",
        help="neural-collapse measurements NC1-NC4 of saved features",
        description="NC1-NC4 of features saved in a .npz or torch .pt file holding 'features' (n, p), "
        "'labels' (n,) and optionally 'weight' (C, p), 'bias' (C,) and 'outputs' (n, C) (ufm.nc_metrics, "
        "docs/theory.md §17). The table's last column says what each measure reads at exact collapse onto "
        "a simplex ETF (0 for NC1-NC4); measures that need what the file lacks are shown as '-'.",
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
        print(result.table(at_collapse=True))
    return 0


# Flags of ``ufm train`` that map one to one onto TrainConfig fields.
_TRAIN_FIELDS = (
    "dataset", "arch", "depth", "width", "wd", "lr", "epochs", "batch_size", "per_class",
    "weight_norm", "seed", "device", "loss", "label_smoothing", "measure_every", "svd_every", "refine_to",
    "batch_order", "svd_layers",
)  # fmt: skip


@command
def _register_train(sub: argparse._SubParsersAction) -> None:
    # Defaults are left to TrainConfig (flags default to None), so building the parser imports no torch.
    p = sub.add_parser(
        "train",
        help="train a bias-free homogeneous ReLU network (square loss by default) and measure NC1-NC4",
        description="Train with SGD on 1/n sum_i l(f(x_i), t_i) + lambda/2 sum_k ||W_k||^2 (by default the "
        "square loss l = 1/2 ||t - f||^2, targets t = (1 - a) y + a/C with label smoothing a) and record "
        "NC1-NC4, norms, ranks, SQI residuals and the theorem's predictions every epoch. Unset flags "
        "take the defaults of ufm.TrainConfig (print them with --show-defaults). A progress bar per epoch "
        "shows on a terminal's stderr.",
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
    p.add_argument("--loss", choices=tuple(LOSSES), help="loss, one of ufm.losses.LOSSES")
    _add_label_smoothing(p)
    p.add_argument(
        "--weight-norm", action="store_true", default=None, help="W_k = rho_k V_k with ||V_k|| = 1 (Lagrange)"
    )
    p.add_argument("--seed", type=_seed)
    p.add_argument(
        "--batch-order", choices=("shuffle", "fixed"),
        help="shuffle: a fresh order of the mini-batches every epoch (default); fixed: the first epoch's "
        "order every epoch, so the last epoch's noise_* columns are the SGD noise left without sampling",
    )  # fmt: skip
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--measure-every", type=int, metavar="K",
        help="measure every K epochs (and at the first and last); unmeasured epochs have no history row",
    )  # fmt: skip
    p.add_argument(
        "--svd-every", type=int, metavar="K",
        help="singular-value measures (ranks) at epochs divisible by K only; blank (NaN) elsewhere",
    )  # fmt: skip
    p.add_argument(
        "--svd-layers", metavar="SPEC",
        help="layers whose singular values are taken: all (default), last, or numbers such as 1,3; "
        "the others' rank columns are blank (NaN)",
    )  # fmt: skip
    p.add_argument(
        "--refine-to",
        type=float,
        metavar="TOL",
        help="after SGD, move W_L to the limit of full-batch gradient descent in W_L (the ridge solution at "
        "the features) and require ||dL/dW_L||/(lambda ||W_L||) < TOL (e.g. 1e-4), else exit 1",
    )
    p.add_argument("--out", default=None, metavar="DIR", help="checkpoints, history.csv, config.json")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    p.add_argument(
        "--overwrite", action="store_true", help="replace the run already in DIR (default: refuse)"
    )
    p.add_argument("--json", action="store_true", help="print the final epoch as one JSON line")
    p.add_argument(
        "--wide", action="store_true", help="the final table on one line per row (default: fit 100 columns)"
    )
    p.add_argument(
        "--show-defaults",
        action="store_true",
        help="print the configuration (flags over TrainConfig defaults) as JSON and exit",
    )
    p.set_defaults(run=_train, on_interrupt=_train_interrupted)


def _train_interrupted(args: argparse.Namespace) -> str:
    """What a stopped ``ufm train`` leaves: its last checkpoint, when it writes one."""
    from pathlib import Path

    from .training import CHECKPOINT

    if not args.out:
        return "nothing was written (no --out)"
    if not (Path(args.out) / CHECKPOINT).is_file():
        return f"no checkpoint was written to {args.out} yet"
    return f"{args.out} holds the last checkpoint; continue with the same command and --resume"


def _train(args: argparse.Namespace) -> int:
    import sys

    from .experiments.weight_decay import format_theory_table
    from .training import TrainConfig, train

    given = {k: getattr(args, k) for k in _TRAIN_FIELDS if getattr(args, k) is not None}
    config = TrainConfig(**given)
    if args.show_defaults:
        print_json(config.as_dict())
        return 0
    result = train(config, out=args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.json)
    summary = result.final | {
        "status": result.status,
        "nsteps": result.nsteps,
        "wall_s": round(result.wall_s, 2),
    }
    if args.json:
        print_json(summary)
    else:
        print(result.message)
        print(format_theory_table([summary | {"wd": config.wd}], width=None if args.wide else TABLE_COLUMNS))
        if result.out is not None:
            print(f"history and checkpoint in {result.out}")
    if result.status != 0 or not result.success:
        print(f"ufm train: {result.message}", file=sys.stderr)
    # Only an unmet --refine-to ends a finished run without success.
    return result.status or int(not result.success)


@command
def _register_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="run a grid of gradient-flow or training runs into one results table",
        description="Run every combination of a sweep CONFIG (TOML or JSON: kind, grid, fixed, out, "
        "workers; see ufm.experiments.sweep) on a local process pool or a Dask cluster. Rows are appended to the "
        "table as runs finish; a re-run skips the runs already ok and retries the failed ones.",
    )
    p.add_argument("config", metavar="CONFIG", help="sweep configuration, .toml or .json")
    p.add_argument("--scheduler", metavar="ADDRESS", help="Dask scheduler address (tcp://HOST:PORT)")
    p.add_argument("--workers", type=int, help="local worker processes (default: config, else min(2, CPUs))")
    p.add_argument(
        "--max-runs", type=int, default=None, metavar="N",
        help="refuse a grid of more than N runs (default: the library's MAX_RUNS, 10000)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON summary instead of text")
    p.set_defaults(run=_run_sweep)


def _run_sweep(args: argparse.Namespace) -> int:
    import signal
    import sys

    from .experiments.sweep import SweepInterrupted, run_sweep

    try:
        res = run_sweep(
            args.config, scheduler=args.scheduler, workers=args.workers, progress=not args.json,
            **({} if args.max_runs is None else {"max_runs": args.max_runs}),
        )  # fmt: skip
    except SweepInterrupted as err:
        print(f"\nufm sweep: {err}: workers stopped, finished runs kept; run the same command again to resume",
              file=sys.stderr)  # fmt: skip
        return 128 + signal.Signals[err.signal].value
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
    p = sub.add_parser(
        "prove",
        help="verify every formula ufm claims, symbolically in SymPy (ufm.proofs)",
        description="Run the SymPy proofs of ufm.proofs, or a file of your own with --module. Each claim "
        "is evaluated at K random points (--points) and then decided by SymPy: 'verified' when SymPy "
        "decides it, 'failed' with the counterexample's point and residual, 'undecided' when SymPy "
        "cannot decide it and it held at all K points. Exit status 1 only when a proof failed; "
        "undecided proofs are listed but are not counted as verified. Proof keys: {proofs}.",
        formatter_class=_ProofsHelpFormatter,
    )
    p.add_argument(
        "names", nargs="*", metavar="NAME", help="proof keys to run (default: all, or the --module's)"
    )
    p.add_argument(
        "--module", action="append", metavar="PATH",
        help="a .py file that registers proofs with ufm.proofs.register (repeatable); without NAMES its "
        "proofs are run",
    )  # fmt: skip
    p.add_argument(
        "--points", type=_int_at_least(1), default=3, help="K, random points per symbolic claim (default 3)"
    )
    p.add_argument("--seed", type=_seed, default=0, help="seed of the random points (default 0)")
    p.add_argument("--json", action="store_true", help="print a JSON list of results")
    p.add_argument("--latex", action="store_true", help="print each proof's formulas as LaTeX (sympy.latex)")
    p.add_argument("--wide", action="store_true", help="do not wrap long lines (default: fit 100 columns)")
    p.set_defaults(run=_run_prove)


class _ProofsHelpFormatter(argparse.HelpFormatter):
    """Fills ``{proofs}`` with the registered proof keys when help is shown, so that building the
    parser (and ``ufm --help``) imports no SymPy."""

    def _format_text(self, text: str) -> str:
        if "{proofs}" in text:
            from .proofs import PROOFS

            text = text.replace("{proofs}", ", ".join(PROOFS))
        return super()._format_text(text)


def _run_prove(args: argparse.Namespace) -> int:
    from .proofs import run_proofs

    results = run_proofs(args.names or None, module=args.module, numeric_points=args.points, seed=args.seed)
    if args.json:
        print_json([r.as_dict() | {"latex": r.latex} for r in results])
    else:
        _print_proofs(results, latex=args.latex, width=None if args.wide else TABLE_COLUMNS)
    return 1 if any(r.status == "failed" for r in results) else 0


def _print_proofs(results, *, latex: bool, width: int | None) -> None:
    """One line per proof (key, status, seconds, statement [source]) and what failed or was undecided,
    wrapped to ``width`` columns (None: unwrapped)."""
    import textwrap

    key_width = max(len(r.key) for r in results)
    indent = " " * (key_width + 2)

    def fill(text: str, first: str, rest: str) -> str:
        return (
            text
            if width is None
            else textwrap.fill(text, width, initial_indent=first, subsequent_indent=rest)
        )

    wrap = lambda text: fill(text, indent, indent) if width is not None else indent + text
    print(f"{'proof':<{key_width}}  {'status':<9}  {'seconds':>7}  statement [source]")
    for r in results:
        line = f"{r.key:<{key_width}}  {r.status:<9}  {r.seconds:7.2f}  {r.name} [{r.source}]"
        print(fill(line, "", indent + " " * 21))
        if r.status == "failed":
            print(wrap(f"{r.message}; residual: {r.residual}"))
        elif r.status == "undecided":
            print(wrap(r.message))
        if latex and r.status == "verified":
            for formula in r.latex:
                print(f"{indent}$$ {formula} $$")
    counts = {s: sum(r.status == s for r in results) for s in ("verified", "failed", "undecided")}
    print(f"{counts['verified']}/{len(results)} verified, {counts['failed']} failed, {counts['undecided']} "
          f"undecided in {sum(r.seconds for r in results):.1f} s")  # fmt: skip


@command
def _reproduce(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reproduce",
        help="the main job: proofs, flows, phase diagram, networks, the journal's claims; figures + report",
        description="Run the nine parts of the main job (ufm.experiments.reproduce): the SymPy proofs, "
        "gradient flows against the closed form, the phase diagram across the collapse threshold, the "
        "poster's network experiment on the embedded MNIST digits, the literature's minimizers, the time "
        "to collapse, and the journal paper's low-rank bias, normalization and intrinsic SGD noise; write "
        "CSV tables, figures and report.md built from them. A line on stderr marks each part's start and "
        "end with its time.",
    )
    p.add_argument(
        "--quick", action="store_true", help="small sizes (58 s measured on 2 idle CPU cores; see the README)"
    )
    p.add_argument(
        "--out", default=None, metavar="DIR",
        help=f"output directory (default: {QUICK_OUT}/ with --quick, so the committed figures stay; else {FULL_OUT}/)",
    )  # fmt: skip
    p.add_argument("--seed", type=_seed, default=0, help="seed of random starts and training (default 0)")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of progress bars")
    p.set_defaults(run=_run_reproduce)


def _run_reproduce(args: argparse.Namespace) -> int:
    from .experiments.reproduce import reproduce

    out = args.out or (QUICK_OUT if args.quick else FULL_OUT)
    res = reproduce(out, quick=args.quick, seed=args.seed, progress=not args.json)
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
    p = sub.add_parser(
        "flow",
        help="integrate gradient flow of the UFM from a random start to stationarity",
        description="Gradient flow from a random start (ufm.experiments.compare.compare_flow), its end "
        "point beside the closed-form minimizer where the problem has one. The integrator, its "
        "tolerances and the budgets default to the library's (ufm.dynamics).",
        formatter_class=_MethodsHelpFormatter,
    )
    _add_problem_arguments(p)
    p.add_argument(
        "--method", default=None,
        help="integrator, one of {methods} (default {default_method}, the library's default)",
    )  # fmt: skip
    p.add_argument(
        "--rtol", type=float, default=None,
        help="relative tolerance of the path (default: the integrator's own, "
        "METHODS[method].default_tolerances(tol))",
    )  # fmt: skip
    p.add_argument(
        "--atol", type=float, default=None,
        help="absolute tolerance of the path (default: the integrator's own, as --rtol)",
    )  # fmt: skip
    p.add_argument("--seed", type=_seed, default=0, help="seed of the random start (default 0)")
    p.add_argument(
        "--t-max", type=float, default=1e6, help="final time if not stationary before (default 1e6)"
    )
    p.add_argument(
        "--tol", type=float, default=1e-8, help="stationarity threshold on ||grad L|| (default 1e-8)"
    )
    p.add_argument(
        "--max-nfev", type=int, default=None, metavar="N",
        help="budget of gradient evaluations (default: the library's, {max_nfev})",
    )  # fmt: skip
    p.add_argument(
        "--max-seconds", type=float, default=None, metavar="S",
        help="budget of wall time in seconds (default: the library's, {max_seconds:g})",
    )  # fmt: skip
    p.add_argument(
        "--moments", action=argparse.BooleanOptionalAction, default=None,
        help="integrate the moment closure (W, b, class means, within-class scatter; docs/theory.md "
        "§11), exact for the square loss, at a cost independent of N; --no-moments keeps H "
        "(default: the library's choice, moments where exact and H is large)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", help="directory for trajectory.csv and flow.png")
    p.add_argument(
        "--overwrite", action="store_true", help="replace the trajectory.csv and flow.png already in --out"
    )
    p.add_argument("--progress", action="store_true", help="show a progress bar on stderr")
    p.set_defaults(run=_run_flow)


class _MethodsHelpFormatter(argparse.HelpFormatter):
    """Fills ``{methods}``, ``{default_method}``, ``{max_nfev}`` and ``{max_seconds}`` in help texts
    from ``ufm.dynamics`` when help is shown, so that building the parser imports no SciPy."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = super()._get_help_string(action)
        if text and "{" in text:
            from . import dynamics

            text = text.format(
                methods=", ".join(dynamics.METHODS), default_method=dynamics.DEFAULT_METHOD,
                max_nfev=dynamics.DEFAULT_MAX_NFEV, max_seconds=dynamics.DEFAULT_MAX_SECONDS,
            )  # fmt: skip
        return text


# ``ufm flow --json`` keys (as before the canonical row) <- keys of the canonical row.
_FLOW_JSON = {
    "success": "success", "status": "flow_status", "message": "message", "method": "method",
    "t": "t", "n_grad_evals": "nfev", "grad_norm": "grad_norm", "loss": "loss", "eps": "eps",
    "nc1": "nc1", "cos_w": "cos_w", "nc2_equinorm_w": "nc2_equinorm_w", "nc3": "nc3",
    "geometry": "geometry", "rank": "rank", "hessian_min_eig": "hessian_min_eig",
    "critical_point": "critical_point",
}  # fmt: skip
_FLOW_JSON_CLOSED_FORM = {
    "eps": "cf_eps", "loss": "cf_loss", "cos_w": "cf_cos_w", "w_row_norm_sq": "cf_w_row_norm_sq",
    "geometry": "cf_geometry", "delta": "cf_delta",
}  # fmt: skip


def _run_flow(args: argparse.Namespace) -> int:
    import sys

    from ._validation import claim_outputs
    from .experiments.compare import compare_flow

    if args.out:  # before the flow, which a bad --out would otherwise lose
        claim_outputs(args.out, FLOW_FILES, overwrite=args.overwrite)
    comparison = compare_flow(
        _problem(args), args.dim, seed=args.seed, method=args.method, t_max=args.t_max, tol=args.tol,
        rtol=args.rtol, atol=args.atol, max_nfev=args.max_nfev, max_seconds=args.max_seconds,
        progress=args.progress, moments=args.moments,
    )  # fmt: skip
    row, r = comparison.row(), comparison.flow
    out = {key: row.get(canonical) for key, canonical in _FLOW_JSON.items()}
    out["closed_form"] = (
        None
        if comparison.optimum is None
        else {key: row[canonical] for key, canonical in _FLOW_JSON_CLOSED_FORM.items()}
    )
    out["closed_form_note"] = row["closed_form_note"]
    if args.out:
        out["files"] = _write_flow_outputs(args.out, r, comparison.optimum)
    if not r.success:
        print(f"ufm flow: {r.message}", file=sys.stderr)
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
    rank = f" (rank {out['rank']})" if out["geometry"] == "other" else ""
    print(f"  {'geometry':<12} {(out['geometry'] or '-') + rank:>16} {cf.get('geometry') or '-':>16}")
    eig = out["hessian_min_eig"]
    print(f"  {'hessian_min':<12} {'-' if eig is None else format(eig, '.3g'):>16}")
    unclassified = r.unavailable.get("critical", "not classified")
    print(f"  end point: {out['critical_point'] or 'not classified: ' + unclassified}")
    if comparison.optimum is None:
        print(f"  (no closed form: {row['closed_form_note']})")
    for path in out.get("files", []):
        print(f"  wrote {path}")
    return 0 if r.success else 1


# What ``ufm flow --out DIR`` writes.
FLOW_FILES = ("trajectory.csv", "flow.png")


def _write_flow_outputs(directory: str, r, opt) -> list[str]:
    """FLOW_FILES: trajectory.csv (t, loss, measures) and flow.png (measures and eps against t, closed
    form dashed)."""
    from pathlib import Path

    from .experiments.plots import plot_flow_measures
    from .tables import write_csv

    d = Path(directory)
    columns = {"t": r.t, "loss": r.loss, **r.metrics}
    rows = [{k: float(v[i]) for k, v in columns.items()} for i in range(len(r.t))]
    trajectory, figure = (d / name for name in FLOW_FILES)
    csv = write_csv(trajectory, rows)
    png = plot_flow_measures(r.t, r.metrics, figure, eps_closed_form=None if opt is None else opt.eps)
    return [str(csv), str(png)]
