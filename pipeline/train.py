"""The training loop: one VAE run, every loss component tracked every step, resumable exactly.

``fit`` talks to tracking only through a sink object (``log_metrics``, ``log_artifact``,
``last_steps``), so it runs the same with MLflow, without tracking, or in tests. The stage around it
(run directory, MLflow run, caching, evaluation afterwards) is ``pipeline.stages.train_stage``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pipeline.augment import augmenter
from pipeline.checkpoint import CHECKPOINT, load_checkpoint
from pipeline.config import RunConfig
from pipeline.data import DataError, DeviceData, Splits, ensure_splits
from pipeline.fileio import atomic_torch_save
from pipeline.images import pairs, save_grid
from pipeline.objectives import FREE_BITS_MODES, beta_at
from pipeline.optim import INITS, LR_SCHEDULES, build_optimizer, lr_at
from pipeline.runtime import resolve_device, rng_state, seed_all, set_rng_state
from pipeline.vae import VAE, build_vae

PER_STEP_KEYS = (
    "train/recon_nll",
    "train/kl",
    "train/kl_penalized",
    "train/beta",
    "train/loss",
    "train/elbo",
    "train/grad_norm",
    "train/lr",
)
SIGMA_KEY = "train/sigma"
EPOCH_KEYS = ("val/elbo", "val/recon_nll", "val/kl", "train/images_per_s")
# Priors without an analytic KL: the spread of the one-sample KL estimate behind train/kl, per image.
KL_SD_KEY = "val/kl_mc_sd"
_LOSS_COL, _GRAD_COL = PER_STEP_KEYS.index("train/loss"), PER_STEP_KEYS.index("train/grad_norm")


class DivergedError(RuntimeError):
    def __init__(self, step: int, epoch: int, why: str = "non-finite loss or gradient"):
        super().__init__(f"{why} at step {step} (epoch {epoch})")
        self.step, self.epoch = step, epoch


class DivergenceGuard:
    """Training that explodes but stays finite (lr = 10 peaks at a loss of 1e12 and ends with no active
    unit): diverged once the loss has stayed above `early + FACTOR · max(|early|, 1)` for WINDOW consecutive
    steps, where `early` is the median loss of the run's first EARLY_STEPS steps. A healthy VAE's loss
    starts at its highest (an untrained decoder) and a β warm-up adds at most the KL, a few hundred nats,
    so no run that trains comes near 1000× its first loss; the window keeps one wild batch from ending a
    run. The state is saved in the checkpoint, so a resumed run counts exactly as an uninterrupted one."""

    EARLY_STEPS, FACTOR, WINDOW = 20, 1000.0, 50

    def __init__(self, state: dict | None = None):
        state = state or {}
        self.early: list[float] = list(state.get("early", []))
        self.above_since: int | None = state.get("above_since")

    def state(self) -> dict:
        return {"early": list(self.early), "above_since": self.above_since}

    @property
    def limit(self) -> float | None:
        if len(self.early) < self.EARLY_STEPS:
            return None
        ref = sorted(self.early)[len(self.early) // 2]
        return ref + self.FACTOR * max(abs(ref), 1.0)

    def update(self, losses: list[float], first_step: int) -> int | None:
        """Feed the losses of consecutive steps from `first_step`; the step the sustained excursion
        began at once it has lasted WINDOW steps, else None."""
        for i, loss in enumerate(losses):
            if len(self.early) < self.EARLY_STEPS:
                self.early.append(loss)
                continue
            if loss > self.limit:
                self.above_since = first_step + i if self.above_since is None else self.above_since
                if first_step + i - self.above_since + 1 >= self.WINDOW:
                    return self.above_since
            else:
                self.above_since = None
        return None


class StopEarly(Exception):
    """Raised by an ``on_epoch`` callback to end a run after an epoch (a study's pruner decided).

    The epoch's checkpoint and points are stored first; the run ends KILLED and tagged ``pruned``.
    """

    def __init__(self, epoch: int, reason: str = "pruned"):
        super().__init__(f"stopped after epoch {epoch}: {reason}")
        self.epoch, self.reason = epoch, reason


@dataclass
class TrainResult:
    run_dir: str
    run_id: str | None
    status: str  # finished | diverged | pruned | skipped
    epochs_done: int
    steps_done: int
    val: dict[str, float] = field(default_factory=dict)
    images_per_s: float | None = None
    diverged_at_step: int | None = None


def _check_same_data(seen: str | None, splits: Splits, run_dir: Path) -> None:
    """A run resumes only on the data its checkpoint was trained on (a user's source can change between
    attempts; prepare then prepares it again). Checkpoints written before the digest was recorded pass."""
    now = splits.manifest["splits_sha256"]
    if seen and seen != now:
        raise DataError(
            f"{run_dir}: the prepared data changed since this run's checkpoint (splits digest {seen[:12]} → {now[:12]}); "
            "resuming would train one run on two datasets. Restore the data, or train the run again from the start "
            "(`train --restart`; in a study, delete this directory and rerun the study)")


def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    # A pure function of (seed, epoch): the shuffle needs no state to resume.
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


# --- one step and one evaluation -----------------------------------------------------------------
@dataclass(frozen=True)
class StepContext:
    free_bits: object
    free_bits_lambda: float
    grad_clip: float


def train_step(model: VAE, opt, x, ctx: StepContext, beta_t, lr_t) -> torch.Tensor:
    """One optimizer step; returns the PER_STEP_KEYS row (+ σ) as a device tensor (no host sync)."""
    t = model.terms(x)
    recon_nll, kl = t.recon_nll.mean(), t.kl.mean()
    kl_penalized = ctx.free_bits(t.kl, t.kl_per_dim, ctx.free_bits_lambda)
    loss = recon_nll + beta_t * kl_penalized
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), ctx.grad_clip, foreach=True)
    opt.step()
    cols = [recon_nll, kl, kl_penalized, beta_t, loss, -(recon_nll + kl), grad_norm, lr_t]
    if t.sigma is not None:
        cols.append(t.sigma)
    return torch.stack([c.detach().float() for c in cols])


@torch.no_grad()
def elbo_terms(model: VAE, data: DeviceData, seed: int, batch_size: int = 1000) -> dict[str, float]:
    """Single-sample ELBO on a split, fixed noise so epochs are comparable. Without an analytic KL,
    val/kl averages several draws per image (VAE.kl_estimate) and val/kl_mc_sd is the one-draw spread."""
    model.eval()
    dev = data.images.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    analytic = model.prior.analytic_kl
    tot = torch.zeros(4, dtype=torch.float64, device=dev)  # sums of: ELBO, recon NLL, KL, one-draw KL sd
    for start in range(0, data.n, batch_size):
        idx = torch.arange(start, min(start + batch_size, data.n), device=dev)
        t = model.terms(data.batch(idx, generator=gen), generator=gen)
        kl, kl_sd = model.kl_estimate(t, generator=gen)
        kl_sd = torch.zeros_like(kl) if kl_sd is None else kl_sd
        tot += torch.stack([(-t.recon_nll - kl).sum(), t.recon_nll.sum(), kl.sum(), kl_sd.sum()]).double()
    model.train()
    elbo, recon, kl, kl_sd = (tot / data.n).tolist()
    return {"val/elbo": elbo, "val/recon_nll": recon, "val/kl": kl, **({} if analytic else {KL_SD_KEY: kl_sd})}


@torch.no_grad()
def render_grids(model: VAE, data: DeviceData, n: int, seed: int, out_dir: Path, tag: str) -> list[Path]:
    """Reconstructions (from the posterior mean) of the first val images, and prior samples; drawn pixel
    by pixel for an autoregressive decoder."""
    model.eval()
    dev = data.images.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    x = data.batch(torch.arange(min(n, data.n), device=dev), generator=gen)
    recon = model.reconstruct(x, generator=gen)
    samples = model.sample(n, generator=gen)
    model.train()
    return [
        save_grid(pairs(x, recon), out_dir / f"{tag}_reconstructions.png", nrow=8),
        save_grid(samples, out_dir / f"{tag}_samples.png", nrow=8),
    ]


# --- the loop ------------------------------------------------------------------------------------
def fit(
    cfg: RunConfig,
    run_dir: Path,
    sink,
    *,
    resume: bool = False,
    splits: Splits | None = None,
    log=print,
    progress: bool | None = None,
    on_epoch=None,
) -> TrainResult:
    """Train ``cfg`` in ``run_dir``; per-step metrics go to ``sink`` in blocks.

    Raises DivergedError on a non-finite loss or gradient; the checkpoint on disk is then the last
    good one (from the end of the previous epoch). ``on_epoch(row)`` is called with each epoch's
    validation row (``epoch``, ``step``, ``val/…``) once it is checkpointed, and on resume first with
    the rows of the epochs already done, so a pruner sees the whole curve; it may raise StopEarly.
    """
    run_dir = Path(run_dir)
    tc = cfg.train
    device = resolve_device(tc.device)
    seed_all(tc.seed)
    splits = splits or ensure_splits(cfg.data, log=log)

    train_x = splits.train_x[: cfg.data.train_subset] if cfg.data.train_subset else splits.train_x
    train_data = DeviceData(train_x, device, cfg.data.binarize, static_seed=cfg.data.split_seed,
                            augment=augmenter(cfg.data))
    val_data = DeviceData(splits.val_x, device, cfg.data.binarize, static_seed=cfg.data.split_seed + 1)

    model = build_vae(cfg, init_images=train_x, image_shape=tuple(train_x.shape[1:]))
    INITS[tc.init](model)  # before .to(device): the draws come from the CPU RNG whatever the device
    model = model.to(device)
    model.compute_dtype = torch.bfloat16 if tc.precision == "bf16" else None
    fits_scale = model.likelihood.fits_scale
    ctx = StepContext(
        free_bits=FREE_BITS_MODES[cfg.objective.free_bits],
        free_bits_lambda=cfg.objective.free_bits_lambda,
        grad_clip=tc.grad_clip or math.inf,
    )
    opt = build_optimizer(model, tc, device)

    n = train_data.n
    steps_per_epoch = math.ceil(n / tc.batch_size)
    total_steps = steps_per_epoch * tc.epochs
    if "lr_warmup_steps" in LR_SCHEDULES[tc.lr_schedule].options and tc.lr_warmup_steps >= total_steps:
        log(f"[train] warning: train.lr_warmup_steps={tc.lr_warmup_steps} ≥ the run's {total_steps} steps: the lr never "
            f"reaches train.lr={tc.lr:g}" + (" and never decays" if tc.lr_schedule == "cosine" else ""))
    keys = PER_STEP_KEYS + ((SIGMA_KEY,) if fits_scale else ())
    epoch_keys = EPOCH_KEYS + (() if model.prior.analytic_kl else (KL_SD_KEY,))

    start_epoch, history, sigma_star, guard = 1, [], None, DivergenceGuard()
    ckpt_path = run_dir / CHECKPOINT
    if resume and ckpt_path.exists():
        # On the CPU: RNG states must stay CPU tensors; load_state_dict moves weights where they belong.
        ck = load_checkpoint(ckpt_path, "cpu")
        _check_same_data(ck.get("splits_sha256"), splits, run_dir)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        set_rng_state(ck["rng"])
        start_epoch, history, sigma_star = ck["epoch"] + 1, ck["history"], ck.get("sigma_star")
        # A checkpoint from before the guard: it starts counting from here, its early level from these steps.
        guard = DivergenceGuard(ck.get("divergence_guard"))
        log(f"[train] resuming from epoch {ck['epoch']}/{tc.epochs} (step {ck['step']}) in {run_dir}")
    for row in history if on_epoch else ():
        on_epoch(row)
    already = sink.last_steps(keys + epoch_keys)

    lr_constant = tc.lr_schedule == "constant"
    images_dir = run_dir / "images"
    fixed_seed = tc.seed + 12345
    images_per_s = None

    store_wait_s = sink.store_wait_s
    for epoch in range(start_epoch, tc.epochs + 1):
        step0 = (epoch - 1) * steps_per_epoch
        perm = _epoch_permutation(n, tc.seed, epoch).to(device)
        betas = torch.tensor(
            [beta_at(s, total_steps, cfg.objective) for s in range(step0, step0 + steps_per_epoch)],
            device=device,
            dtype=torch.float32,
        )
        # The lr of each step: set on the optimizer as a number, logged from a device tensor (no host sync).
        lrs = [lr_at(s, total_steps, tc) for s in range(step0, step0 + steps_per_epoch)]
        lrs_t = torch.tensor(lrs, device=device, dtype=torch.float32)
        buf = torch.empty(steps_per_epoch, len(keys), device=device)  # (steps, keys) stays on device
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"epoch {epoch}/{tc.epochs}",
            disable=None if progress is None else not progress,  # None: off when not a TTY
            leave=False,
        )
        flushed = 0
        sigma_sum = 0.0
        t0 = time.perf_counter()
        for i in range(steps_per_epoch):
            x = train_data.batch(perm[i * tc.batch_size : (i + 1) * tc.batch_size])
            if not lr_constant:
                for group in opt.param_groups:
                    group["lr"] = lrs[i]
            buf[i] = train_step(model, opt, x, ctx, betas[i], lrs_t[i])
            if i + 1 - flushed >= cfg.tracking.flush_every or i == steps_per_epoch - 1:
                block = buf[flushed : i + 1].cpu()  # the one host sync per flush
                bad = ~(torch.isfinite(block[:, _LOSS_COL]) & torch.isfinite(block[:, _GRAD_COL]))
                good = int(bad.nonzero()[0, 0]) if bad.any() else block.shape[0]
                _send(sink, keys, block[:good], step0 + flushed, already)
                if fits_scale:
                    sigma_sum += float(block[:good, -1].sum())
                if good < block.shape[0]:
                    bar.close()
                    raise DivergedError(step0 + flushed + good, epoch)
                exploded_at = guard.update(block[:, _LOSS_COL].tolist(), step0 + flushed)
                if exploded_at is not None:
                    bar.close()
                    raise DivergedError(exploded_at, epoch, f"loss above {guard.limit:.4g} (1000× its early level) "
                                                            f"for {guard.WINDOW} steps in a row, starting")
                bar.update(i + 1 - flushed)
                bar.set_postfix(loss=f"{block[-1, _LOSS_COL]:.2f}", kl=f"{block[-1, 1]:.2f}")
                flushed = i + 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        images_per_s = n / (time.perf_counter() - t0)
        bar.close()

        step_end = epoch * steps_per_epoch
        if fits_scale:
            # Held-out data is scored with the σ the epoch learned, not one fitted to that data.
            sigma_star = sigma_sum / steps_per_epoch
        with model.scoring_sigma(sigma_star):
            val = elbo_terms(model, val_data, seed=fixed_seed)
            n_grid = tc.grid_images_autoregressive if model.autoregressive else tc.grid_images
            grids = render_grids(model, val_data, n_grid, fixed_seed, images_dir, f"epoch_{epoch:03d}")
        epoch_points = {**val, "train/images_per_s": images_per_s}
        _send_points(sink, epoch_points, step_end, already)
        history.append({"epoch": epoch, "step": step_end, **epoch_points})
        for png in grids:
            sink.log_artifact(png, "images")
        # Every point up to this epoch must be stored before the checkpoint says the epoch is done:
        # a resume recomputes only what comes after the checkpoint.
        sink.flush()
        atomic_torch_save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "epoch": epoch,
                "step": step_end,
                "rng": rng_state(),
                "history": history,
                "sigma_star": sigma_star,
                "divergence_guard": guard.state(),
                "config": cfg.to_dict(),
                "config_hash": cfg.result_hash(),
                "run_id": sink.run_id,
                "image_shape": list(model.image_shape),
                "splits_sha256": splits.manifest["splits_sha256"],
            },
            ckpt_path,
        )
        log(
            f"[train] epoch {epoch}/{tc.epochs}  val/elbo {val['val/elbo']:.2f}  val/recon_nll {val['val/recon_nll']:.2f}"
            f"  val/kl {val['val/kl']:.2f}  {images_per_s:,.0f} img/s"
        )
        waited, store_wait_s = sink.store_wait_s - store_wait_s, sink.store_wait_s
        epoch_s = time.perf_counter() - t0
        if waited > max(1.0, 0.1 * epoch_s):
            # Back-pressure, never dropped or thinned points: say so, the user may want a faster store.
            log(f"[train] epoch {epoch}: {waited:.1f} s of {epoch_s:.1f} s waiting for the tracking store to take "
                "the per-step metrics (every point is stored; a local SQLite store takes them fastest, see README "
                "'Tracking')")
        if on_epoch:
            on_epoch(history[-1])

    last = history[-1] if history else {}
    return TrainResult(
        run_dir=str(run_dir),
        run_id=sink.run_id,
        status="finished",
        epochs_done=tc.epochs,
        steps_done=total_steps,
        val={k: v for k, v in last.items() if k.startswith("val/")},
        images_per_s=images_per_s,
    )


def _send(sink, keys, block: torch.Tensor, first_step: int, already: dict[str, int]) -> None:
    """Each key's column of the (steps, keys) block, less the steps a resumed run already stored."""
    columns = []
    for k, values in zip(keys, block.T.tolist()):
        skip = max(0, already.get(k, -1) + 1 - first_step)
        if skip < len(values):
            columns.append((k, first_step + skip, values[skip:]))
    sink.log_columns(columns)


def _send_points(sink, points: dict[str, float], step: int, already: dict[str, int]) -> None:
    sink.log_metrics([(k, v, step) for k, v in points.items() if step > already.get(k, -1)])
