"""The core commands of the ``recalib`` command line (``python -m recalib``).

    recalib demo --offline                         # the demo recalibration in-process
    recalib recalibrate --model in.pt2 --data cal.npz --out out.pt2 [--report r.json]
    recalib recalibrate --model in.onnx --data cal.npz --out out.onnx   # ONNX-native
    recalib export --model in.pt2 --out model.onnx --example data.npz

The core never imports the service. The ``recalib`` console script is
``service.cli:main``: it builds on :func:`build_parser` and adds ``serve`` and the demo
through the REST API (``recalib demo``). ``python -m recalib serve`` and
``python -m recalib demo`` without ``--offline`` say so in one line (exit code 2).

Errors in the input end the program with exit code 2 and a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import torch

from .errors import RecalibError
from .options import DEFAULTS, METHODS, MODES

__all__ = ["CliError", "Subcommands", "build_parser", "demo_offline", "main", "run"]

log = logging.getLogger("recalib")

Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
"""The ``COMMAND`` action of :func:`build_parser`, where a front end adds its commands."""


class CliError(Exception):
    """A bad command line or input file: reported in one line, exit code 2."""


def _load_model(path: Path, *, onnx_ok: bool = False) -> Any:
    """A ``.pt2`` ExportedProgram, or (with ``onnx_ok``) an ``.onnx`` model as a ModelProto."""
    if not path.is_file():
        raise CliError(f"model file {str(path)!r} does not exist")
    if onnx_ok and path.suffix == ".onnx":
        import onnx
        from google.protobuf.message import DecodeError

        try:
            return onnx.load(str(path))
        except (DecodeError, OSError, ValueError) as exc:
            raise CliError(f"could not load {path.name} with onnx.load: {exc}") from exc
    if path.suffix != ".pt2":
        also = " or an .onnx model" if onnx_ok else ""
        raise CliError(
            f"expected a .pt2 ExportedProgram (torch.export.save){also} (got {path.name!r})"
        )
    if not zipfile.is_zipfile(path):
        what = "an empty file" if path.stat().st_size == 0 else "not a zip archive"
        raise CliError(
            f"expected a .pt2 ExportedProgram (a zip archive written by torch.export.save) "
            f"(got {path.name!r}, {what})"
        )
    try:
        return torch.export.load(str(path))
    except (RuntimeError, ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise CliError(f"could not load {path.name} with torch.export.load: {exc}") from exc


def _model_dtype(program: Any) -> torch.dtype:
    for t in program.state_dict.values():
        if t.is_floating_point():
            return t.dtype  # type: ignore[no-any-return]
    return torch.float32


def _load_data(path: Path, key: str | None, dtype: torch.dtype) -> torch.Tensor:
    from .datafiles import load_input_array

    x = load_input_array(path, key)
    # Data files often hold float64 (NumPy's default) or float16: run the model in its dtype.
    return torch.from_numpy(np.ascontiguousarray(x)).to(dtype)


def _check_out(out: Path, *, onnx_model: bool) -> None:
    """Refuse an ``--out`` that cannot be written, before any work is done."""
    if onnx_model and out.suffix != ".onnx":
        raise CliError(
            f"an .onnx model is written as .onnx: expected --out y.onnx (got {out.name!r})"
        )
    if out.suffix not in (".pt2", ".onnx"):
        raise CliError(f"expected --out ending in .pt2 or .onnx (got {out.name!r})")
    if out.is_dir():
        raise CliError(f"expected --out to be a file (got {str(out)!r}, a directory)")


def _write_model(
    program: Any, out: Path, example: torch.Tensor, args: argparse.Namespace
) -> dict[str, Any]:
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".pt2":
        torch.export.save(program, str(out))
        return {"path": str(out)}
    if out.suffix == ".onnx":
        from .onnx.export import export_onnx

        rep = export_onnx(program, example[: max(2, min(len(example), 8))], out, opset=args.opset)
        return rep.to_dict()
    raise CliError(f"expected --out ending in .pt2 or .onnx (got {out.name!r})")


def _recal_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "method": args.method,
        "mode": args.mode,
        "prior_strength": args.prior_strength,
        "momentum": args.momentum,
        "max_passes": args.max_passes,
        "tol": args.tol,
        "max_samples": args.max_samples,
        "batch_size": args.batch_size,
        "layers": args.layers,
        "anchor": args.anchor,
        "allow_unconverged": args.allow_unconverged,
        "progress": not args.quiet,
    }


def _plan_kwargs(args: argparse.Namespace, convert: Any) -> dict[str, Any]:
    """``plan=`` and ``validation=`` for :func:`recalib.adapt` from ``--plan``/``--validation``."""
    kwargs: dict[str, Any] = {"plan": args.plan}
    if args.validation is not None:
        from .datafiles import load_arrays

        path = Path(args.validation)
        if not path.is_file():
            raise CliError(f"validation file {str(path)!r} does not exist")
        arrays = load_arrays(path)
        if "x" not in arrays or "y" not in arrays:
            raise CliError(
                f"expected a validation file with arrays 'x' (inputs) and 'y' (integer "
                f"labels) (got {sorted(arrays)})"
            )
        kwargs["validation"] = (convert(arrays["x"]), np.asarray(arrays["y"]))
    return kwargs


def _cmd_recalibrate(args: argparse.Namespace) -> int:
    from .adapt import adapt

    _check_out(Path(args.out), onnx_model=Path(args.model).suffix == ".onnx")
    if args.report is not None and Path(args.report).is_dir():
        raise CliError(f"expected --report to be a file (got {args.report!r}, a directory)")
    model = _load_model(Path(args.model), onnx_ok=True)
    if Path(args.model).suffix == ".onnx":
        report, written = _recalibrate_onnx_file(model, args)
    else:
        dtype = _model_dtype(model)
        x = _load_data(Path(args.data), args.key, dtype)

        def convert(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)

        report = adapt(model, x, **_plan_kwargs(args, convert), **_recal_kwargs(args))
        written = _write_model(model, Path(args.out), x, args)
    if args.report:
        payload = report.to_dict() | {"output": written}
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(payload, indent=2))
    if report.plan is not None:
        from .plans import PlanReport

        print(PlanReport.from_dict(report.plan).table())
    chosen = "" if report.plan is None else f", plan {report.plan['chosen']}"
    print(
        f"recalibrated {len(report.layers)} layers on {report.samples} samples "
        f"({report.method}/{report.mode}{chosen}, {report.passes} pass(es), "
        f"{report.seconds:.2f} s, mean symmetric KL old->new {report.mean_sym_kl:.4f}) "
        f"-> {args.out}"
    )
    return 0


def _recalibrate_onnx_file(model: Any, args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """``--model x.onnx``: ONNX-native recalibration, written to ``--out y.onnx``."""
    import onnx

    from .adapt import adapt_onnx
    from .datafiles import load_input_array

    out = Path(args.out)
    _check_out(out, onnx_model=True)
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        names = [i.name for i in inputs]
        raise CliError(f"expected an ONNX model with one input for a data file (got {names})")
    dtype = onnx.helper.tensor_dtype_to_np_dtype(inputs[0].type.tensor_type.elem_type)
    # Data files often hold float64 or float16: feed the model its input dtype.
    x = np.ascontiguousarray(load_input_array(Path(args.data), args.key), dtype=dtype)

    def convert(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a, dtype=dtype)

    proto, report = adapt_onnx(model, x, **_plan_kwargs(args, convert), **_recal_kwargs(args))
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(out))
    return report, {"path": str(out), "layers": len(report.layers)}


def _cmd_export(args: argparse.Namespace) -> int:
    _check_out(Path(args.out), onnx_model=False)
    program = _load_model(Path(args.model))
    x = _load_data(Path(args.example), args.key, _model_dtype(program))
    written = _write_model(program, Path(args.out), x, args)
    print(json.dumps(written, indent=2))
    return 0


def demo_offline(args: argparse.Namespace) -> int:
    """``recalib demo --offline``: recalibrate the bundled demo model in-process and print
    accuracy and drift before/after (``--method``, ``--mode``, ``--out``)."""
    from .adapt import adapt
    from .demo import ASSETS, accuracy
    from .plans import PlanReport

    program = _load_model(ASSETS / "demo_model.pt2")
    test = np.load(ASSETS / "demo_test.npz", allow_pickle=False)
    cal = np.load(ASSETS / "demo_calibration.npz", allow_pickle=False)["x"].astype(np.float32)
    xs, ys = test["x_source"].astype(np.float32), test["y_source"]
    xt, yt = test["x"].astype(np.float32), test["y"]
    before = (accuracy(program, xs, ys), accuracy(program, xt, yt))
    report = adapt(program, cal, method=args.method, mode=args.mode, progress=False)
    after = (accuracy(program, xs, ys), accuracy(program, xt, yt))
    print("recalib demo: DemoNet (4 BN layers) trained on the source camera, 512 unlabeled")
    print(f"images from a new camera for calibration ({args.method}/{args.mode}):\n")
    print(f"{'':24}{'before':>10}{'after':>10}")
    print(f"{'accuracy, new camera':24}{before[1]:>10.3f}{after[1]:>10.3f}")
    print(f"{'accuracy, source camera':24}{before[0]:>10.3f}{after[0]:>10.3f}")
    print(f"\n{'layer':20}{'mean shift':>12}{'log var':>10}{'sym KL':>10}")
    for lay in report.layers:
        print(f"{lay.name:20}{lay.mean_shift:>12.3f}{lay.log_var_ratio:>10.3f}{lay.sym_kl:>10.3f}")
    if report.plan is not None:
        print(f"\n{PlanReport.from_dict(report.plan).table()}")
    print(f"\n{report.passes} pass(es), {report.seconds:.2f} s. The model now fits the new camera;")
    print("keep the old statistics (a stat bank) for the old one.")
    if args.out:
        torch.export.save(program, args.out)
        print(f"wrote {args.out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if not args.offline:
        raise CliError(_service_only("demo"))
    return demo_offline(args)


def _service_only(command: str) -> str:
    """The one line for a service command given to ``python -m recalib``."""
    what = "`demo` without --offline" if command == "demo" else f"`{command}`"
    also = (
        "; `python -m recalib demo --offline` runs the demo in-process" if command == "demo" else ""
    )
    return (
        f"{what} runs the REST service, which `python -m recalib` leaves out (the core never "
        f"imports the service): run `recalib {command}` (the console script) or "
        f"`python -m service {command}`{also}"
    )


_DESCRIPTION = (
    "recalib: re-estimate the BatchNorm statistics of an exported model (.pt2 or .onnx) on "
    "unlabeled data from a new domain or export it to ONNX (the `recalib` command also runs "
    "the REST service). Errors in the input end the program with exit code 2 and a one-line "
    "reason on stderr."
)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: ...)`` after an option's help, except for flags and unset options
    (whose help says what happens without them)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action) or text


def _add_recal_options(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    p.add_argument(
        "--method",
        choices=list(METHODS),
        default=d.method,
        help="estimator of the new statistics: exact (all data), ema (running average), "
        "prior (the source statistics as a prior worth --prior-strength samples)",
    )
    p.add_argument(
        "--mode",
        choices=list(MODES),
        default=d.mode,
        help="train: one pass with batch statistics; eval: passes with the running "
        "statistics until they converge (--tol, --max-passes)",
    )
    p.add_argument(
        "--prior-strength",
        type=float,
        default=d.prior_strength,
        help="pseudo sample size N of the source statistics; required by --method prior",
    )
    p.add_argument("--momentum", type=float, default=d.momentum, help="EMA momentum (--method ema)")
    p.add_argument("--max-passes", type=int, default=d.max_passes, help="--mode eval: most passes")
    p.add_argument(
        "--tol",
        type=float,
        default=d.tol,
        help="--mode eval: converged when no statistic changes by more than this",
    )
    p.add_argument(
        "--max-samples",
        type=int,
        default=d.max_samples,
        help="use at most this many samples of --data (unset: all of them)",
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="samples per forward pass")
    p.add_argument(
        "--anchor",
        type=int,
        default=d.anchor,
        help="--mode eval: items of the lockstep first pass (unset: what memory holds, <= 1024)",
    )
    p.add_argument(
        "--allow-unconverged",
        action="store_true",
        default=d.allow_unconverged,
        help="--mode eval: write statistics that did not converge instead of refusing",
    )
    p.add_argument(
        "--layers",
        nargs="*",
        default=None,
        help="recalibrate only these layers (names or globs; unset: every BN layer)",
    )
    p.add_argument(
        "--plan",
        choices=["auto", "full", "source"],
        default="auto",
        help="auto: choose among source / full / first-k / prior plans by --validation, "
        "else by the label-free guard; full: every selected layer",
    )
    p.add_argument(
        "--validation",
        default=None,
        help="labeled .npz from the new domain (arrays x and y) to choose the plan by "
        "(unset: the label-free guard chooses)",
    )


def build_parser(*, description: str = _DESCRIPTION) -> tuple[argparse.ArgumentParser, Subcommands]:
    """The ``recalib`` parser with the core commands: recalibrate, export and demo (whose
    ``--offline`` form is the core's). Returns the parser and its subcommands, where a front
    end (``service.cli``) adds more; each command sets ``func``, which :func:`run` calls."""
    fmt = _HelpFormatter
    parser = argparse.ArgumentParser(prog="recalib", description=description, formatter_class=fmt)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    rec = sub.add_parser(
        "recalibrate",
        help="re-estimate BN statistics of a .pt2/.onnx model",
        description="Re-estimate the BatchNorm statistics of a .pt2 or .onnx model on "
        "unlabeled calibration data and write the recalibrated model.",
        formatter_class=fmt,
    )
    rec.add_argument("--model", required=True, help=".pt2 ExportedProgram or .onnx model")
    rec.add_argument("--data", required=True, help="calibration inputs: .npz, .npy or .safetensors")
    rec.add_argument(
        "--key",
        default=None,
        help="array name in the data file (unset: the only array, else x/input/inputs/data/images)",
    )
    rec.add_argument("--out", required=True, help="output .pt2 or .onnx (.onnx for .onnx input)")
    rec.add_argument(
        "--report", default=None, help="write the JSON report here (unset: no report file)"
    )
    rec.add_argument(
        "--opset", type=int, default=17, help="ONNX opset for .pt2 -> .onnx (.onnx keeps its own)"
    )
    rec.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    _add_recal_options(rec)
    rec.set_defaults(func=_cmd_recalibrate)

    exp = sub.add_parser(
        "export",
        help="export a .pt2 model to ONNX with BN kept",
        description="Export a .pt2 ExportedProgram to ONNX (or save it as .pt2) with its "
        "BatchNorm layers kept as BatchNormalization nodes.",
        formatter_class=fmt,
    )
    exp.add_argument("--model", required=True, help=".pt2 ExportedProgram")
    exp.add_argument(
        "--example", required=True, help="data file with example inputs (.npz, .npy, .safetensors)"
    )
    exp.add_argument(
        "--key", default=None, help="array name in the example file (unset: as for recalibrate)"
    )
    exp.add_argument("--out", required=True, help="output .onnx (or .pt2)")
    exp.add_argument("--opset", type=int, default=17, help="ONNX opset")
    exp.set_defaults(func=_cmd_export)

    demo = sub.add_parser(
        "demo",
        help="start the service and run register -> infer -> recalibrate -> promote -> infer "
        "on the bundled demo model and data (accuracy and drift before/after), then keep "
        "serving (the `recalib` command); --offline runs the same recalibration in-process "
        "without the service",
        description="Run the bundled demo: through the REST API of a fresh service (the "
        "`recalib` command), or in-process with --offline.",
        formatter_class=fmt,
    )
    demo.add_argument("--offline", action="store_true", help="in-process, no service")
    demo.add_argument(
        "--method",
        choices=["exact", "ema", "prior"],
        default="exact",
        help="--offline: estimator (as for recalibrate)",
    )
    demo.add_argument(
        "--mode",
        choices=["train", "eval"],
        default="train",
        help="--offline: recalibration mode (as for recalibrate)",
    )
    demo.add_argument("--out", default=None, help="--offline: save the recalibrated .pt2 here")
    demo.set_defaults(func=_cmd_demo)
    return parser, sub


def _parser() -> argparse.ArgumentParser:
    """``python -m recalib``: the core commands, and ``serve`` only to say where it is."""
    parser, sub = build_parser()
    sub.add_parser(
        "serve",
        add_help=False,  # `serve --help` gets the one line too
        help="run the REST service: the `recalib` command (python -m service), not python -m "
        "recalib",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the parsed command ``args.func(args)``: bad input (:class:`CliError`,
    :class:`~recalib.errors.RecalibError`, an unreadable or unwritable file) is one line on
    stderr and exit code 2."""
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    try:
        return int(args.func(args))
    except (CliError, RecalibError) as exc:
        return _fail(str(exc))
    except OSError as exc:  # a file that cannot be read or written (permissions, disk full)
        return _fail(str(exc))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m recalib``: the core commands (recalibrate, export, demo --offline)."""
    parser = _parser()
    # Known args only: the service commands' options are not the core's, and their one
    # line (use the `recalib` command) must come before argparse refuses those options.
    args, extra = parser.parse_known_args(argv)
    if args.command == "serve":
        return _fail(_service_only("serve"))
    if args.command == "demo" and not args.offline:
        return _fail(_service_only("demo"))
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return run(args)


def _fail(reason: str) -> int:
    print(f"recalib: error: {_one_line(reason)}", file=sys.stderr)
    return 2


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
