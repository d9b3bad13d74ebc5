"""Stat banks in the graph (issue 13): throughput, memory and bank switching on ORT CPU.

One ResNet-ish CNN (9 BN layers, ``--size`` input; the model of ``taps_overhead.py``),
batch-1 requests, ``session.run`` from ``c`` Python threads on one session
(``intra_op_num_threads=--threads``). Cases, timed side by side in interleaved rounds
(median requests/s per case):

* ``original``: the exported model (ORT folds each BN into its Conv);
* ``banks K=k``: the bank graph (``add_bank_inputs``, routing built in) fed ``k`` banks,
  a random explicit bank per request; ``K=1`` is the cost of the rewrite alone;
* ``banks K=max, auto``: every request routed in-graph (``bank_index = -1``);
* ``banks K=max, no routing``: the graph built with ``route_layers=0``, explicit banks;
* ``banks K=max, same bank``: one bank for every request (against random: switching).

Each request builds its feed with ``BankTables.feed`` (what a server would do). RSS
growth is ``VmRSS`` after adding ``max`` banks one at a time (each bank built, added and
dropped) and serving requests from all of them, minus ``VmRSS`` before, against the banks'
own bytes (``running_mean`` + ``running_var`` float32).

Run: ``python bench/stat_banks.py [--size 32] [--banks 1,100,1000] [--seconds 2]
[--rounds 3] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import onnxruntime as ort
from taps_overhead import LEVELS, build_model, export, session

from recalib.onnx.banks import AUTO, BankTables, add_bank_inputs
from recalib.onnx.names import bn_node_stats

Feed = Callable[[int], dict[str, Any]]


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def random_bank(source: dict[str, tuple[np.ndarray, np.ndarray]], seed: int) -> dict[str, Any]:
    """The source statistics shifted and scaled per channel: a plausible other domain."""
    rng = np.random.default_rng(seed)
    return {
        key: (
            (m + rng.normal(0.0, 0.3, m.shape)).astype(np.float32),
            (v * rng.uniform(0.5, 2.0, v.shape)).astype(np.float32),
        )
        for key, (m, v) in source.items()
    }


def throughput(
    sess: ort.InferenceSession, feed: Feed, concurrency: int, seconds: float
) -> tuple[float, float]:
    """Requests/s (wall) and process CPU seconds per request of ``concurrency`` threads each
    running batch-1 requests for ``seconds``."""
    counts = [0] * concurrency
    stop = time.perf_counter() + seconds

    def worker(i: int) -> None:
        n = 0
        while time.perf_counter() < stop:
            sess.run(None, feed(n * concurrency + i))
            n += 1
        counts[i] = n

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    t0, cpu0 = time.perf_counter(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = sum(counts)
    return done / (time.perf_counter() - t0), (time.process_time() - cpu0) / max(done, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--banks", default="1,100,1000", help="bank counts K to time")
    parser.add_argument("--seconds", type=float, default=2.0, help="per case and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    parser.add_argument("--concurrency", default="1,16")
    args = parser.parse_args()
    counts = [int(k) for k in args.banks.split(",")]
    levels = [int(c) for c in args.concurrency.split(",")]
    kmax = max(counts)

    base = export(build_model(), args.size)
    routed, plain = add_bank_inputs(base), add_bank_inputs(base, route_layers=0)
    source = bn_node_stats(base)
    channels = sum(m.size for m, _ in source.values())
    bank_bytes = channels * 2 * 4
    x = np.random.default_rng(0).standard_normal((1, 3, args.size, args.size)).astype(np.float32)
    level = LEVELS["all"]
    sessions = {"original": session(base, args.threads, level)}
    sessions["banks"] = session(routed, args.threads, level)
    sessions["plain"] = session(plain, args.threads, level)
    warm = {
        "original": {"x": x},
        "banks": {"x": x, **BankTables(routed).feed([0])},
        "plain": {"x": x, **BankTables(plain).feed([0])},
    }
    for name, sess in sessions.items():  # first-run allocations are not the banks' cost
        for _ in range(3):
            sess.run(None, warm[name])

    # RSS: add kmax - 1 banks one at a time, then serve requests from all of them.
    before = rss_bytes()
    big = BankTables(routed)
    for i in range(1, kmax):
        big.add(random_bank(source, i))
    order = np.random.default_rng(1).integers(0, kmax, 4096)
    for i in range(256):
        sessions["banks"].run(None, {"x": x, **big.feed(order[i : i + 1])})
    growth = rss_bytes() - before
    plain_big = BankTables(plain)
    for i in range(1, kmax):
        plain_big.add(random_bank(source, i))

    tables = {k: BankTables(routed) for k in counts}
    for k, t in tables.items():
        for i in range(1, k):
            t.add(random_bank(source, i))
    index = {k: [order[j : j + 1] % k for j in range(len(order))] for k in counts}
    same = np.array([kmax // 2])
    auto = np.array([AUTO])

    def explicit(t: BankTables, k: int) -> Feed:
        return lambda n: {"x": x, **t.feed(index[k][n % len(order)])}

    cases: dict[str, tuple[ort.InferenceSession, Feed]] = {
        "original": (sessions["original"], lambda _n: {"x": x}),
    }
    for k in counts:
        cases[f"banks K={k}"] = (sessions["banks"], explicit(tables[k], k))
    cases[f"banks K={kmax}, auto"] = (sessions["banks"], lambda _n: {"x": x, **big.feed(auto)})
    cases[f"banks K={kmax}, no routing"] = (sessions["plain"], explicit(plain_big, kmax))
    cases[f"banks K={kmax}, same bank"] = (sessions["banks"], lambda _n: {"x": x, **big.feed(same)})
    for sess, feed in cases.values():
        for n in range(5):
            sess.run(None, feed(n))

    rates: dict[tuple[str, int], list[float]] = {(c, lv): [] for c in cases for lv in levels}
    cpu: dict[tuple[str, int], list[float]] = {(c, lv): [] for c in cases for lv in levels}
    names = list(cases)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            for lv in levels:
                rate, per_request = throughput(*cases[name], lv, args.seconds)
                rates[name, lv].append(rate)
                cpu[name, lv].append(per_request)

    med = {key: statistics.median(v) for key, v in rates.items()}
    # CPU per request is what a shared machine measures best (other work moves wall time);
    # at saturation on dedicated cores, throughput is cores / CPU per request.
    per_req = {key: statistics.median(v) for key, v in cpu.items()}
    print(
        f"batch 1, {args.size}x{args.size}, {len(source)} BN layers, {channels} channels "
        f"(a bank: {bank_bytes} B), ORT {ort.__version__} intra_op_num_threads={args.threads}, "
        f"{args.rounds} interleaved rounds of {args.seconds:g} s, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print("ratios: throughput from CPU per request, vs the original model and vs K=1")
    header = f"{'case':<30}" + "".join(
        f"{f'c={lv} req/s':>12}{'CPU ms':>8}{'vs orig':>8}{'vs K=1':>8}" for lv in levels
    )
    print(header)
    print("-" * len(header))
    first = f"banks K={counts[0]}"
    for name in names:
        row = f"{name:<30}"
        for lv in levels:
            c = per_req[name, lv]
            orig, one = per_req["original", lv] / c, per_req[first, lv] / c
            row += f"{med[name, lv]:>12.1f}{c * 1e3:>8.3f}{orig:>8.3f}{one:>8.3f}"
        print(row)
    for lv in levels:
        auto_ratio = per_req[f"banks K={kmax}", lv] / per_req[f"banks K={kmax}, auto", lv]
        switch = per_req[f"banks K={kmax}, same bank", lv] / per_req[f"banks K={kmax}", lv]
        print(
            f"c={lv}: throughput auto / explicit {auto_ratio:.3f}; "
            f"random bank / same bank {switch:.3f}"
        )
    print(
        f"RSS growth with {kmax} banks: {growth / 1e6:.2f} MB; the banks' own bytes "
        f"{kmax * bank_bytes / 1e6:.2f} MB (ratio {growth / (kmax * bank_bytes):.2f}); "
        f"tables fed {big.nbytes / 1e6:.2f} MB"
    )


if __name__ == "__main__":
    main()
