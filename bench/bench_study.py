"""Study throughput (trials per hour) with 1, 2 and 4 workers on PostgreSQL + an MLflow server.

Starts the project's PostgreSQL cluster and MLflow tracking server (pipeline.services) in a
scratch home on free loopback ports, runs the same small grid study (8 trials: MLP, 5,000 training
images, 2 epochs, evaluation on 1,000 test images) once per worker count with `make workers`'s
launcher (CPU threads split between the workers), and, for reference, once with one worker on the
default local stores (journal file + SQLite). Wall time is from the first worker's start to the
last worker's exit. Replaces the "Study throughput" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import yaml
from benchlib import machine, write_section

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Study throughput: workers on PostgreSQL + MLflow server, CPU"
BASE = {"data.train_subset": 5000, "train.epochs": 2, "model.latent_dim": 16, "eval.test_subset": 1000,
        "eval.n_samples": 1000, "eval.iwae_k": 20}
SPACE = {"objective.beta": [0.5, 1, 2, 4], "model.decoder_depth": [1, 2]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _study_file(home: Path, name: str) -> Path:
    path = home / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "sampler": "grid", "base": BASE, "space": SPACE, "seeds": [0],
                                    "objectives": [{"metric": "test/iwae_nll", "direction": "minimize"}]}))
    return path


def _run(home: Path, name: str, workers: int, storage: str | None) -> float:
    from pipeline.study import launch_workers

    path = _study_file(home, name)
    t0 = time.perf_counter()
    failed = launch_workers(str(path), workers, storage, log=lambda *_: None)
    wall = time.perf_counter() - t0
    if failed:
        raise SystemExit(f"{failed} worker(s) of {name} failed")
    return wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--out", default=str(REPO / "bench" / "RESULTS.md"))
    args = ap.parse_args()
    counts = [int(n) for n in args.workers.split(",")]

    home = Path(tempfile.mkdtemp(prefix="bench-study-"))
    atexit.register(shutil.rmtree, home, True)  # after main's own cleanup: the servers are stopped by then
    (home / "data").symlink_to(REPO / "data", target_is_directory=True)
    os.environ["VAE_PIPELINE_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    sys.path.insert(0, str(REPO))
    from pipeline import services

    n_trials = len(SPACE["objective.beta"]) * len(SPACE["model.decoder_depth"])
    rows = []
    print(f"[bench] reference: 1 worker on the local journal + SQLite stores ({n_trials} trials)", flush=True)
    local = _run(home, "local_w1", 1, None)
    rows.append(("1 (journal + SQLite, reference)", local))
    pg_port, ml_port = _free_port(), _free_port()
    try:
        pg = services.start_postgres(pg_port)
        os.environ["MLFLOW_TRACKING_URI"] = services.start_server(ml_port, pg_port=pg_port)
        os.environ["PGPASSFILE"] = str(services.pgpass_path())
        for n in counts:
            print(f"[bench] {n} worker(s) on PostgreSQL + MLflow server ({n_trials} trials)", flush=True)
            rows.append((f"{n} (PostgreSQL + MLflow server)", _run(home, f"pg_w{n}", n, pg.url("optuna"))))
    finally:
        services.stop_server()
        services.stop_postgres(pg_port)

    lines = [
        SECTION,
        "",
        f"Machine: {machine()}. `python bench/bench_study.py` (part of `make bench`); one run per row,",
        f"measured in one session. Study: grid of {n_trials} trials (MLP, {BASE['data.train_subset']:,} training images,",
        f"{BASE['train.epochs']} epochs, evaluation on {BASE['eval.test_subset']:,} test images with k = {BASE['eval.iwae_k']}),",
        "every per-step metric stored. Wall time from the first worker's start to the last worker's exit.",
        "",
        "| workers | wall (s) | trials / hour | vs 1 worker on PostgreSQL |",
        "|---|---:|---:|---:|",
    ]
    one = next((w for label, w in rows if label.startswith("1 (PostgreSQL")), None)
    for label, wall in rows:
        ratio = f"{one / wall:.2f}×" if one else "-"
        lines.append(f"| {label} | {wall:.1f} | {n_trials * 3600 / wall:,.0f} | {ratio} |")
    lines += [
        "",
        "On a CPU-only machine the workers share the cores (threads are split between them), so more",
        "workers than cores cannot add throughput; the rows measure the engines' overhead and how the",
        "claims, heartbeats and tracking server hold up under concurrency. On GPUs, one worker per GPU.",
    ]
    write_section(Path(args.out), SECTION, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
