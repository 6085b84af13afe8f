"""Metric ingest into the local SQLite store, three writers side by side, and a GPU-speed probe.

Ingest (points stored per second, from the first point handed over to the last one stored):
  (1) the metric writer process through MLflow's `log_batch` (the pipeline's writer before the fast
      path, and still its path to tracking servers);
  (2) MLflow's own asynchronous logging, `log_batch(..., synchronous=False)` from the training process,
      waited for with `mlflow.flush_async_logging()`;
  (3) the metric writer process with bulk inserts (pipeline.metric_store).
Each gets the trainer's blocks (100 steps × 8 keys) for one run of a store that already holds
`--prefill` points (a study's worth), the variants interleaved `--repeats` times in one process.

GPU-speed probe: the training loop's tracking work without a model, i.e. per step one (8,) tensor
written into the epoch's buffer, every `flush_every` steps one host copy and hand-over to the writer
(train._send), and a wait for the store at each "epoch" end as before a checkpoint; sustained steps/s
over the whole run, the final wait included. Replaces the "Metric ingest" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib import machine, write_section

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SECTION = "## Metric ingest: writers side by side, and a GPU-speed probe, CPU"
KEYS = ["train/loss", "train/recon_nll", "train/kl", "train/elbo", "train/beta", "train/grad_norm", "train/lr",
        "train/kl_raw"]
STEPS_PER_BLOCK = 100


def _columns(first: int, n: int) -> list:
    return [(k, first, [float(first + i) * 1e-3 + j for i in range(n)]) for j, k in enumerate(KEYS)]


def _prefill(points: int) -> None:
    """A study's worth of stored points, through the fast path (the store's size changes index costs)."""
    from pipeline import paths, tracking
    from pipeline.metric_store import SqliteMetricStore

    c = tracking.client()
    exp = tracking.get_or_create_experiment("bench-prefill", c)
    store = SqliteMetricStore(paths.mlflow_db())
    steps_per_run = 10_000
    for _ in range(max(1, points // (steps_per_run * len(KEYS)))):
        run_id = c.create_run(exp).info.run_id
        for first in range(0, steps_per_run, 2_000):
            store.write([(run_id, 1, _columns(first, 2_000))])
    store.close()


def ingest_writer(points: int, fast: bool) -> float:
    from pipeline import tracking

    tracking._writer_for(tracking.tracking_uri(), fast=fast)
    run = tracking.MlflowRun("bench-ingest", run_name=f"writer-{'fast' if fast else 'api'}")
    _started(run)
    blocks = [_columns(first, STEPS_PER_BLOCK) for first in range(0, points // len(KEYS), STEPS_PER_BLOCK)]
    t0 = time.perf_counter()
    for columns in blocks:
        run.log_columns(columns)
    run.flush()
    rate = len(blocks) * STEPS_PER_BLOCK * len(KEYS) / (time.perf_counter() - t0)
    run.end()
    _check_stored(run.run_id, len(blocks) * STEPS_PER_BLOCK)
    return rate


def _started(run) -> None:
    """Wait until the writer process is up (spawning it and importing MLflow takes seconds, once per trainer)."""
    run.log_metrics([("bench/warmup", 0.0, 0)])
    run.flush()


def ingest_async(points: int) -> float:
    import mlflow
    from mlflow.entities import Metric

    from pipeline import tracking

    c = tracking.client()
    run_id = c.create_run(tracking.get_or_create_experiment("bench-ingest", c), run_name="mlflow-async").info.run_id
    c.log_batch(run_id, metrics=[Metric("bench/warmup", 0.0, 0, 0)], synchronous=False)  # starts its thread pool
    mlflow.flush_async_logging()
    blocks = [_columns(first, STEPS_PER_BLOCK) for first in range(0, points // len(KEYS), STEPS_PER_BLOCK)]
    t0 = time.perf_counter()
    for columns in blocks:
        now = int(time.time() * 1000)
        c.log_batch(run_id, metrics=[Metric(k, v, now, first + i) for k, first, vals in columns
                                     for i, v in enumerate(vals)], synchronous=False)
    mlflow.flush_async_logging()
    rate = len(blocks) * STEPS_PER_BLOCK * len(KEYS) / (time.perf_counter() - t0)
    c.set_terminated(run_id)
    _check_stored(run_id, len(blocks) * STEPS_PER_BLOCK)
    return rate


def _check_stored(run_id: str, steps: int) -> None:
    from pipeline import tracking

    for key in (KEYS[0], KEYS[-1]):
        got = [s for s, _ in tracking.metric_history(run_id, key)]
        if got != list(range(steps)):
            raise SystemExit(f"bench: run {run_id} holds {len(got)} points of {key}, not the {steps} sent")


def gpu_probe(steps: int, fast: bool, flush_every: int = 100, steps_per_epoch: int = 10_000) -> float:
    """Sustained steps/s of the training loop's tracking work alone, every point stored at the end."""
    import torch

    from pipeline import tracking
    from pipeline.train import _send

    tracking._writer_for(tracking.tracking_uri(), fast=fast)
    run = tracking.MlflowRun("bench-probe", run_name=f"probe-{'fast' if fast else 'api'}")
    _started(run)
    step_values = torch.arange(len(KEYS), dtype=torch.float32)
    t0 = time.perf_counter()
    for epoch_start in range(0, steps, steps_per_epoch):
        n = min(steps_per_epoch, steps - epoch_start)
        buf = torch.empty(n, len(KEYS))
        flushed = 0
        for i in range(n):
            buf[i] = step_values  # what a train step leaves on the device
            if i + 1 - flushed >= flush_every or i == n - 1:
                _send(run, KEYS, buf[flushed : i + 1].cpu(), epoch_start + flushed, {})
                flushed = i + 1
        run.flush()  # the checkpoint's wait
    rate = steps / (time.perf_counter() - t0)
    run.end()
    _check_stored(run.run_id, steps)
    return rate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=2_000_000, help="points already in the store")
    ap.add_argument("--fast-points", type=int, default=800_000)
    ap.add_argument("--slow-points", type=int, default=80_000, help="for the two log_batch variants (10× slower)")
    ap.add_argument("--probe-steps", type=int, default=100_000)
    ap.add_argument("--out", default=str(REPO / "bench" / "RESULTS.md"))
    args = ap.parse_args()

    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    home = tempfile.mkdtemp(prefix="vae-bench-tracking-")
    atexit.register(shutil.rmtree, home, True)  # a store of millions of points: gigabytes
    os.environ["VAE_PIPELINE_HOME"] = home
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from pipeline import tracking

    print(f"[bench] prefilling the store with {args.prefill:,} points", flush=True)
    _prefill(args.prefill)
    rates: dict[str, list[float]] = {"api": [], "async": [], "fast": [], "probe_api": [], "probe_fast": []}
    for r in range(args.repeats):
        print(f"[bench] repeat {r + 1}/{args.repeats}: ingest", flush=True)
        rates["api"].append(ingest_writer(args.slow_points, fast=False))
        rates["async"].append(ingest_async(args.slow_points))
        rates["fast"].append(ingest_writer(args.fast_points, fast=True))
        print(f"[bench] repeat {r + 1}/{args.repeats}: GPU-speed probe", flush=True)
        rates["probe_api"].append(gpu_probe(args.probe_steps // 20, fast=False))
        rates["probe_fast"].append(gpu_probe(args.probe_steps, fast=True))
    for w in list(tracking._writers.values()):
        w.close()

    best = {k: max(v) for k, v in rates.items()}
    med = {k: statistics.median(v) for k, v in rates.items()}
    ok = "PASS" if min(best["fast"], med["fast"]) >= 100_000 else "FAIL"
    lines = [
        SECTION,
        "",
        f"Produced by `python bench/bench_tracking.py --repeats {args.repeats}` (part of `make bench`) on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {machine()}.",
        "",
        f"Points stored per second into the project's SQLite store, which already holds {args.prefill:,} points; "
        f"blocks of {STEPS_PER_BLOCK} steps × {len(KEYS)} keys as the trainer hands them over; from the first "
        "point handed over to the last one stored (every point then checked in the store), the writer already started. Best [median] of "
        f"{args.repeats}, the variants interleaved in one process.",
        "",
        "| writer | points | points/s | vs (1) |",
        "|---|---:|---:|---:|",
        f"| (1) writer process, MLflow `log_batch` (the pipeline's writer before) | {args.slow_points:,} "
        f"| {best['api']:,.0f} [{med['api']:,.0f}] | 1.0× |",
        f"| (2) MLflow async logging, `log_batch(synchronous=False)` in the trainer | {args.slow_points:,} "
        f"| {best['async']:,.0f} [{med['async']:,.0f}] | {best['async'] / best['api']:.1f}× |",
        f"| (3) writer process, bulk inserts (pipeline.metric_store), kept | {args.fast_points:,} "
        f"| {best['fast']:,.0f} [{med['fast']:,.0f}] | {best['fast'] / best['api']:.1f}× |",
        "",
        f"Target ≥ 100,000 points/s for (3), best and median: **{ok}**.",
        "",
        f"GPU-speed probe: the training loop's tracking work with no model (per step an ({len(KEYS)},) tensor "
        "into the epoch buffer; every 100 steps one host copy and hand-over; the store waited for every 10,000 "
        "steps, as before a checkpoint), sustained over the whole run with the final wait:",
        "",
        "| writer | steps | steps/s (8 keys) | points/s |",
        "|---|---:|---:|---:|",
        f"| (1) `log_batch` | {args.probe_steps // 20:,} | {best['probe_api']:,.0f} [{med['probe_api']:,.0f}] "
        f"| {best['probe_api'] * len(KEYS):,.0f} |",
        f"| (3) bulk inserts | {args.probe_steps:,} | {best['probe_fast']:,.0f} [{med['probe_fast']:,.0f}] "
        f"| {best['probe_fast'] * len(KEYS):,.0f} |",
        "",
    ]
    write_section(Path(args.out), SECTION, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
