"""Training throughput, side by side in one process (`make bench`).

Compares, on the same MLP VAE (784-400-20, Bernoulli, batch 128, Adam 1e-3):
  (a) a plain loop written the way pytorch/examples `vae/main.py` is: a torchvision dataset with
      ToTensor, a shuffling DataLoader, `loss.item()` every step;
  (b) the pipeline with tracking off;
  (c) the pipeline with full MLflow tracking (every step, every loss component), as it ships: the
      metric writer process with bulk inserts into the SQLite store;
  (d) the same through the writer process with MLflow's `log_batch` (the writer before the fast path);
  (e) the same with MLflow's own asynchronous logging (`log_batch(synchronous=False)` in the trainer).
Each variant runs `--repeats` times, interleaved, so machine noise hits all of them alike; the
best epoch of each is compared. Writes bench/RESULTS.md with the figures and the machine.
"""

from __future__ import annotations

import argparse
import atexit
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib import cpu_name, write_section

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL_SETTINGS = [
    "model.arch=mlp", "model.hidden_dim=400", "model.latent_dim=20", "model.encoder_depth=1",
    "model.decoder_depth=1", "likelihood.name=bernoulli", "train.batch_size=128", "train.lr=0.001",
    "train.device=cpu", "train.grad_clip=null",
]


# --- (a) the reference loop ----------------------------------------------------------------------
def _example_vae():
    """The pytorch/examples VAE architecture: 784-400-20, sigmoid output, BCE(sum) + KLD. (torch is imported
    in functions: the metric writer process, spawned, imports this script again, as it would not a CLI.)"""
    import torch
    from torch import nn

    class ExampleVAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc21, self.fc22 = nn.Linear(784, 400), nn.Linear(400, 20), nn.Linear(400, 20)
            self.fc3, self.fc4 = nn.Linear(20, 400), nn.Linear(400, 784)

        def forward(self, x):
            h = torch.relu(self.fc1(x.view(-1, 784)))
            mu, logvar = self.fc21(h), self.fc22(h)
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
            return torch.sigmoid(self.fc4(torch.relu(self.fc3(z)))), mu, logvar

    return ExampleVAE()


def _torchvision_root(splits, root: Path) -> Path:
    """Write the official training set as IDX files where torchvision's FashionMNIST looks."""
    import struct

    import torch

    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    images = torch.cat([splits.train_x, splits.val_x])[:, 0].numpy()
    labels = torch.cat([splits.train_y, splits.val_y]).numpy().astype("uint8")
    test_images, test_labels = splits.test_x[:, 0].numpy(), splits.test_y.numpy().astype("uint8")
    for name, arr in [("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels),
                      ("t10k-images-idx3-ubyte", test_images), ("t10k-labels-idx1-ubyte", test_labels)]:
        header = bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
        (raw / name).write_bytes(header + arr.tobytes())
    return root


def run_reference_loop(root: Path, epochs: int, seed: int) -> list[float]:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    torch.manual_seed(seed)
    loader = DataLoader(
        datasets.FashionMNIST(str(root), train=True, download=False, transform=transforms.ToTensor()),
        batch_size=128, shuffle=True,
    )
    model = _example_vae()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rates = []
    for _ in range(epochs):
        model.train()
        train_loss, n, t0 = 0.0, 0, time.perf_counter()
        for data, _ in loader:
            opt.zero_grad()
            recon, mu, logvar = model(data)
            bce = F.binary_cross_entropy(recon, data.view(-1, 784), reduction="sum")
            kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
            loss = bce + kld
            loss.backward()
            train_loss += loss.item()
            opt.step()
            n += data.shape[0]
        rates.append(n / (time.perf_counter() - t0))
    return rates


# --- (b), (c) the pipeline -----------------------------------------------------------------------
def _async_sink(experiment: str, run_name: str):
    """The pipeline's run, its points sent with MLflow's asynchronous `log_batch` instead of our writer."""
    import mlflow
    from mlflow.entities import Metric

    from pipeline.tracking import MlflowRun

    class MlflowAsyncRun(MlflowRun):
        def log_columns(self, columns):
            now = int(time.time() * 1000)
            self._send([Metric(k, v, now, first + i) for k, first, vals in columns for i, v in enumerate(vals)])

        def log_metrics(self, rows):
            now = int(time.time() * 1000)
            self._send([Metric(k, float(v), now, int(s)) for k, v, s in rows])

        def _send(self, metrics):
            for i in range(0, len(metrics), 1000):
                self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000], synchronous=False)

        def flush(self):
            mlflow.flush_async_logging()

    return MlflowAsyncRun(experiment, run_name=run_name)


def run_pipeline(splits, epochs: int, seed: int, tracking: str, home: Path,
                 system_metrics_s: float | None = None) -> tuple[list[float], float, Path]:
    """Per-epoch loop images/s (as the pipeline logs them) and end-to-end images/s incl. final flush.
    `tracking`: off, fast (as shipped), api (writer through log_batch), async (MLflow's async logging).
    `system_metrics_s`: also run MLflow's system-metrics monitor, sampling every that many seconds
    (bench/bench_system_metrics.py)."""
    from pipeline.checkpoint import CHECKPOINT, load_checkpoint
    from pipeline.config import build_config
    from pipeline.train import fit

    cfg = build_config(overrides=[*MODEL_SETTINGS, f"train.epochs={epochs}", f"train.seed={seed}",
                                  f"tracking.enabled={str(tracking != 'off').lower()}", "tracking.experiment=bench"])
    run_dir = Path(tempfile.mkdtemp(dir=home))
    if tracking == "off":
        from pipeline.tracking import NullRun

        sink = NullRun()
    elif tracking == "async":
        sink = _async_sink("bench", f"bench-{tracking}-{seed}")
    else:
        from pipeline import tracking as tr

        # The store first: a writer started on a home without one cannot open it and would fall back to the API.
        tr.ensure_store(tr.tracking_uri())
        tr._writer_for(tr.tracking_uri(), fast=tracking == "fast")
        sink = tr.MlflowRun("bench", run_name=f"bench-{tracking}-{seed}")
    if tracking != "off":
        sink.log_params(cfg.flat())
    if system_metrics_s is not None:
        from pipeline.system_metrics import monitored

        sink = monitored(sink, log=lambda *_: None, sampling_interval=system_metrics_s)
    t0 = time.perf_counter()
    fit(cfg, run_dir, sink, splits=splits, log=lambda *_: None, progress=False)
    sink.end("FINISHED")  # waits for every queued metric point to be written
    wall = time.perf_counter() - t0
    history = load_checkpoint(run_dir / CHECKPOINT)["history"]
    return [h["train/images_per_s"] for h in history], splits.train_x.shape[0] * epochs / wall, run_dir


def run_eval_throughput(splits, run_dir: Path, k: int, n_images: int, batch_size: int = 500) -> float:
    """IWAE evaluation speed of a trained checkpoint: test images × k importance samples per second."""
    from pipeline.checkpoint import CHECKPOINT, load_run
    from pipeline.evaluate import _chunk_for
    from pipeline.metrics import iwae_log_likelihood

    _, model, _ = load_run(run_dir / CHECKPOINT)
    x = splits.test_x[:n_images].float() / 255
    t0 = time.perf_counter()
    for batch in x.split(batch_size):
        iwae_log_likelihood(model, batch, k=k, chunk=_chunk_for(k, batch.shape[0]))
    return n_images * k / (time.perf_counter() - t0)


def machine() -> str:
    import torch

    return (f"{cpu_name()}, {os.cpu_count()} logical cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench" / "RESULTS.md"))
    ap.add_argument("--iwae-k", type=int, default=100, help="importance samples for the evaluation figure")
    ap.add_argument("--eval-images", type=int, default=2000)
    args = ap.parse_args()

    from pipeline.config import DataConfig
    from pipeline.data import ensure_splits

    splits = ensure_splits(DataConfig(), log=lambda *_: None)
    work = Path(tempfile.mkdtemp(prefix="vae-bench-"))
    atexit.register(shutil.rmtree, work, True)  # runs, checkpoints and a torchvision copy of the data
    os.environ["VAE_PIPELINE_HOME"] = str(work)  # a throwaway MLflow store for the tracked runs
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    tv_root = _torchvision_root(splits, work / "torchvision")

    variants = {"untracked": "off", "tracked": "fast", "api": "api", "async": "async"}
    loop_rates: dict[str, list[float]] = {"reference": [], **{name: [] for name in variants}}
    e2e: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.repeats):
        print(f"[bench] repeat {r + 1}/{args.repeats}: reference DataLoader loop", flush=True)
        loop_rates["reference"] += run_reference_loop(tv_root, args.epochs, seed=r)
        for name, tracking in variants.items():
            print(f"[bench] repeat {r + 1}/{args.repeats}: pipeline, tracking {tracking}", flush=True)
            rates, end_to_end, run_dir = run_pipeline(splits, args.epochs, seed=r, tracking=tracking, home=work)
            loop_rates[name] += rates
            e2e[name].append(end_to_end)

    print("[bench] IWAE evaluation throughput", flush=True)
    eval_rates = [run_eval_throughput(splits, run_dir, k=args.iwae_k, n_images=args.eval_images) for _ in range(args.repeats)]

    best = {k: max(v) for k, v in loop_rates.items()}
    med = {k: statistics.median(v) for k, v in loop_rates.items()}
    speedup = best["tracked"] / best["reference"]
    speedup_med = med["tracked"] / med["reference"]
    ok = lambda cond: "PASS" if cond else "FAIL"  # noqa: E731

    def overhead(name: str) -> tuple[float, float, float, float]:
        """Loop and end-to-end overhead of variant `name` against tracking off, from best and from median."""
        return (1 - best[name] / best["untracked"], 1 - med[name] / med["untracked"],
                1 - max(e2e[name]) / max(e2e["untracked"]),
                1 - statistics.median(e2e[name]) / statistics.median(e2e["untracked"]))

    o = overhead("tracked")
    labels = {"untracked": "(b) pipeline, tracking off",
              "tracked": "(c) pipeline, full MLflow tracking (every step, 8 keys), as shipped: writer process, bulk inserts",
              "api": "(d) the same, writer process through MLflow `log_batch` (before)",
              "async": "(e) the same, MLflow async logging (`log_batch(synchronous=False)`)"}
    train_section = "## Training throughput: MLP 784-400-20, Bernoulli, batch 128, CPU"
    lines = [
        train_section,
        "",
        f"Produced by `python bench/bench_train.py --epochs {args.epochs} --repeats {args.repeats}` (part of "
        f"`make bench`) on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {machine()}.",
        "",
        "Images per second, best and median: in the training loop over "
        f"{args.repeats * args.epochs} epochs per variant, and end to end (whole `fit` incl. validation, images, "
        f"checkpoints and waiting for the last metric point to be stored) over {args.repeats} runs; the variants "
        "interleaved in one process. Overhead: 1 − variant / (b).",
        "",
        "| variant | loop img/s | loop overhead | end-to-end img/s | end-to-end overhead |",
        "|---|---:|---:|---:|---:|",
        f"| (a) DataLoader + ToTensor loop (pytorch/examples vae/main.py style) | {best['reference']:,.0f} "
        f"[{med['reference']:,.0f}] | | | |",
    ]
    for name, label in labels.items():
        ov = overhead(name)
        lines.append(f"| {label} | {best[name]:,.0f} [{med[name]:,.0f}] | "
                     + ("" if name == "untracked" else f"{ov[0]:+.1%} [{ov[1]:+.1%}]")
                     + f" | {max(e2e[name]):,.0f} [{statistics.median(e2e[name]):,.0f}] | "
                     + ("" if name == "untracked" else f"{ov[2]:+.1%} [{ov[3]:+.1%}]") + " |")
    lines += [
        "",
        "Targets, each from the best and from the median figures (the verdict needs both):",
        "",
        "| ratio | from best | from median | target | |",
        "|---|---:|---:|---:|---|",
        f"| (c) / (a): pipeline with tracking vs DataLoader loop | {speedup:.2f}× | {speedup_med:.2f}× | ≥ 2.0× "
        f"| {ok(min(speedup, speedup_med) >= 2.0)} |",
        f"| 1 − (c) / (b): tracking overhead in the training loop | {o[0]:+.1%} | {o[1]:+.1%} | ≤ 5% "
        f"| {ok(max(o[0], o[1]) <= 0.05)} |",
        f"| 1 − (c) / (b), end to end | {o[2]:+.1%} | {o[3]:+.1%} | ≤ 5% | {ok(max(o[2], o[3]) <= 0.05)} |",
        "",
        "Where tracking time goes: the trainer hands each 100-step block to a lowest-priority writer process (a",
        "thread would hold the GIL against the loop) and waits for the store only before each checkpoint. Through",
        "`log_batch` MLflow's SQL store spends ~0.1–0.2 ms of CPU per point (SQLAlchemy's unit of work), i.e. 1–1.5",
        "ms per 8-key step, most of it paid at each epoch end where the trainer waits; MLflow's async logging does",
        "the same work in a thread of the trainer, against the loop's GIL. Bulk inserts cost ~8 µs per point, and",
        "on that path the writer imports neither MLflow nor torch: importing MLflow (~3 s of CPU, at the lowest",
        "priority behind the training threads) held up the first epoch's checkpoint, a fixed cost per run that",
        "(d) still pays; negative overheads are machine noise (the variants are interleaved, not identical)",
        "(section \"Metric ingest\").",
        "",
    ]
    write_section(Path(args.out), train_section, lines)
    eval_section = "## Evaluation throughput: IWAE on the same model, CPU"
    eval_lines = [
        eval_section,
        "",
        f"`test/iwae_nll` with k = {args.iwae_k} on {args.eval_images} test images, batched on the device: "
        f"best {max(eval_rates):,.0f}, median {statistics.median(eval_rates):,.0f} test images × k per second "
        f"({args.repeats} runs), i.e. the full 10,000-image test set at k = {args.iwae_k} in about "
        f"{10_000 * args.iwae_k / max(eval_rates):.0f} s.",
        "",
    ]
    write_section(Path(args.out), eval_section, eval_lines)
    print("\n".join(lines + eval_lines))
    print(f"[bench] written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
