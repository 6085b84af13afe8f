"""The evaluate stage: likelihood, collapse and sharpness of a trained checkpoint.

Results go to ``metrics.json`` next to the checkpoint and, under ``test/``, into the run's own
MLflow run (never a new one). Re-evaluating overwrites ``metrics.json`` and logs newer points at
the same step, which MLflow then shows as the run's values. ``metrics.json`` is strict JSON: a measure
that is not defined (NaN) is written as null and left out of MLflow; ``read_metrics`` reads it back as NaN.

Prior samples are compared with the test images in the feature space of the frozen classifier
(pipeline.classifier) three ways: the Fréchet distance, KID, and k-NN precision and recall, which
tell blurred or broken samples (low precision) from a model that misses part of the data (low recall).

Per-dimension KL measures (``test/kl_dim_max``, ``test/collapsed_dims``, the KL bar chart) exist only
for a prior that factorizes over dimensions: for a mixture prior the KL of one coordinate is not
defined, and these are left out (active units and I(x; z), which never look at the prior, remain).
Without an analytic KL, ``test/kl`` is a Monte Carlo estimate over several draws per image
(``VAE.kl_estimate``).

An autoregressive decoder (PixelCNN) is scored exactly as any other, by teacher forcing, but its images
are draws from p(x|z) made pixel by pixel, one decoder pass per pixel: its sharpness and Fréchet
distances describe samples, not a likelihood's mean, and on a CPU it gets smaller defaults (IWAE k = 10,
256 samples and as many test reconstructions) so that an evaluation takes minutes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import metrics as M
from pipeline.augment import augmenter
from pipeline.checkpoint import CHECKPOINT, load_run
from pipeline.config import RunConfig
from pipeline.data import DeviceData, binarize_static, ensure_splits
from pipeline.errors import masked
from pipeline.fileio import atomic_write_json
from pipeline.images import pairs, save_grid
from pipeline.metric_table import SET_METRICS, SET_PREFIXES
from pipeline.runtime import resolve_device
from pipeline.vae import VAE

METRICS_FILE = "metrics.json"
# The metrics computed in the feature classifier's space, which needs labels to be trained.
CLASS_FEATURE_METRICS = ("test/fd_classifier", "test/recon_fd_classifier", "test/recon_class_acc", "test/kid",
                         "test/kid_std", "test/precision", "test/recall")
CLASS_FEATURES_UNAVAILABLE = ("unavailable: the dataset has no labels, so no feature classifier is trained and the "
                              "Fréchet distance, KID and precision/recall are not computed (an untrained network's "
                              "features would give numbers that mean nothing)")


def default_iwae_k(device: torch.device, autoregressive: bool = False) -> int:
    if autoregressive:  # each importance sample is a teacher-forced PixelCNN pass over the test set
        return 100 if device.type == "cuda" else 10
    return 1000 if device.type == "cuda" else 100


def default_n_samples(device: torch.device, autoregressive: bool = False, data_dims: int = 784) -> int:
    """Prior samples for sharpness and Fréchet distance. Pixel by pixel, the depth-4 PixelCNN of
    studies/autoregressive.yaml draws ~8 1×28×28 images/s on this project's 2-core CPU (`make bench`), so
    256 samples and as many reconstructions take about a minute there; a draw costs one step per value
    (C·H·W = `data_dims`), so other sizes get as many values in all: 64 of 3×64×64, 3,136 of 1×8×8."""
    if autoregressive and device.type != "cuda":
        return min(10_000, max(64, round(256 * 784 / data_dims)))
    return 10_000


def _chunk_for(k: int, batch: int, budget: int = 20_000) -> int:
    """IWAE samples per decoder call, so one call decodes at most `budget` images."""
    return max(1, min(k, budget // max(1, batch)))


# Images per decoder call in IWAE: a PixelCNN keeps channels × H × W activations per image, not a vector.
DECODE_BUDGET = {False: 20_000, True: 2_000}


@dataclass
class SetPass:
    """One pass over an image set: per-image sums and the posterior parameters of every image."""

    n: int
    # float64: recon_nll, recon_nll_mean_z, kl, iwae log-likelihood, z_gap·n_gap, n_gap, Σ elbo² over images
    sums: torch.Tensor
    mu: torch.Tensor  # (N, D) on the CPU
    logvar: torch.Tensor
    recons: list[torch.Tensor]  # reconstructions from E[z] of the first images, when asked for


def _set_pass(model: VAE, data: DeviceData, gen: torch.Generator, *, dequantize: bool, k: int | None, batch_size: int,
              n_render: int) -> SetPass:
    """ELBO terms at one z ~ q(z|x), recon at E[z], the z-usage gap, IWAE with k samples (None: skipped)
    and `n_render` reconstructions, batch by batch, every draw from `gen`."""
    dev = data.images.device
    mus, logvars, recons = [], [], []
    sums = torch.zeros(7, dtype=torch.float64)
    for start in range(0, data.n, batch_size):
        x = data.batch(torch.arange(start, min(start + batch_size, data.n), device=dev))
        if dequantize:
            x = M.dequantize(x, generator=gen)
        t = model.terms(x, generator=gen)  # recon NLL at one z ~ q(z|x)
        kl, _ = model.kl_estimate(t, generator=gen)
        recon_mean = model.recon_nll(x, t.q.mu)
        ll = torch.zeros(())
        if k is not None:
            chunk = _chunk_for(k, x.shape[0], DECODE_BUDGET[model.autoregressive])
            ll = M.iwae_log_likelihood(model, x, k=k, chunk=chunk, generator=gen)
        n = x.shape[0]
        gap, n_gap = (M.z_usage_gap(lambda codes, x=x: model.recon_nll(x, codes), t.z), n) if n > 1 else (0.0, 0)
        elbo_sq = (t.recon_nll.double() + kl.double()).square().sum()
        sums += torch.tensor([t.recon_nll.sum(), recon_mean.sum(), kl.sum(), ll.sum(), gap * n_gap, n_gap, elbo_sq],
                             dtype=torch.float64)
        mus.append(t.q.mu.cpu())
        logvars.append(t.q.logvar.cpu())
        n_recon = max(0, min(n, n_render - start))
        if n_recon:
            recons.append(model.render(t.q.mu[:n_recon], generator=gen).cpu())
    return SetPass(data.n, sums, torch.cat(mus), torch.cat(logvars), recons)


def _set_metrics(prefix: str, p: SetPass, mi_batch: int, generator: torch.Generator) -> dict[str, float]:
    """The metric table's SET_METRICS of one pass, under `prefix/`."""
    recon_nll, recon_nll_mean_z, kl = (p.sums[:3] / p.n).tolist()
    n_active, _ = M.active_units(p.mu)
    b = min(mi_batch, p.n)
    # Averaged over every full batch of b images: the same estimand, less Monte Carlo noise.
    mi = sum(M.mutual_information(p.mu[i : i + b], p.logvar[i : i + b], generator=generator)
             for i in range(0, p.n - b + 1, b)) / (p.n // b)
    elbo = -(recon_nll + kl)
    out = {
        "elbo": elbo,
        # The spread of the per-image ELBO over this set's images: with the set's size, the image-sampling
        # error of its mean, which seed intervals do not contain (every seed scores the same images).
        "elbo_image_sd": math.sqrt(max(0.0, float(p.sums[6]) / p.n - elbo**2)),
        "recon_nll": recon_nll,
        "recon_nll_mean_z": recon_nll_mean_z,
        "kl": kl,
        "active_units": n_active,
        "active_fraction": n_active / p.mu.shape[1],
        "mutual_info": mi,
        "z_usage_gap": float(p.sums[4] / p.sums[5]),
    }
    assert set(out) == set(SET_METRICS), "pipeline.metric_table.SET_METRICS and this pass disagree"
    return {f"{prefix}/{key}": value for key, value in out.items()}


@torch.no_grad()
def evaluate_model(model: VAE, cfg: RunConfig, test: DeviceData, reference: torch.Tensor, *, k: int, batch_size: int,
                   mi_batch: int, n_samples: int, seed: int, out_dir: Path | None = None, classifier=None,
                   test_labels: torch.Tensor | None = None, other_sets: dict[str, DeviceData] | None = None) -> dict:
    """All test diagnostics of one model, as {"test/…": float} plus the KL vector and artifacts.

    `other_sets` ({"trainset": …, "test_aug": …}) are scored after the test set, under their own prefixes
    (the metric table's SET_METRICS only), each with generators seeded as the test set's: common random
    numbers, so a gap between two sets is not inflated by independent Monte Carlo noise (and the same
    images give the same numbers when they fit one batch)."""
    model.eval()
    dev = test.images.device
    lik, prior = model.likelihood, model.prior
    gen = torch.Generator(device=dev).manual_seed(seed)
    # A density on [0, 1] scored at the 8-bit grid points is not comparable with a probability mass:
    # continuous likelihoods see uniformly dequantized data (Theis et al. 2016), discrete ones the data.
    dequantize = not lik.discrete
    if lik.discrete and cfg.likelihood.name == "bernoulli" and cfg.data.binarize == "none":
        bpd = math.nan  # Bernoulli on grey levels is not a normalized likelihood of the 8-bit data
    else:
        bpd = None
    cpu_gen = torch.Generator().manual_seed(seed)

    t0 = time.perf_counter()
    # Drawn pixel by pixel, reconstructions of an autoregressive decoder stop at n_samples images.
    p = _set_pass(model, test, gen, dequantize=dequantize, k=k, batch_size=batch_size,
                  n_render=n_samples if model.autoregressive else test.n)
    n_test = test.n
    ll = float(p.sums[3] / n_test)
    mu_all, logvar_all, recon_all = p.mu, p.logvar, torch.cat(p.recons)
    test_set = _set_metrics("test", p, mi_batch, cpu_gen)
    b = min(mi_batch, n_test)

    kl_stats = M.kl_dimension_stats(mu_all, logvar_all) if prior.factorized else None
    _, activity = M.active_units(mu_all)

    samples_all = torch.cat([model.sample(min(batch_size, n_samples - start), generator=gen).cpu()
                             for start in range(0, n_samples, batch_size)])
    reference = reference.float().cpu()
    sharp_recon = M.sharpness(recon_all, reference)
    sharp_samples = M.sharpness(samples_all, reference)

    out = {
        **{key: test_set[key] for key in ("test/elbo", "test/elbo_image_sd", "test/recon_nll", "test/recon_nll_mean_z",
                                          "test/kl")},
        "test/iwae_nll": -ll,
        "test/bits_per_dim": bpd if bpd is not None else M.bits_per_dim(-ll, model.data_dims,
                                                                         None if lik.discrete else 256),
    }
    if kl_stats is not None:
        out["test/kl_dim_max"] = kl_stats["kl_dim_max"]
        out["test/collapsed_dims"] = kl_stats["collapsed_dims"]
        out["test/kl_active_fraction"] = 1 - kl_stats["collapsed_dims"] / model.latent_dim
    out.update({key: test_set[key] for key in ("test/active_units", "test/active_fraction", "test/mutual_info",
                                                 "test/z_usage_gap")})
    for name, value in sharp_recon.items():
        out[f"test/sharpness/recon_{name}"] = value
    for name, value in sharp_samples.items():
        out[f"test/sharpness/samples_{name}"] = value
    quality_params: dict = {}
    if classifier is not None:
        from pipeline.classifier import predict

        cdev = next(classifier.parameters()).device
        real_features, _ = predict(classifier, reference.to(cdev))
        sample_features, _ = predict(classifier, samples_all.to(cdev))
        recon_features, recon_pred = predict(classifier, recon_all.to(cdev))
        out["test/fd_classifier"] = M.frechet_distance(sample_features.cpu(), real_features.cpu())
        out["test/recon_fd_classifier"] = M.frechet_distance(recon_features.cpu(), real_features.cpu())
        if test_labels is not None:
            labels = test_labels[: recon_all.shape[0]].cpu()
            out["test/recon_class_acc"] = float((recon_pred.cpu() == labels).float().mean())
        quality, quality_params = sample_quality(sample_features, real_features, seed)
        out.update(quality)
    set_sizes = {}
    for prefix, data in (other_sets or {}).items():
        set_gen = torch.Generator(device=dev).manual_seed(seed)
        set_pass = _set_pass(model, data, set_gen, dequantize=dequantize, k=None, batch_size=batch_size, n_render=0)
        out.update(_set_metrics(prefix, set_pass, mi_batch, torch.Generator().manual_seed(seed)))
        set_sizes[prefix] = data.n
    out["test/eval_seconds"] = time.perf_counter() - t0

    result = {
        "metrics": out,
        # None for a prior that does not factorize (see the module docstring).
        "kl_per_dim": kl_stats["kl_per_dim"].tolist() if kl_stats is not None else None,
        # The settings this evaluation used; logged as test/ metrics so a re-evaluation replaces them.
        "params": {"iwae_k": k, "mi_batch": b, "n_samples": n_samples, "hf_cutoff": 0.25, "test_images": n_test,
                   "recon_images": recon_all.shape[0], "dequantized": int(dequantize),
                   "pixel_by_pixel": int(model.autoregressive), "trainset_images": set_sizes.get("trainset", 0),
                   "augmented": int("test_aug" in set_sizes), **quality_params},
    }
    if out_dir is not None:
        per_dim = kl_stats["kl_per_dim"] if kl_stats is not None else activity
        result["artifacts"] = _images(model, test, recon_all, samples_all, per_dim, kl_stats is not None, out_dir,
                                      generator=gen)
    model.train()
    return result


def sample_quality(sample_features: torch.Tensor, real_features: torch.Tensor, seed: int) -> tuple[dict, dict]:
    """KID and k-NN precision / recall of prior samples against test images in the classifier's feature
    space, as ({"test/…": value}, the settings used).

    KID's subsets are drawn from a generator of their own (seeded with `seed`), so every other metric sees
    the same random draws as before these measures existed. Precision and recall compare equally many
    points of each set, as Kynkäänniemi et al. 2019 do (the larger set keeps its first n: a set's k-NN
    radii shrink as it grows); with no more than k points they are not defined (NaN).
    Reconstructions get neither: with one per test image, their recall asks whether the encoder keeps
    images apart, which the collapse measures answer, and their blur has its own measures (recon sharpness
    and Fréchet distance); leaving them out also keeps the evaluation's time down."""
    kid, kid_std = M.kernel_inception_distance(sample_features, real_features,
                                               generator=torch.Generator().manual_seed(seed))
    n = min(sample_features.shape[0], real_features.shape[0])
    if n > M.PR_NEIGHBOURS:
        precision, recall = M.precision_recall(real_features[:n], sample_features[:n])
    else:
        precision = recall = math.nan
    metrics = {"test/kid": kid, "test/kid_std": kid_std, "test/precision": precision, "test/recall": recall}
    params = {"kid_subsets": M.KID_SUBSETS, "kid_subset_size": min(M.KID_SUBSET_SIZE, n), "pr_k": M.PR_NEIGHBOURS,
              "pr_images": n}
    return metrics, params


@torch.no_grad()
def _images(model: VAE, test, recon_all, samples_all, per_dim: torch.Tensor, is_kl: bool, out_dir: Path,
            generator: torch.Generator | None = None) -> list[Path]:
    """Image grids, latent traversals and the per-dimension chart: KL when the prior factorizes, else
    activity Cov_x(E_q[z_j]) (the active-units statistic). An autoregressive decoder's images are draws
    from p(x|z), so a traversal shows one sample per value of z, not a mean."""
    dev = test.images.device
    originals = test.batch(torch.arange(min(32, recon_all.shape[0]), device=dev)).cpu()
    files = [
        save_grid(pairs(originals, recon_all[: originals.shape[0]]), out_dir / "test_reconstructions.png", nrow=8),
        save_grid(samples_all[:64], out_dir / "test_samples.png", nrow=8),
    ]
    # Latent traversals: the 8 dimensions with most KL (or activity), each swept over ±3 standard
    # deviations of the prior's marginal around its mean, from the posterior mean of one test image
    # (rows = dimensions, columns = values).
    top = torch.argsort(per_dim, descending=True)[: min(8, per_dim.numel())]
    base = model.posterior(test.batch(torch.arange(1, device=dev))).mu  # (1, D)
    center, spread = model.prior.marginal_moments()
    values = torch.linspace(-3, 3, 9, device=dev)
    rows = []
    for j in top.tolist():
        z = base.repeat(values.numel(), 1)
        z[:, j] = center[j] + spread[j] * values
        rows.append(model.render(z, generator=generator).cpu())
    files.append(save_grid(torch.cat(rows), out_dir / "latent_traversals.png", nrow=values.numel()))
    if is_kl:
        files.append(_per_dim_bar_chart(per_dim, M.COLLAPSED_KL, "KL", "mean KL (nats)",
                                        f"collapsed below {M.COLLAPSED_KL} nats", out_dir / "kl_per_dim.png"))
        kl_json = out_dir / "kl_per_dim.json"
        kl_json.write_text(json.dumps(strict_json([float(v) for v in per_dim]), allow_nan=False))
        files.append(kl_json)
    else:
        files.append(_per_dim_bar_chart(per_dim, M.ACTIVE_UNIT_THRESHOLD, "activity", "activity Cov_x(E_q[z_j])",
                                        f"inactive below {M.ACTIVE_UNIT_THRESHOLD}", out_dir / "activity_per_dim.png"))
    return files


def strict_json(obj):
    """`obj` with every NaN and ±inf float replaced by None (JSON's null): JSON has no such numbers (RFC 8259),
    and strict parsers (JavaScript's JSON.parse, jq) reject Python's NaN token. `read_metrics` maps null back."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: strict_json(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(value) for value in obj]
    return obj


def read_metrics(path: Path) -> dict:
    """A metrics.json as evaluate_stage wrote it, with the null of an undefined measure (written for NaN) back
    as NaN in `metrics`, `params` and the entries of `kl_per_dim` (itself null for a prior that does not
    factorize). Raises OSError or ValueError as json does."""
    saved = json.loads(Path(path).read_text())
    for section in ("metrics", "params"):
        if isinstance(saved.get(section), dict):
            saved[section] = {key: math.nan if value is None else value for key, value in saved[section].items()}
    if isinstance(saved.get("kl_per_dim"), list):
        saved["kl_per_dim"] = [math.nan if value is None else value for value in saved["kl_per_dim"]]
    return saved


def _per_dim_bar_chart(values: torch.Tensor, threshold: float, name: str, ylabel: str, below: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = torch.argsort(values, descending=True)
    fig, ax = plt.subplots(figsize=(max(4, 0.25 * values.numel() + 1), 3))
    ax.bar(range(values.numel()), values[order].numpy(),
           color=["#4c72b0" if v >= threshold else "#c44e52" for v in values[order]])
    ax.axhline(threshold, color="gray", lw=0.8, ls="--", label=below)
    ax.set_xticks(range(values.numel()), [str(int(i)) for i in order], fontsize=7)
    ax.set_xlabel(f"latent dimension (sorted by {name})")
    ax.set_ylabel(ylabel)
    ax.set_yscale("symlog", linthresh=0.01)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def evaluate_stage(checkpoint: str | Path | None = None, run_id: str | None = None, *, k: int | None = None,
                   batch_size: int = 500, mi_batch: int = 1000, n_samples: int | None = None, test_subset: int | None = None,
                   train_subset: bool | int | None = None, device: str = "auto", log=print, sink=None,
                   splits=None) -> dict:
    """Evaluate a checkpoint (or the checkpoint of an MLflow run) and record the results.

    `train_subset`: training images to score too (True: as many as the test set; False: none; None: the
    run's eval.train_subset)."""
    if checkpoint is None:
        if run_id is None:
            raise ValueError("give a checkpoint path or an MLflow run id")
        from pipeline.tracking import check_reachable, get_run

        check_reachable()
        try:
            run_dir = get_run(run_id).data.tags.get("run_dir")
        except Exception:  # MLflow's RESOURCE_DOES_NOT_EXIST, or a malformed id
            from pipeline.tracking import tracking_uri

            raise FileNotFoundError(f"no MLflow run {run_id!r} in {masked(tracking_uri())}; copy the id from the run's "
                                    "page in the MLflow UI (make ui), or pass --checkpoint RUN_DIR") from None
        if not run_dir:
            raise FileNotFoundError(f"MLflow run {run_id} has no run_dir tag; pass --checkpoint instead")
        checkpoint = Path(run_dir) / CHECKPOINT
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        checkpoint = checkpoint / CHECKPOINT
    if not checkpoint.is_file():
        raise FileNotFoundError(f"no checkpoint at {checkpoint}")
    dev = resolve_device(device)
    cfg, model, ck = load_run(checkpoint, dev)

    splits = splits or ensure_splits(cfg.data, log=log)  # the train stage passes the splits it has loaded
    test_x = splits.test_x[:test_subset] if test_subset else splits.test_x
    # Binarized models are scored on one fixed binarization of the test set.
    test = DeviceData(test_x, dev, "static" if cfg.data.binarize != "none" else "none", static_seed=cfg.data.split_seed + 2)
    k_arg, n_samples_arg = k, n_samples
    k = k or default_iwae_k(dev, model.autoregressive)
    n_samples = n_samples or default_n_samples(dev, model.autoregressive, model.data_dims)
    other_sets = other_image_sets(cfg, splits, test_x, dev, cfg.eval.train_subset if train_subset is None else train_subset)
    classifier, classifier_info = None, None
    if splits.has_labels:
        from pipeline.classifier import ensure_classifier

        classifier, classifier_info = ensure_classifier(cfg.data, splits, dev, log=log)
    else:
        log(f"[evaluate] {CLASS_FEATURES_UNAVAILABLE}")
    drawn = " (drawn pixel by pixel)" if model.autoregressive else ""
    also = "".join(f", {d.n} {SET_PREFIXES[name]} images" for name, d in other_sets.items())
    log(f"[evaluate] {checkpoint}: {test.n} test images{also}, IWAE k={k}, {n_samples} samples{drawn} on {dev}")
    result = evaluate_model(model, cfg, test, test_x.float() / 255, k=k, batch_size=batch_size, mi_batch=mi_batch,
                            n_samples=n_samples, seed=cfg.train.seed + 777, out_dir=checkpoint.parent / "eval",
                            classifier=classifier,
                            test_labels=splits.test_y[: test.n] if splits.has_labels else None, other_sets=other_sets)
    if classifier_info is not None:
        result["params"]["classifier_test_accuracy"] = classifier_info["test_accuracy"]
    else:
        result["unavailable"] = {name: CLASS_FEATURES_UNAVAILABLE for name in CLASS_FEATURE_METRICS}
    m = result["metrics"]
    settings = {"k": k_arg, "batch_size": batch_size, "mi_batch": mi_batch, "n_samples": n_samples_arg,
                "test_subset": test_subset, "train_subset": train_subset}  # as asked, before defaults
    atomic_write_json(strict_json({"checkpoint": str(checkpoint), "epoch": ck["epoch"], "step": ck["step"],
                                   "run_id": ck.get("run_id"), "settings": settings, **result,
                                   "artifacts": [str(p) for p in result.get("artifacts", [])]}),
                      checkpoint.parent / METRICS_FILE)
    features = (f"FD {m['test/fd_classifier']:.2f}  recon acc {m['test/recon_class_acc']:.1%}  "
                f"KID {m['test/kid']:.3g} ± {m['test/kid_std']:.2g}  precision {m['test/precision']:.2f}  "
                f"recall {m['test/recall']:.2f}") if "test/fd_classifier" in m else "FD/KID/PR unavailable (no labels)"
    log(
        f"[evaluate] iwae_nll {m['test/iwae_nll']:.2f}  elbo {m['test/elbo']:.2f}  kl {m['test/kl']:.2f}  "
        f"active {m['test/active_units']}/{cfg.model.latent_dim}  MI {m['test/mutual_info']:.2f}  "
        f"z_gap {m['test/z_usage_gap']:.2f}  "
        f"sample sharpness (laplacian) {m['test/sharpness/samples_laplacian_ratio']:.2f}× data  {features}"
    )
    for name in other_sets:
        log(f"[evaluate] {SET_PREFIXES[name]}: elbo {m[f'{name}/elbo']:.2f}  recon_nll {m[f'{name}/recon_nll']:.2f}  "
            f"at E[z] {m[f'{name}/recon_nll_mean_z']:.2f}  kl {m[f'{name}/kl']:.2f}")
    _record(result, ck, cfg, sink, checkpoint, log)
    return result


def other_image_sets(cfg: RunConfig, splits, test_x: torch.Tensor, dev: torch.device,
                     train_subset: bool | int) -> dict[str, DeviceData]:
    """The image sets scored besides the test set (see pipeline.metric_table):

    trainset  the first `train_subset` images the run trained on (True: as many as the test set), as training
              saw them: statically binarized with the training draw, a fixed draw for dynamic binarization
              (its training bits change every epoch), never augmented;
    test_aug  for an augmented run, the test images through the run's augmentation, one fixed draw
              (seeded by the split), then binarized like the test set."""
    out = {}
    if train_subset is not False:
        n = test_x.shape[0] if train_subset is True else int(train_subset)
        train_x = splits.train_x[: cfg.data.train_subset] if cfg.data.train_subset else splits.train_x
        if cfg.data.binarize == "static":
            # The training draw is made over the whole training tensor: draw it the same way (on the CPU),
            # then cut, and only the cut goes to the device.
            out["trainset"] = DeviceData(binarize_static(train_x, cfg.data.split_seed)[:n], dev, "none")
        else:
            out["trainset"] = DeviceData(train_x[:n], dev, "static" if cfg.data.binarize == "dynamic" else "none",
                                         static_seed=cfg.data.split_seed + 3)
    augment = augmenter(cfg.data)
    if augment is not None:
        gen = torch.Generator().manual_seed(cfg.data.split_seed + 4)
        augmented = torch.cat([augment(chunk.float() / 255, gen).mul_(255).round_().to(torch.uint8)
                               for chunk in test_x.split(1000)])
        out["test_aug"] = DeviceData(augmented, dev, "static" if cfg.data.binarize != "none" else "none",
                                     static_seed=cfg.data.split_seed + 2)
    return out


def record_saved_evaluation(checkpoint: Path, step: int, sink, settings: dict, log=print) -> bool:
    """Finish recording an evaluation of this checkpoint that was saved to metrics.json in this MLflow run,
    with these `settings` (evaluate_stage's arguments), but maybe not fully logged (the process died in
    between): log only the points the run lacks, so no (key, step) is stored twice. False when there is no
    such evaluation (a user's own re-evaluation with other settings included): then evaluate as usual."""
    try:
        saved = read_metrics(checkpoint.parent / METRICS_FILE)
    except (OSError, ValueError):
        return False
    if (sink.run_id is None or saved.get("run_id") != sink.run_id or saved.get("step") != step
            or saved.get("settings") != settings):
        return False
    log(f"[evaluate] {checkpoint}: evaluated before the last interruption; recording what the run lacks")
    saved["artifacts"] = [Path(p) for p in saved.get("artifacts", []) if Path(p).exists()]
    _record(saved, {"run_id": sink.run_id, "step": step}, None, sink, checkpoint, log, only_missing=True)
    return True


def _record(result: dict, ck: dict, cfg: RunConfig | None, sink, checkpoint: Path, log=print,
            only_missing: bool = False) -> None:
    run_id = ck.get("run_id")
    if sink is None:
        if run_id is None or not cfg.tracking.enabled:
            log(f"[evaluate] the checkpoint belongs to no MLflow run: results are in {checkpoint.parent / METRICS_FILE} only")
            return
        from pipeline.tracking import reopen_run, tracking_uri

        sink = reopen_run(run_id)
        if sink is None:
            log(f"[evaluate] MLflow run {run_id} is not in {tracking_uri()}: results are in "
                f"{checkpoint.parent / METRICS_FILE} only")
            return
    step = int(ck["step"])
    points = {**result["metrics"], **{f"test/{k}": v for k, v in result["params"].items()}}
    # A re-evaluation logs newer points at the same step on purpose (MLflow then shows them); finishing an
    # interrupted record must not.
    stored = sink.last_steps(list(points)) if only_missing else {}
    sink.log_metrics([(k, float(v), step) for k, v in points.items()
                      if not math.isnan(float(v)) and stored.get(k, -1) < step])
    if result.get("unavailable"):
        sink.set_tags({"class_feature_metrics": CLASS_FEATURES_UNAVAILABLE[:5000]})
    for path in result.get("artifacts", []):
        sink.log_artifact(path, "eval")
    sink.log_artifact(checkpoint.parent / METRICS_FILE, "eval")
    sink.flush()
