"""PixelCNN decoder cost, side by side in one process (`make bench`).

For the decoders of studies/autoregressive.yaml (16 channels, 5×5 masks, depth 1, 2, 4) and the
32-channel, 5-layer decoder the decoder-families issue quotes: one training step (batch 128, forward
and backward, Adam), teacher-forced scoring (forward only, what ELBO and IWAE cost), and drawing
images pixel by pixel, with the windowed sampler the pipeline uses (each step runs the decoder on the
rows and columns the pixel depends on) and with the plain whole-image loop. The variants are
interleaved, `--repeats` times each; best and median are reported. Sampling runs on one thread, as the
pipeline does on a CPU, and once more on all of torch's threads. Writes a section of bench/RESULTS.md.
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

DECODERS = {  # label → overrides
    "16 ch, depth 1 (2 rows above)": ["model.channels=16", "model.decoder_depth=1"],
    "16 ch, depth 2 (4 rows above)": ["model.channels=16", "model.decoder_depth=2"],
    "16 ch, depth 4 (8 rows above)": ["model.channels=16", "model.decoder_depth=4"],
    "32 ch, depth 5 (10 rows above)": ["model.channels=32", "model.decoder_depth=5"],
}
COMMON = ["model.decoder=pixelcnn", "model.kernel_size=5", "model.latent_dim=16", "data.binarize=static"]


def _model(overrides):
    from pipeline.config import build_config
    from pipeline.vae import build_vae

    torch.manual_seed(0)
    return build_vae(build_config(overrides=[*COMMON, *overrides]))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(model, batch: int, n_sample: int) -> dict[str, float]:
    """Seconds for one training step, images/s scored and images/s drawn (windowed and whole-image)."""
    x = (torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        t = model.terms(x)
        loss = (t.recon_nll + t.kl).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    out = {"train_step_s": _timed(step)}
    z = torch.randn(n_sample, model.latent_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model.eval()
        out["score_img_s"] = batch / _timed(lambda: model.recon_nll(x, model.posterior(x).mu))
        out["sample_window_img_s"] = n_sample / _timed(lambda: model.sample_pixels(z, torch.Generator().manual_seed(3)))
        out["sample_window_all_threads_img_s"] = n_sample / _timed(
            lambda: model.sample_pixels(z, torch.Generator().manual_seed(3), cpu_threads=None))
        out["sample_whole_img_s"] = n_sample / _timed(
            lambda: model.sample_pixels(z, torch.Generator().manual_seed(3), window=False))
        model.train()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--samples", type=int, default=32, help="images drawn per sampling measurement")
    ap.add_argument("--out", default=str(REPO / "bench" / "RESULTS.md"))
    args = ap.parse_args()

    models = {label: _model(o) for label, o in DECODERS.items()}
    runs: dict[str, list[dict[str, float]]] = {label: [] for label in DECODERS}
    for r in range(args.repeats):  # interleaved: machine noise hits every decoder alike
        for label, model in models.items():
            runs[label].append(measure(model, 128, args.samples))
            m = runs[label][-1]
            print(f"[bench] repeat {r + 1}/{args.repeats}  {label}: step {m['train_step_s'] * 1e3:.0f} ms, "
                  f"scoring {m['score_img_s']:,.0f} img/s, sampling {m['sample_window_img_s']:.1f} img/s windowed, "
                  f"{m['sample_window_all_threads_img_s']:.1f} on all threads, {m['sample_whole_img_s']:.1f} whole-image",
                  flush=True)

    def best_median(label, key, best=max):
        values = [m[key] for m in runs[label]]
        return best(values), statistics.median(values)

    lines = [
        "## PixelCNN decoder: training, scoring and pixel-by-pixel sampling, CPU",
        "",
        f"Machine: {machine()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"{platform.system()} {platform.release()}. `python bench/bench_sampling.py --repeats {args.repeats}` "
        f"(part of `make bench`); decoders of `studies/autoregressive.yaml` (MLP encoder, z of 16, 5×5 masks) and "
        "the 32-channel, 5-layer one the decoder-families issue quotes; the variants interleaved in one process, "
        f"best [median] of {args.repeats}. Sampling draws {args.samples} images at once, 784 decoder passes each.",
        "",
        "| decoder | training step, batch 128 (ms) | teacher-forced scoring (img/s) | sampling, windowed, 1 thread (img/s) "
        f"| the same on {torch.get_num_threads()} threads (img/s) | sampling, whole image, 1 thread (img/s) | windowed / whole |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label in DECODERS:
        step = best_median(label, "train_step_s", min)
        score = best_median(label, "score_img_s")
        win = best_median(label, "sample_window_img_s")
        threads = best_median(label, "sample_window_all_threads_img_s")
        whole = best_median(label, "sample_whole_img_s")
        ratios = [m["sample_window_img_s"] / m["sample_whole_img_s"] for m in runs[label]]
        lines.append(f"| {label} | {step[0] * 1e3:.0f} [{step[1] * 1e3:.0f}] | {score[0]:,.0f} [{score[1]:,.0f}] "
                     f"| {win[0]:.1f} [{win[1]:.1f}] | {threads[0]:.1f} [{threads[1]:.1f}] | {whole[0]:.1f} [{whole[1]:.1f}] "
                     f"| {max(ratios):.2f}× [{statistics.median(ratios):.2f}×] |")
    lines += [
        "",
        "The windowed sampler runs the decoder, for pixel (r, c), on rows r − reach … r and columns c − reach … "
        "c + reach only (reach = depth · (kernel // 2)), which gives the same conditionals as the whole image "
        "(tests/test_pixelcnn.py checks the draws are identical). Scoring is one teacher-forced pass, so the "
        "likelihood, IWAE and the z-usage gap cost about what a feed-forward decoder of the same size costs; "
        "only images (reconstructions, samples, traversals, per-epoch grids) are drawn pixel by pixel, which is "
        "why a PixelCNN run on a CPU defaults to 16 grid images per epoch and 256 evaluation samples.",
    ]
    write_section(Path(args.out), lines[0], lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
