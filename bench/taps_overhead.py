"""Overhead of the in-graph drift taps on ONNX Runtime CPU, and whether Conv+BN still fuses.

Builds a small ResNet-ish CNN (9 BatchNorm layers, 32x32 input), exports it with BN kept,
and times ORT sessions side by side at one batch size: untapped, tapped at the BN inputs
(``source="input"``), tapped with ``source="auto"`` (BN outputs mapped back where that
keeps ORT's Conv+BN fusion; pooled form), the same with ``reduce="sum"`` (the summed form
every layer had before the pooled one), centred taps (summed), taps on 3 of the 9 layers,
and a lower bound for any tap (a GlobalAveragePool on each BN output). Rounds are
interleaved (order rotated each round, spinning of idle ORT workers off); median and
minimum are reported. The graph ORT optimises at level 2 (``optimized_model_filepath``)
is read back to count the BN nodes left unfused; "ORT nodes" counts the nodes of the graph
it runs at the timed level.

Run: ``python bench/taps_overhead.py [--batch 32] [--threads 2] [--repeats 40]``.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import onnxruntime as ort
import torch
from bench_models import resnet
from onnx import TensorProto, helper
from torch import nn

from recalib.onnx.taps import add_drift_taps

LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def build_model() -> nn.Module:
    torch.manual_seed(0)
    model = resnet([(32, 32, 1), (32, 64, 2), (64, 128, 2)])
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            state = {
                "running_mean": torch.rand(c, generator=gen) - 0.5,
                "running_var": torch.rand(c, generator=gen) * 1.5 + 0.5,
                "weight": torch.rand(c, generator=gen) + 0.5,
                "bias": torch.rand(c, generator=gen) - 0.5,
            }
            m.load_state_dict(state, strict=False)
    return model.eval()


def export(model: nn.Module, size: int) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.randn(1, 3, size, size),),
            cast(Any, buf),
            dynamo=False,
            do_constant_folding=False,
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}},
        )
    return onnx.load_from_string(buf.getvalue())


def session(
    model: onnx.ModelProto, threads: int, level: ort.GraphOptimizationLevel
) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # Idle sessions' spinning workers would steal the 2 cores from the session being timed.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def optimized_ops(model: onnx.ModelProto, level: ort.GraphOptimizationLevel) -> Counter[str]:
    """Op types in the graph ORT runs after optimising at ``level``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optimized.onnx"
        opts = ort.SessionOptions()
        opts.graph_optimization_level = level
        opts.optimized_model_filepath = str(path)
        opts.log_severity_level = 3  # NCHWc "hardware specific" serialization warning
        ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def pooled_bn_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Lower bound for any tap: one GlobalAveragePool per BN output, as extra outputs.

    GlobalAveragePool runs in ORT's NCHWc layout (no reorder) and reads each tensor once,
    so what it costs is mostly the fusions an extra consumer breaks.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, node in enumerate([n for n in model.graph.node if n.op_type == "BatchNormalization"]):
        name = f"pooled_{i}"
        out.graph.node.append(helper.make_node("GlobalAveragePool", [node.output[0]], [name]))
        out.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return out


def first_bn_of_blocks(model: onnx.ModelProto) -> list[str]:
    """The first BN of each residual block (3 of the 9)."""
    names = [n.name for n in model.graph.node if n.op_type == "BatchNormalization"]
    return [name for name in names if "/bn1/" in name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--level", choices=sorted(LEVELS), default="all", help="ORT graph optimisation"
    )
    parser.add_argument("--repeats", type=int, default=40, help="interleaved rounds")
    args = parser.parse_args()

    base = export(build_model(), args.size)
    variants = {
        "untapped": base,
        "taps: input": add_drift_taps(base, source="input"),
        "taps: auto": add_drift_taps(base, source="auto"),
        "taps: auto, summed": add_drift_taps(base, source="auto", reduce="sum"),
        "taps: auto, centred": add_drift_taps(base, source="auto", center=True),
        "taps: auto, 3 layers": add_drift_taps(base, layers=first_bn_of_blocks(base)),
        "floor: pool BN outputs": pooled_bn_outputs(base),
    }
    n_bn = sum(node.op_type == "BatchNormalization" for node in base.graph.node)
    x = np.random.default_rng(0).standard_normal((args.batch, 3, args.size, args.size))
    feed = {"x": x.astype(np.float32)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    # Conv+BN fusion is a level-1 rewrite: count the BN nodes left at level 2 (at level 3 the
    # NCHWc transformer turns unfused BNs into depthwise NchwcConvs, which hides them).
    extended = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    bn_left = {n: optimized_ops(m, extended)["BatchNormalization"] for n, m in variants.items()}
    nodes_all = {n: sum(optimized_ops(m, LEVELS[args.level]).values()) for n, m in variants.items()}
    level = LEVELS[args.level]
    sessions = {name: session(model, args.threads, level) for name, model in variants.items()}
    for sess in sessions.values():
        for _ in range(3):
            sess.run(None, feed)
    names = list(sessions)
    for r in range(args.repeats):
        # Rotate the order so no session always runs right after the same neighbour.
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sessions[name].run(None, feed)  # re-warm caches after the other sessions ran
            t0 = time.perf_counter()
            sessions[name].run(None, feed)
            times[name].append(time.perf_counter() - t0)

    print(
        f"batch {args.batch}, {args.size}x{args.size}, {n_bn} BN layers, "
        f"intra_op_num_threads={args.threads}, ORT {ort.__version__} level={args.level}, "
        f"{args.repeats} interleaved rounds"
    )
    med = {name: statistics.median(ts) for name, ts in times.items()}
    best = {name: min(ts) for name, ts in times.items()}
    header = (
        f"{'session':<22}{'median ms':>10}{'ratio':>7}{'min ms':>8}{'ratio':>7}{'1-in-5':>8}"
        f"{'BN unfused':>12}{'ORT nodes':>11}"
    )
    print(header)
    print("-" * len(header))
    for name in times:
        ratio = med[name] / med["untapped"]
        print(
            f"{name:<22}{med[name] * 1e3:>10.2f}{ratio:>7.3f}"
            f"{best[name] * 1e3:>8.2f}{best[name] / best['untapped']:>7.3f}"
            f"{1.0 + (ratio - 1.0) / 5:>8.3f}{bn_left[name]:>7}/{n_bn:<4}{nodes_all[name]:>11}"
        )
    print(
        "1-in-5: ratio when one batch in five goes to the tapped session "
        "(ORT computes every output of a session whether it is fetched or not)."
    )
    for name, left in bn_left.items():
        print(f"Conv+BN fusion in {name!r}: {'yes' if left == 0 else f'no ({left} BN left)'}")


if __name__ == "__main__":
    main()
