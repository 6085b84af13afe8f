"""Time to report a 100-trial study (`make bench`, after bench_train.py).

The study: β (5 levels) × likelihood (2) × decoder depth (2) × 5 seeds = 100 trials, each a run
of 20 epochs × 430 steps (Fashion-MNIST at batch 128). Training 100 such models takes hours, and
the report does not care how the numbers came about, so the runs are synthesized once: real MLflow
runs in the real store, written through pipeline.tracking (parent run, tags, flattened params),
with every step of `train/kl` and `train/recon_nll` (the per-step curves the report reads, 8,600
points each), per-epoch validation metrics, a full set of test metrics, evaluation images and KL
vectors in each run directory, and an Optuna journal with the 100 trials. They are kept in
runs/bench_report/ (git-ignored) and reused by later benchmarks.

Then `python -m pipeline report` runs on it as a user would (a fresh process, so imports count),
`--repeats` times. Appends (or replaces) the "Report generation" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from benchlib import machine, write_section

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HOME = REPO / "runs" / "bench_report"
EPOCHS, STEPS_PER_EPOCH = 20, 430
STUDY = {
    "name": "bench_report",
    "description": "Synthetic 100-trial study for timing the report stage.",
    "sampler": "grid",
    "base": {"model.latent_dim": 16, "train.epochs": EPOCHS, "train.batch_size": 128},
    "space": {"objective.beta": [0.25, 1, 4, 16, 64], "likelihood.name": ["bernoulli", "gaussian_learned"],
              "model.decoder_depth": [1, 3]},
    "seeds": [0, 1, 2, 3, 4],
    "objectives": [{"metric": "test/iwae_nll", "direction": "minimize"}],
}
SECTION = "## Report generation: a 100-trial study, CPU"


def _test_metrics(beta: float, lik: str, depth: int, rng: np.random.Generator, d: int = 16) -> tuple[dict, np.ndarray]:
    """Plausible test metrics of one run: more β and a deeper decoder switch units off."""
    used = float(np.clip(1.1 - 0.22 * math.log2(beta) - 0.08 * (depth - 1) + rng.normal(0, 0.04), 0, 1))
    active = int(round(d * used))
    kl_vec = np.sort(np.concatenate([rng.uniform(0.5, 3.0, active) / math.sqrt(beta), rng.uniform(1e-4, 5e-3, d - active)]))[::-1]
    rate = float(kl_vec.sum())
    recon = (235.0 if lik == "bernoulli" else -430.0) + 9.0 * math.log2(beta + 1) * (1 + 0.1 * depth) + rng.normal(0, 1.5)
    blur = 0.1 + 0.4 / (1 + math.log2(beta + 1)) + (0.1 if lik != "bernoulli" else 0) + rng.normal(0, 0.01)
    m = {
        "test/recon_nll": recon, "test/kl": rate, "test/elbo": -(recon + rate), "test/iwae_nll": recon + 0.8 * rate,
        "test/recon_nll_mean_z": recon - 4, "test/kl_dim_max": float(kl_vec[0]), "test/collapsed_dims": int((kl_vec < 0.01).sum()),
        "test/active_units": active, "test/mutual_info": float(min(math.log(1000), 0.6 * rate)),
        "test/z_usage_gap": 25.0 * active + rng.normal(0, 0.5), "test/fd_classifier": 300 - 12 * active + rng.normal(0, 3),
        "test/recon_fd_classifier": 280 - 14 * active, "test/recon_class_acc": 0.1 + 0.05 * active,
        "test/eval_seconds": 12 + rng.normal(0, 1),
        "test/iwae_k": 1000, "test/mi_batch": 1000, "test/n_samples": 10000, "test/hf_cutoff": 0.25,
        "test/test_images": 10000, "test/dequantized": int(lik != "bernoulli"), "test/classifier_test_accuracy": 0.91,
    }
    for i, what in enumerate(("recon", "samples")):
        for j, measure in enumerate(("laplacian", "tenengrad", "hf_energy")):
            ratio = blur * (1.4 - 0.3 * i) * (1 + 0.3 * j)
            m[f"test/sharpness/{what}_{measure}_ratio"] = ratio
            m[f"test/sharpness/{what}_{measure}"] = ratio * (0.18, 1.7, 0.27)[j]
    if lik != "bernoulli":
        m["test/bits_per_dim"] = (m["test/iwae_nll"] + 784 * math.log(256)) / (784 * math.log(2))
    return m, kl_vec


def _curves(final_kl: float, final_recon: float, collapsed: bool, rng: np.random.Generator) -> dict[str, np.ndarray]:
    t = np.arange(EPOCHS * STEPS_PER_EPOCH)
    if collapsed:  # a bump while the encoder learns, then the KL falls onto the prior
        kl = 2.0 * np.exp(-t / 300) * (1 - np.exp(-t / 30)) + final_kl
    else:
        kl = final_kl * (1 - np.exp(-t / 800)) + 0.3
    kl = kl * np.exp(rng.normal(0, 0.05, t.size))
    recon = final_recon + 250 * np.exp(-t / 400) + 30 * np.exp(-t / 3000) + rng.normal(0, 2.5, t.size)
    return {"train/kl": kl, "train/recon_nll": recon}


def _images(run_dir: Path, test_x, blur: int, seed: int) -> None:
    import torch
    import torch.nn.functional as F

    from pipeline.images import pairs, save_grid

    g = torch.Generator().manual_seed(seed)
    originals = test_x[:32].float() / 255
    smooth = lambda x: F.avg_pool2d(F.pad(x, (blur, blur, blur, blur), mode="replicate"), 2 * blur + 1, stride=1)  # noqa: E731
    save_grid(pairs(originals, smooth(originals)), run_dir / "eval" / "test_reconstructions.png", nrow=8)
    picks = torch.randint(0, test_x.shape[0], (64,), generator=g)
    save_grid(smooth(smooth(test_x[picks].float() / 255)), run_dir / "eval" / "test_samples.png", nrow=8)


def synthesize(study_file: Path, log=print) -> None:
    """Write the 100 runs and the Optuna journal (once; a complete marker makes it reusable)."""
    import optuna
    from optuna.distributions import CategoricalDistribution

    from pipeline.config import DataConfig
    from pipeline.data import ensure_splits
    from pipeline.fileio import atomic_write_json
    from pipeline.study import open_storage, open_study, study_dir
    from pipeline.studyspec import expand_trials, load_study, point_key
    from pipeline.tracking import MlflowRun, client

    spec = load_study(study_file)
    test_x = ensure_splits(DataConfig(), log=lambda *_: None).test_x
    parent = MlflowRun(spec.name, run_name=f"study {spec.name}", tags={"study": spec.name, "role": "study"})
    atomic_write_json({"run_id": parent.run_id}, study_dir(spec) / "parent.json")
    study = open_study(spec, open_storage(spec, None))
    dists = {k: CategoricalDistribution(v) for k, v in spec.space.items()} | {"seed": CategoricalDistribution(spec.seeds)}
    t0 = time.perf_counter()
    for ts in expand_trials(spec):
        rng = np.random.default_rng(ts.index)
        beta, lik, depth = ts.point["objective.beta"], ts.point["likelihood.name"], ts.point["model.decoder_depth"]
        cfg = ts.config()
        run_dir = study_dir(spec) / "trials" / f"{ts.index:04d}-{cfg.result_hash()}"
        tags = {"study": spec.name, "trial": str(ts.index), "optuna_trial": str(ts.index), "seed": str(ts.seed),
                "point": point_key(ts.point), "config_hash": cfg.result_hash(), "run_dir": str(run_dir)}
        run = MlflowRun(spec.name, run_name=f"{spec.name} #{ts.index}", tags=tags, parent_run_id=parent.run_id)
        run.log_params(cfg.flat())
        metrics, kl_vec = _test_metrics(beta, lik, depth, rng)
        curves = _curves(metrics["test/kl"], metrics["test/recon_nll"], metrics["test/active_units"] == 0, rng)
        steps = EPOCHS * STEPS_PER_EPOCH
        for start in range(0, steps, STEPS_PER_EPOCH):  # an epoch per block, as the trainer sends them
            rows = [(k, float(v[s]), s) for s in range(start, start + STEPS_PER_EPOCH) for k, v in curves.items()]
            end = start + STEPS_PER_EPOCH
            rows += [("val/elbo", -float(curves["train/recon_nll"][end - 1] + curves["train/kl"][end - 1]), end),
                     ("val/recon_nll", float(curves["train/recon_nll"][end - 1]), end),
                     ("val/kl", float(curves["train/kl"][end - 1]), end), ("train/images_per_s", 12000.0, end)]
            run.log_metrics(rows)
        run.log_metrics([(k, float(v), steps) for k, v in metrics.items()])
        (run_dir / "eval").mkdir(parents=True, exist_ok=True)
        (run_dir / "eval" / "kl_per_dim.json").write_text(json.dumps([float(v) for v in kl_vec]))
        _images(run_dir, test_x, blur=1 + int(math.log2(beta + 1) // 2), seed=ts.index)
        run.end("FINISHED")
        study.add_trial(optuna.trial.create_trial(
            params={**ts.point, "seed": ts.seed}, distributions=dists, values=[metrics["test/iwae_nll"]],
            user_attrs={"trial_index": ts.index, "mlflow_run_id": run.run_id, "config_hash": cfg.result_hash()}))
        if ts.index % 10 == 9:
            log(f"[bench] synthesized {ts.index + 1}/100 runs ({time.perf_counter() - t0:.0f} s)")
    client().set_terminated(parent.run_id, "FINISHED")
    (HOME / "complete.json").write_text(json.dumps({"study": STUDY, "seconds": time.perf_counter() - t0}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "bench" / "RESULTS.md"))
    ap.add_argument("--target", type=float, default=60.0, help="seconds a 100-trial report may take")
    args = ap.parse_args()

    import yaml

    # Data from the project's home (make setup prepared it); everything else in the bench home.
    from pipeline.config import DataConfig
    from pipeline.data import ensure_splits

    ensure_splits(DataConfig(), log=lambda *_: None)
    HOME.mkdir(parents=True, exist_ok=True)
    if not (HOME / "data").exists():
        (HOME / "data").symlink_to(REPO / "data", target_is_directory=True)
    study_file = HOME / "study.yaml"
    marker = HOME / "complete.json"
    fresh = not marker.exists() or json.loads(marker.read_text()).get("study") != STUDY
    if fresh:
        import shutil

        for path in ("mlflow.db", "mlruns", "runs", "reports", "study.yaml", "complete.json"):
            target = HOME / path
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        study_file.write_text(yaml.safe_dump(STUDY, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["VAE_PIPELINE_HOME"] = str(HOME)
    os.environ.update(VAE_PIPELINE_HOME=str(HOME))
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    if fresh:
        print("[bench] synthesizing the 100-trial study once (kept in runs/bench_report/) …", flush=True)
        synthesize(study_file)
    setup_s = json.loads(marker.read_text())["seconds"]

    timings, stage = [], []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "pipeline", "report", str(study_file)], env=env, cwd=HOME,
                             capture_output=True, text=True)
        timings.append(time.perf_counter() - t0)
        if out.returncode != 0:
            print(out.stdout, out.stderr, file=sys.stderr)
            return 1
        inside = re.search(r"report\.html \(([\d.]+) s\)", out.stdout)
        stage.append(float(inside.group(1)) if inside else math.nan)
        print(f"[bench] report {r + 1}/{args.repeats}: {timings[-1]:.1f} s end to end, {stage[-1]:.1f} s in the stage",
              flush=True)
    report_dir = HOME / "reports" / STUDY["name"]
    size_mb = sum(p.stat().st_size for p in report_dir.rglob("*") if p.is_file()) / 1e6
    worst = max(timings)
    lines = [
        SECTION,
        "",
        f"Produced by `python bench/bench_report.py --repeats {args.repeats}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {machine()}.",
        "",
        "`python -m pipeline report` on a study of 100 trials (β 5 levels × likelihood 2 × decoder depth 2 × 5 "
        f"seeds = 20 configs), each an MLflow run holding {EPOCHS * STEPS_PER_EPOCH:,} steps of `train/kl` and "
        f"`train/recon_nll` ({100 * 2 * EPOCHS * STEPS_PER_EPOCH / 1e6:.2f} M points in all), per-epoch validation "
        "and the full set of test metrics, with eval images and KL vectors in each run directory and an Optuna "
        "journal. The runs are synthesized through `pipeline.tracking` into the real SQLite store "
        f"(once: {setup_s:.0f} s, then reused), since the report does not care how the numbers came about.",
        "",
        "| | seconds |",
        "|---|---:|",
        *(f"| report {i + 1}: end to end (fresh process, imports included) | {t:.1f} |" for i, t in enumerate(timings)),
        *(f"| report {i + 1}: inside the report stage (read, figures, HTML/MD/CSV, MLflow upload) | {s:.1f} |"
          for i, s in enumerate(stage)),
        f"| target | ≤ {args.target:.0f} |",
        "",
        f"Verdict: {'PASS' if worst <= args.target else 'FAIL'} (slowest end to end {worst:.1f} s). The report "
        f"directory holds {size_mb:.1f} MB (HTML with embedded figures, PDFs, CSV).",
        "",
    ]
    write_section(Path(args.out), SECTION, lines)
    print("\n".join(lines))
    return 0  # the verdict is in RESULTS.md, like bench_train.py's


if __name__ == "__main__":
    sys.exit(main())
