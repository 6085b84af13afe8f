"""What `tracking.system_metrics: true` costs training (`make bench`): measured, to choose its default.

Two measurements on the model of bench/bench_train.py (MLP 784-400-20, Bernoulli, batch 128, full tracking
as shipped), in one process:
  1. throughput side by side, interleaved: without system metrics; with MLflow's monitor sampling every
     10 s (MLflow's default, what the option does); every 1 s (ten times the monitor's work, to bound it);
  2. the monitor's own cost per sample, timed directly: the work MLflow's loop does each interval (read
     psutil, and NVML where a GPU is; check that the run is still RUNNING; log the points into the SQLite
     store), as CPU time of the thread doing it. At a 10 s interval that thread takes cost / 10 s of a core.
Writes the "System metrics" section of bench/RESULTS.md.
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

from bench_train import machine, run_pipeline
from benchlib import write_section

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = {"without": None, "every 10 s": 10.0, "every 1 s": 1.0}  # name → sampling interval (s)


def system_points(run_dir: Path) -> int:
    """How many samples the monitor stored in the run of `run_dir` (0 without the monitor)."""
    from pipeline.checkpoint import CHECKPOINT, load_checkpoint
    from pipeline.system_metrics import CPU_KEY
    from pipeline.tracking import client

    run_id = load_checkpoint(run_dir / CHECKPOINT)["run_id"]
    return len(client().get_metric_history(run_id, CPU_KEY))


def sample_cost(n: int) -> tuple[list[float], list[float]]:
    """Wall and thread-CPU seconds of one monitoring interval's work, `n` times, against the bench store."""
    from mlflow.tracking import MlflowClient

    from pipeline.system_metrics import _monitor_class
    from pipeline.tracking import MlflowRun, tracking_uri

    run = MlflowRun("bench", run_name="bench-system-metrics-cost")
    monitor = _monitor_class()(run.run_id, sampling_interval=3600, resume_logging=True, tracking_uri=tracking_uri())
    walls, cpus = [], []
    for _ in range(n):
        w0, c0 = time.perf_counter(), time.thread_time()
        monitor.collect_metrics()
        MlflowClient(tracking_uri()).get_run(run.run_id)  # MLflow's loop: a new client and a run lookup per interval
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.thread_time() - c0)
    run.end("FINISHED")
    return walls, cpus


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=12, help="per run: long enough for several 10 s samples")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--samples", type=int, default=200, help="timed monitoring intervals")
    ap.add_argument("--out", default=str(REPO / "bench" / "RESULTS.md"))
    args = ap.parse_args()

    from pipeline.config import DataConfig
    from pipeline.data import ensure_splits

    splits = ensure_splits(DataConfig(), log=lambda *_: None)
    work = Path(tempfile.mkdtemp(prefix="vae-bench-sysm-"))
    atexit.register(shutil.rmtree, work, True)
    os.environ["VAE_PIPELINE_HOME"] = str(work)  # a throwaway MLflow store
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", None)  # it would override the variants' intervals

    loop: dict[str, list[float]] = {name: [] for name in VARIANTS}
    e2e: dict[str, list[float]] = {name: [] for name in VARIANTS}
    points: dict[str, list[int]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:  # each variant first in turn
            interval = VARIANTS[name]
            print(f"[bench] repeat {r + 1}/{args.repeats}: system metrics {name}", flush=True)
            rates, end_to_end, run_dir = run_pipeline(splits, args.epochs, seed=r, tracking="fast", home=work,
                                                      system_metrics_s=interval)
            loop[name] += rates
            e2e[name].append(end_to_end)
            points[name].append(system_points(run_dir))
            shutil.rmtree(run_dir, ignore_errors=True)
    print("[bench] the monitor's cost per sample", flush=True)
    walls, cpus = sample_cost(args.samples)

    def ratio(name: str, figures: dict[str, list[float]], pick) -> float:
        return pick(figures[name]) / pick(figures["without"])

    section = "## System metrics: what `tracking.system_metrics` costs training, CPU"
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if os.environ.get("OMP_NUM_THREADS") else ""
    cost_ms, cost_wall_ms = statistics.median(cpus) * 1000, statistics.median(walls) * 1000
    lines = [
        section,
        "",
        f"Produced by `{threads}python bench/bench_system_metrics.py --epochs {args.epochs} --repeats {args.repeats} "
        f"--samples {args.samples}` (part of `make bench`) on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{machine()}.",
        "",
        "The model and tracking of \"Training throughput\" (full tracking as shipped), with and without MLflow's "
        f"system-metrics monitor, the variants interleaved in one process (each first in turn), {args.repeats} runs of {args.epochs} "
        "epochs each. Images per second, best [median], in the training loop (per epoch) and end to end (whole "
        "`fit` incl. the monitor's start and stop); ratio = variant / without, from best [from median]; the spread "
        "is the lowest–highest end-to-end run.",
        "",
        "| system metrics | loop img/s | loop ratio | end-to-end img/s | end-to-end ratio | spread (end to end) "
        "| samples stored per run |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in VARIANTS:
        ratios = ("" if name == "without" else
                  f"{ratio(name, loop, max):.3f} [{ratio(name, loop, statistics.median):.3f}]",
                  "" if name == "without" else
                  f"{ratio(name, e2e, max):.3f} [{ratio(name, e2e, statistics.median):.3f}]")
        lines.append(
            f"| {name} | {max(loop[name]):,.0f} [{statistics.median(loop[name]):,.0f}] | {ratios[0]} "
            f"| {max(e2e[name]):,.0f} [{statistics.median(e2e[name]):,.0f}] | {ratios[1]} "
            f"| {min(e2e[name]):,.0f}–{max(e2e[name]):,.0f} | {', '.join(map(str, points[name]))} |")
    lines += [
        "",
        f"The monitor's work per sample (read psutil, check the run's status, log ~8 points into SQLite), timed "
        f"{args.samples} times: median {cost_ms:.1f} ms of CPU (p90 {sorted(cpus)[int(0.9 * len(cpus))] * 1000:.1f} ms), "
        f"{cost_wall_ms:.1f} ms wall. At MLflow's 10 s interval that is {cost_ms / 10_000:.3%} of one core, in a thread "
        "of the trainer (so under the GIL for its Python part); at 1 s, ten times that.",
        "",
    ]
    write_section(Path(args.out), section, lines)
    print("\n".join(lines))
    print(f"[bench] written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
