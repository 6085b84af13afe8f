"""Free bits and β schedules: small pure functions, each with its source (the KL itself is the prior's).

β_t is a pure function of the global step, so resuming a run needs no schedule state beyond the
step itself, and a schedule can be plotted without training anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


# --- Free bits (Kingma et al. 2016, "Improved VI with IAF", Eq. 15) -------------------------------
# Each returns the penalised KL of the batch, a scalar, from the per-example KL (B,), the per-dimension
# KL (B, D) (None when the prior does not factorize; config validation keeps per_dim away from those
# priors) and λ in nats. clamp(min=λ) passes zero gradient while the KL is below λ: the encoder is
# free to spend λ nats.
def free_bits_none(kl: torch.Tensor, kl_per_dim: torch.Tensor | None, lam: float) -> torch.Tensor:
    return kl.mean()


def free_bits_per_dim(kl: torch.Tensor, kl_per_dim: torch.Tensor | None, lam: float) -> torch.Tensor:
    """Σ_j max(λ, E_batch[KL_j])."""
    if kl_per_dim is None:
        raise ValueError("free bits per dimension need a per-dimension KL (a prior that factorizes)")
    return kl_per_dim.mean(0).clamp(min=lam).sum()


def free_bits_total(kl: torch.Tensor, kl_per_dim: torch.Tensor | None, lam: float) -> torch.Tensor:
    """max(λ, E_batch[Σ_j KL_j])."""
    return kl.mean().clamp(min=lam)


FREE_BITS_MODES: dict[str, Callable[[torch.Tensor, torch.Tensor | None, float], torch.Tensor]] = {
    "none": free_bits_none,
    "per_dim": free_bits_per_dim,
    "total": free_bits_total,
}


# --- β schedules ---------------------------------------------------------------------------------
# Signature: (step, total_steps, beta_max, warmup_steps, delay_steps, cycles, ramp_ratio) → β_t.
# `step` counts optimizer steps from 0; β is 0 for the first `delay_steps` of every non-constant
# schedule.
def beta_constant(step, total_steps, beta_max, warmup_steps, delay_steps, cycles, ramp_ratio) -> float:
    return float(beta_max)


def beta_linear(step, total_steps, beta_max, warmup_steps, delay_steps, cycles, ramp_ratio) -> float:
    """Linear warm-up from 0 to β_max (Bowman et al. 2016, "KL annealing")."""
    t = step - delay_steps
    if t < 0:
        return 0.0
    return float(beta_max) * min(1.0, t / warmup_steps)


def beta_sigmoid(step, total_steps, beta_max, warmup_steps, delay_steps, cycles, ramp_ratio) -> float:
    """Logistic warm-up centred mid-warm-up, β = β_max·σ(10(t/warmup − ½)): ≈0.7% → 99.3%."""
    t = step - delay_steps
    if t < 0:
        return 0.0
    return float(beta_max) / (1.0 + math.exp(-10.0 * (t / warmup_steps - 0.5)))


def beta_cyclical(step, total_steps, beta_max, warmup_steps, delay_steps, cycles, ramp_ratio) -> float:
    """Fu et al. 2019, Eq. 4: M cycles over the run; ramp linearly for a fraction R of each, then hold."""
    t = step - delay_steps
    if t < 0:
        return 0.0
    period = max(1.0, (total_steps - delay_steps) / cycles)
    tau = (t % period) / period
    return float(beta_max) * min(1.0, tau / ramp_ratio)


BETA_SCHEDULES: dict[str, Callable[..., float]] = {
    "constant": beta_constant,
    "linear": beta_linear,
    "sigmoid": beta_sigmoid,
    "cyclical": beta_cyclical,
}


def beta_at(step: int, total_steps: int, objective) -> float:
    """β_t for an ObjectiveConfig-like object."""
    fn = BETA_SCHEDULES[objective.schedule]
    return fn(
        step,
        total_steps,
        objective.beta,
        objective.warmup_steps,
        objective.delay_steps,
        objective.cycles,
        objective.ramp_ratio,
    )
