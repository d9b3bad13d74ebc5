"""Tests of the ``recalib`` command line, run in-process through ``main(argv)``."""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import recalib
from recalib.cli import _parser, main
from recalib.demo import ASSETS
from recalib.onnx.names import bn_node_stats


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The bundled demo model, 64 calibration images, and a NaN-poisoned copy of them."""
    root = tmp_path_factory.mktemp("cli")
    cal = np.load(ASSETS / "demo_calibration.npz")["x"][:64]  # float16 in the file
    np.savez(root / "cal.npz", x=cal)
    bad = cal.astype(np.float32)
    bad[40, 1, 3, 3] = np.nan
    np.savez(root / "nan.npz", x=bad)
    return {"model": ASSETS / "demo_model.pt2", "cal": root / "cal.npz", "nan": root / "nan.npz"}


def _stderr_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("recalib: error: ")
    return err


def test_demo_prints_accuracies(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--offline"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("accuracy, new camera"))
    before, after = (float(v) for v in row.split()[-2:])
    assert 0.0 <= before < after <= 1.0
    assert "accuracy, source camera" in out


def test_recalibrate_pt2_to_pt2_with_report(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, rep = tmp_path / "out.pt2", tmp_path / "r.json"
    argv = ["recalibrate", "--model", str(files["model"]), "--data", str(files["cal"])]
    assert main([*argv, "--out", str(out), "--report", str(rep), "--quiet"]) == 0

    report = json.loads(rep.read_text())
    assert report["output"] == {"path": str(out)}
    assert [lay["name"] for lay in report["layers"]] == [
        "features.0.1",
        "features.1.1",
        "features.2.1",
        "head.2",
    ]
    assert report["samples"] == 64
    before = torch.export.load(str(files["model"])).state_dict
    after = torch.export.load(str(out)).state_dict
    assert not torch.equal(before["features.0.1.running_mean"], after["features.0.1.running_mean"])
    assert "recalibrated 4 layers on 64 samples" in capsys.readouterr().out


def test_recalibrate_pt2_to_onnx_then_onnx_to_onnx(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    argv = ["--data", str(files["cal"]), "--quiet", "--mode", "eval"]
    rep = tmp_path / "a.json"
    assert main(["recalibrate", "--model", str(files["model"]), *argv, "--out", str(first),
                 "--report", str(rep)]) == 0  # fmt: skip
    exported = json.loads(rep.read_text())["output"]
    assert exported["bn_nodes"] == 4
    assert exported["path"] == str(first)

    rep2 = tmp_path / "b.json"
    assert main(["recalibrate", "--model", str(first), *argv, "--out", str(second),
                 "--report", str(rep2)]) == 0  # fmt: skip
    report = json.loads(rep2.read_text())
    assert report["output"] == {"path": str(second), "layers": 4}
    assert report["mode"] == "eval"
    # Recalibrating recalibrated statistics on the same data is (nearly) a fixed point.
    stats_a, stats_b = bn_node_stats(onnx.load(str(first))), bn_node_stats(onnx.load(str(second)))
    for key, (mean, var) in stats_a.items():
        np.testing.assert_allclose(stats_b[key][0], mean, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(stats_b[key][1], var, rtol=1e-3)
    assert report["totals"]["mean_sym_kl"] < 1e-4
    assert str(second) in capsys.readouterr().out


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"model": "missing.pt2"}, "does not exist"),
        ({"model": "model.txt"}, "expected a .pt2 ExportedProgram"),
        ({"data": "missing.npz"}, "does not exist"),
        ({"data": "cal.txt"}, "expected a data file ending in .npz, .npy, .safetensors"),
        ({"data": "nan"}, "NaN/Inf in the input of layer 'features.0.1' at batch 0"),
        ({"out": "out.txt"}, "expected --out ending in .pt2 or .onnx"),
        ({"model": "junk.pt2"}, "(got 'junk.pt2', not a zip archive)"),
        ({"model": "empty.pt2"}, "(got 'empty.pt2', an empty file)"),
        ({"model": "zip.pt2"}, "could not load zip.pt2 with torch.export.load"),
        ({"data": "empty.npz"}, "expected a .npz file (a zip archive of .npy arrays"),
        ({"data": "junk.npz"}, "(got 'junk.npz', 7 bytes that are not a zip archive)"),
        ({"data": "text_member.npz"}, "members that are not .npy arrays: ['a.txt']"),
        ({"data": "empty.npy"}, "expected a .npy file (np.save"),
        ({"data": "junk.npy"}, "(got 'junk.npy', no .npy header)"),
        ({"data": "junk.safetensors"}, "could not read junk.safetensors as .safetensors"),
    ],
)
def test_bad_pt2_input_exits_2_with_one_line(
    files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: dict[str, str],
    reason: str,
) -> None:
    (tmp_path / "model.txt").write_text("not a model")
    (tmp_path / "cal.txt").write_text("not data")
    for name in ("junk.pt2", "junk.npz", "junk.npy", "junk.safetensors"):
        (tmp_path / name).write_bytes(b"garbage")
    for name in ("empty.pt2", "empty.npz", "empty.npy"):
        (tmp_path / name).write_bytes(b"")
    with zipfile.ZipFile(tmp_path / "text_member.npz", "w") as z:
        z.writestr("a.txt", "not an array")
    (tmp_path / "zip.pt2").write_bytes(files["cal"].read_bytes())  # a zip, not a .pt2
    paths = {"model": str(files["model"]), "data": str(files["cal"]), "out": "out.pt2"}
    for key, value in change.items():
        paths[key] = str(files[value]) if value in files else str(tmp_path / value)
    argv = ["recalibrate", "--model", paths["model"], "--data", paths["data"]]
    assert main([*argv, "--out", str(tmp_path / paths["out"]), "--quiet"]) == 2
    line = _stderr_line(capsys)
    assert reason in line
    assert "pickled" not in line


@pytest.mark.parametrize(
    ("model", "out", "reason"),
    [
        ("model", "o.txt", "expected --out ending in .pt2 or .onnx (got 'o.txt')"),
        ("onnx", "o.pt2", "expected --out y.onnx (got 'o.pt2')"),
        ("model", "dir.pt2", "expected --out to be a file"),
    ],
)
def test_bad_out_is_refused_before_any_work(
    files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    model: str,
    out: str,
    reason: str,
) -> None:
    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("recalibrated before the --out check")

    module = importlib.import_module("recalib.adapt")  # recalib.adapt is also a function
    monkeypatch.setattr(module, "adapt", no_work)
    monkeypatch.setattr(module, "adapt_onnx", no_work)
    (tmp_path / "dir.pt2").mkdir()
    (tmp_path / "m.onnx").write_bytes(b"\x08garbage")  # --out is checked before loading
    path = files["model"] if model == "model" else tmp_path / "m.onnx"
    argv = ["recalibrate", "--model", str(path), "--data", str(files["cal"]), "--quiet"]
    assert main([*argv, "--out", str(tmp_path / out)]) == 2
    assert reason in _stderr_line(capsys)


def test_export_refuses_a_bad_out_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["export", "--model", str(tmp_path / "missing.pt2"), "--example", "x.npz"]
    assert main([*argv, "--out", str(tmp_path / "o.txt")]) == 2
    assert "expected --out ending in .pt2 or .onnx (got 'o.txt')" in _stderr_line(capsys)


def test_unwritable_report_exits_2_with_one_line(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("a file, not a directory")
    argv = ["recalibrate", "--model", str(files["model"]), "--data", str(files["cal"])]
    argv += ["--out", str(tmp_path / "o.pt2"), "--quiet", "--max-samples", "8"]
    assert main([*argv, "--report", str(tmp_path / "file" / "r.json")]) == 2
    assert "file" in _stderr_line(capsys)


@pytest.mark.parametrize(
    "argv",
    [["serve"], ["serve", "--host", "0.0.0.0"], ["serve", "--help"], ["demo"], ["demo", "--exit"]],
)
def test_service_commands_point_to_the_recalib_command_in_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    assert main(argv) == 2
    line = _stderr_line(capsys)
    assert f"run `recalib {argv[0]}` (the console script)" in line
    assert f"`python -m service {argv[0]}`" in line


def test_unknown_options_are_still_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["demo", "--offline", "--bogus"])
    assert stop.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def _imported_modules(tree: ast.AST) -> set[str]:
    """Modules named by ``import``/``from`` and by string arguments of calls (``__import__``,
    ``importlib.import_module``)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Call):
            args = [a.value for a in node.args if isinstance(a, ast.Constant)]
            names.update(a for a in args if isinstance(a, str))
    return names


def test_the_core_never_imports_the_service() -> None:
    root = Path(recalib.__file__).parent
    for path in sorted(root.rglob("*.py")):
        names = _imported_modules(ast.parse(path.read_text(), filename=str(path)))
        service = sorted(n for n in names if n == "service" or n.startswith("service."))
        assert not service, (path, service)


def test_help_is_plain_text_with_a_help_and_default_for_every_option(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    top = capsys.readouterr().out
    assert "``" not in top and "re-estimate the BatchNorm statistics" in top

    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, cmd in sub.choices.items():
        for action in cmd._actions:
            assert action.help, (name, action.option_strings)
        text = cmd.format_help()
        assert "``" not in text, name
    rec = sub.choices["recalibrate"].format_help()
    for shown in ("(default: 64)", "(default: exact)", "(default: auto)", "(default: 17)"):
        assert shown in rec, shown


def test_progress_bar_has_a_total_when_the_batches_are_known() -> None:
    from recalib.run_options import batch_total, progress_bar

    assert batch_total(torch.zeros(130, 3), 64) == 3
    assert batch_total(np.zeros((130, 3)), 64, max_samples=100, passes=2) == 4
    assert batch_total([torch.zeros(2, 3)] * 5, 64) == 5  # an iterable of batches
    assert batch_total(iter([torch.zeros(2, 3)]), 64) is None  # one-shot: unknown
    bar = progress_bar(True, "recalibrate", total=3)
    try:
        assert bar.total == 3
    finally:
        bar.close()
    assert progress_bar(False, "recalibrate", total=3) is None
    assert progress_bar(True, "x").total is None


@pytest.fixture(scope="module")
def demo_onnx(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "demo.onnx"
    argv = ["recalibrate", "--model", str(files["model"]), "--data", str(files["cal"])]
    assert main([*argv, "--out", str(path), "--quiet", "--max-samples", "8"]) == 0
    return path


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"data": "nan"}, "NaN/Inf in the input of layer 'features.0.1' at batch 0"),
        ({"out": "out.pt2"}, "expected --out y.onnx"),
        ({"model": "junk.onnx"}, "could not load junk.onnx"),
    ],
)
def test_bad_onnx_input_exits_2_with_one_line(
    files: dict[str, Path],
    demo_onnx: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: dict[str, str],
    reason: str,
) -> None:
    (tmp_path / "junk.onnx").write_bytes(b"\x08garbage")
    capsys.readouterr()
    paths = {"model": str(demo_onnx), "data": str(files["cal"]), "out": "out.onnx"}
    for key, value in change.items():
        paths[key] = str(files[value]) if value in files else str(tmp_path / value)
    argv = ["recalibrate", "--model", paths["model"], "--data", paths["data"]]
    assert main([*argv, "--out", str(tmp_path / paths["out"]), "--quiet"]) == 2
    assert reason in _stderr_line(capsys)
    assert not (tmp_path / paths["out"]).exists()


def test_recalibrate_prints_the_plan_table_and_takes_a_validation_file(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    test = np.load(ASSETS / "demo_test.npz")
    np.savez(tmp_path / "val.npz", x=test["x"][:64], y=test["y"][:64])
    out, rep = tmp_path / "out.pt2", tmp_path / "r.json"
    argv = ["recalibrate", "--model", str(files["model"]), "--data", str(files["cal"])]
    argv += ["--validation", str(tmp_path / "val.npz"), "--report", str(rep)]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split()[:3] == ["plan", "target", "val"]
    assert "<==" in printed and "validation: " in printed
    plan = json.loads(rep.read_text())["plan"]
    assert plan["criterion"] == "validation" and plan["validation_samples"] == 64
    chosen = next(c for c in plan["candidates"] if c["plan"] == plan["chosen"])
    assert chosen["kind"] != "source" and chosen["val_gain"] > 0.3  # the new camera


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (["--tol", "-1"], "expected tol >= 0 (got -1.0)"),
        (["--max-passes", "0"], "expected max_passes >= 1 (got 0)"),
        (["--validation", "val_no_y.npz"], "expected a validation file with arrays 'x'"),
        (["--validation", "missing.npz"], "does not exist"),
        (["--method", "prior"], "method='prior' needs prior_strength"),
        (["--validation", "empty.npz"], "expected a .npz file (a zip archive"),
    ],
)
def test_bad_options_exit_2_with_one_line(
    files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    reason: str,
) -> None:
    np.savez(tmp_path / "val_no_y.npz", x=np.zeros((4, 3, 16, 16), np.float32))
    (tmp_path / "empty.npz").write_bytes(b"")
    extra = [str(tmp_path / e) if e.endswith(".npz") else e for e in extra]
    argv = ["recalibrate", "--model", str(files["model"]), "--data", str(files["cal"])]
    assert main([*argv, "--out", str(tmp_path / "o.pt2"), "--quiet", *extra]) == 2
    assert reason in _stderr_line(capsys)
    assert not (tmp_path / "o.pt2").exists()
