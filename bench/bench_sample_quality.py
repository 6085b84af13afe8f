"""What KID and k-NN precision / recall add to an evaluation of the default config on this machine.

One evaluation of the default config's model (`evaluate_model` with the CPU defaults: 10,000 test images,
IWAE k = 100, 10,000 prior samples, 10,000 training images) measures the whole evaluation and, inside it,
the time `sample_quality` takes (KID over 100 subsets of 1,000, precision / recall on 10,000 × 10,000
feature distances). The model is freshly initialized: an evaluation costs the same whatever the weights.
Then KID and precision / recall alone, `--repeats` times each, on the same features; best and median
are reported. Run it alone (torch collapses when another process shares the cores). Writes a section of
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from benchlib import machine, write_section

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SECTION = "## Sample quality: KID and precision / recall in an evaluation, CPU"


def _timed(fn, seconds: list[float]):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - t0)

    return wrapper


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench" / "RESULTS.md"))
    args = ap.parse_args()

    from pipeline import evaluate as ev
    from pipeline import metrics as M
    from pipeline.classifier import ensure_classifier, predict
    from pipeline.config import RunConfig
    from pipeline.data import DeviceData, ensure_splits
    from pipeline.vae import build_vae

    quiet = lambda *_: None  # noqa: E731
    cpu = torch.device("cpu")
    cfg = RunConfig()
    splits = ensure_splits(cfg.data, log=quiet)
    classifier, _ = ensure_classifier(cfg.data, splits, cpu, log=quiet)
    torch.manual_seed(0)
    model = build_vae(cfg)
    test = DeviceData(splits.test_x, cpu, "none")
    k, n_samples = ev.default_iwae_k(cpu), ev.default_n_samples(cpu)
    other_sets = ev.other_image_sets(cfg, splits, splits.test_x, cpu, True)

    print("[bench] one evaluation of the default config", flush=True)
    inside: list[float] = []
    real_sample_quality = ev.sample_quality
    ev.sample_quality = _timed(real_sample_quality, inside)
    try:
        t0 = time.perf_counter()
        result = ev.evaluate_model(model, cfg, test, splits.test_x.float() / 255, k=k, batch_size=cfg.eval.batch_size,
                                   mi_batch=cfg.eval.mi_batch, n_samples=n_samples, seed=0, classifier=classifier,
                                   test_labels=splits.test_y, other_sets=other_sets)
        whole = time.perf_counter() - t0
    finally:
        ev.sample_quality = real_sample_quality

    print("[bench] KID and precision / recall alone", flush=True)
    real = predict(classifier, splits.test_x.float() / 255)[0]
    samples = predict(classifier, model.sample(n_samples, generator=torch.Generator().manual_seed(0)))[0]
    kid_s, pr_s = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        M.kernel_inception_distance(samples, real, generator=torch.Generator().manual_seed(0))
        kid_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        M.precision_recall(real, samples)
        pr_s.append(time.perf_counter() - t0)

    m = result["metrics"]
    lines = [
        SECTION, "",
        f"Produced by `python bench/bench_sample_quality.py --repeats {args.repeats}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {machine()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {platform.system()} {platform.release()}.", "",
        f"One evaluation of the default config (`evaluate_model`, CPU defaults: {test.n:,} test images, IWAE k = {k}, "
        f"{n_samples:,} prior samples, {other_sets['trainset'].n:,} training images, the feature classifier):", "",
        "| | seconds |", "|---|---:|",
        f"| whole evaluation (`test/eval_seconds`) | {m['test/eval_seconds']:.1f} |",
        f"| of which KID + precision / recall (`sample_quality`) | {inside[0]:.1f} ({inside[0] / whole:.0%}) |",
        f"| KID alone ({M.KID_SUBSETS} subsets of {M.KID_SUBSET_SIZE:,}), best [median] of {args.repeats} | "
        f"{min(kid_s):.1f} [{statistics.median(kid_s):.1f}] |",
        f"| precision / recall alone ({real.shape[0]:,} × {samples.shape[0]:,}, k = {M.PR_NEIGHBOURS}), best [median] "
        f"of {args.repeats} | {min(pr_s):.1f} [{statistics.median(pr_s):.1f}] |", "",
        "Both run in float64 (KID's cubic kernel averages 3·10⁶ terms of order 10²–10⁴ per subset; precision / recall compare "
        "distances with ≤), on 32 MB blocks of the distance matrix at a time.",
    ]
    print("\n".join(lines))
    write_section(Path(args.out), SECTION, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
