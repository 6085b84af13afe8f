"""Diagnostics of collapse, likelihood and sharpness: pure functions of tensors, each with its source.

Conventions: images are (N, C, H, W) in [0, 1] (the sharpness measures take each colour channel as a
grey image and average over channels); posterior means and log-variances are (N, D);
log-densities are in nats. Nothing here touches files or tracking; the model's densities and samples
come from its own methods (pipeline.vae), never from a formula written here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.vae.posterior import DiagonalGaussian

COLLAPSED_KL = 0.01  # nats: a dimension whose mean KL is below this carries no information
ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2015, Sec. 5.2


# --- collapse ------------------------------------------------------------------------------------
def kl_dimension_stats(mu: torch.Tensor, logvar: torch.Tensor) -> dict[str, object]:
    """Mean KL to N(0, I) per dimension over the data, (D,), with the rate and collapse counts.

    Defined for the standard normal prior (the only shipped prior that factorizes)."""
    kl = DiagonalGaussian(mu.double(), logvar.double()).kl_per_dim().mean(0)  # (D,)
    return {
        "kl_per_dim": kl,
        "rate": float(kl.sum()),
        "kl_dim_max": float(kl.max()),
        "collapsed_dims": int((kl < COLLAPSED_KL).sum()),
    }


def active_units(mu: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> tuple[int, torch.Tensor]:
    """Burda et al. 2015: A_j = Cov_x(E_q[z_j | x]); unit j is active when A_j > threshold."""
    activity = mu.double().var(0, unbiased=False)  # (D,)
    return int((activity > threshold).sum()), activity


def mutual_information(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> float:
    """I(x; z) under the batch's aggregate posterior (He et al. 2019, "Lagging inference networks").

    I = E_x E_q(z|x)[log q(z|x)] − E_x E_q(z|x)[log q(z)], with q(z) ≈ (1/B) Σ_j q(z|x_j) over the
    batch. The estimate cannot exceed log B, so a large fixed batch is used and its size reported.
    """
    mu, logvar = mu.double(), logvar.double()
    b = mu.shape[0]
    z = DiagonalGaussian(mu, logvar).rsample(generator=generator)  # (B, D): one sample per x
    log_q_zi_xj = DiagonalGaussian(mu.unsqueeze(0), logvar.unsqueeze(0)).log_prob(z.unsqueeze(1))  # (B, B)
    log_q_zi_xi = log_q_zi_xj.diagonal()
    log_qz = torch.logsumexp(log_q_zi_xj, dim=1) - math.log(b)
    # He et al. take E[log q(z|x)] in closed form (minus the entropy); evaluating it at the same z as
    # log q(z) has the same expectation, and makes the two limiting cases exact: 0 when every
    # posterior is the same, log B when they do not overlap (known-answer tests rely on that).
    return float((log_q_zi_xi - log_qz).mean())


# --- likelihood ----------------------------------------------------------------------------------
@torch.no_grad()
def iwae_log_likelihood(model, x: torch.Tensor, k: int, chunk: int = 100,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Importance-weighted estimate of log p(x) per example, (B,) (Burda et al. 2015, Eq. 8).

    log p(x) ≈ logsumexp_i [log p(x|z_i) + log p(z_i) − log q(z_i|x)] − log k, z_i ~ q(z|x), with the
    log-weights from ``model.log_weights`` `chunk` at a time, combined with a running log-sum-exp, so
    memory is O(B · chunk) whatever k is.
    """
    running = torch.full((x.shape[0],), -math.inf, dtype=torch.float64, device=x.device)
    for log_w in model.log_weights(x, k, chunk=chunk, generator=generator):  # (m, B)
        running = torch.logaddexp(running, torch.logsumexp(log_w, dim=0))
    return running - math.log(k)


def bits_per_dim(nll_nats: float, n_dims: int, levels: int | None = None) -> float:
    """NLL in bits per dimension. For a density evaluated on uniformly dequantized data with
    `levels` values per dimension, (nll + D·ln levels)/(D·ln 2) bounds the discrete model's bits
    (Theis et al. 2016); for a probability mass pass levels=None."""
    offset = n_dims * math.log(levels) if levels else 0.0
    return (nll_nats + offset) / (n_dims * math.log(2))


def dequantize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """8-bit intensities k/255 → (k + u)/256 with u ~ U[0, 1): a density's data on [0, 1)."""
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (torch.round(x * 255) + u) / 256


def z_usage_gap(recon_nll, z: torch.Tensor) -> float:
    """How much the decoder uses z: mean recon NLL with codes swapped across the batch minus matched.

    `recon_nll(codes)` scores the batch's images at the codes, (B,) → (B,). ≈ 0 means every x is
    decoded as well from another image's code as from its own: the decoder ignores z (posterior
    collapse seen from the decoder's side). Each x gets its neighbour's code (a cyclic shift), so no
    image keeps its own, as a random permutation sometimes would.
    """
    if z.shape[0] < 2:
        raise ValueError("z_usage_gap needs a batch of at least 2")
    matched = recon_nll(z).mean()
    swapped = recon_nll(z.roll(1, dims=0)).mean()
    return float(swapped - matched)


# --- sharpness -----------------------------------------------------------------------------------
# Every measure treats each colour channel as a grey image, (N, C, H, W) → (N·C, 1, H, W), and averages
# over all N·C of them: the mean over channels of each channel's mean over images (every channel has N).
# Grey images (C = 1) are unchanged by this; an RGB image with three equal channels scores as its grey one.
_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def _per_channel(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) → (N·C, 1, H, W) float: each colour channel of each image as a grey image."""
    return images.float().reshape(-1, 1, *images.shape[-2:])


def _conv(images: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    k = kernel.to(images.device, images.dtype).view(1, 1, 3, 3)
    return F.conv2d(images, k)  # valid convolution: no border artefacts


def laplacian_variance(images: torch.Tensor) -> float:
    """Variance of the Laplacian (Pech-Pacheco et al. 2000), averaged over images and colour channels."""
    return float(_conv(_per_channel(images), _LAPLACIAN).flatten(1).var(1).mean())


def tenengrad(images: torch.Tensor) -> float:
    """Tenengrad (Krotkov 1987): mean squared Sobel gradient magnitude, averaged over images and colour channels."""
    x = _per_channel(images)
    gx, gy = _conv(x, _SOBEL_X), _conv(x, _SOBEL_X.T)
    return float((gx * gx + gy * gy).mean())


def high_frequency_ratio(images: torch.Tensor, cutoff: float = 0.25) -> float:
    """Share of spectral energy above `cutoff` (cycles/pixel, Nyquist = 0.5), Hann-windowed.

    The window suppresses the spurious high frequencies a non-periodic image's borders create;
    the windowed mean is removed so overall brightness does not enter the ratio. Averaged over images
    and colour channels.
    """
    x = _per_channel(images)[:, 0]
    h, w = x.shape[-2:]
    window = torch.outer(torch.hann_window(h, periodic=False), torch.hann_window(w, periodic=False)).to(x.device)
    xw = x * window
    # Remove the windowed mean (a multiple of the window itself): brightness then has no effect.
    xw = xw - (xw.sum(dim=(-2, -1), keepdim=True) / window.sum()) * window
    power = torch.fft.fft2(xw).abs() ** 2  # (N, H, W)
    fy = torch.fft.fftfreq(h, device=x.device).abs().view(-1, 1)
    fx = torch.fft.fftfreq(w, device=x.device).abs().view(1, -1)
    high = (torch.sqrt(fx * fx + fy * fy) > cutoff).float()
    total = power.flatten(1).sum(1).clamp(min=1e-12)
    return float(((power * high).flatten(1).sum(1) / total).mean())


SHARPNESS_MEASURES = {
    "laplacian": laplacian_variance,
    "tenengrad": tenengrad,
    "hf_energy": high_frequency_ratio,
}


def sharpness(images: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Each measure for `images` and as a ratio to `reference` (real data: 1.0 = as sharp)."""
    out = {}
    for name, fn in SHARPNESS_MEASURES.items():
        value, ref = fn(images), fn(reference)
        out[name] = value
        out[f"{name}_ratio"] = value / ref if ref > 0 else math.nan
    return out


# --- sample quality ------------------------------------------------------------------------------
def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(m)
    return (evecs * evals.clamp(min=0).sqrt()) @ evecs.T


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Dowson & Landau 1982;
    Heusel et al. 2017, the FID formula): ‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa Σb)^½).

    Tr((Σa Σb)^½) is computed as Tr((Σa^½ Σb Σa^½)^½), whose argument is symmetric PSD, so only
    symmetric eigendecompositions are needed (in float64).
    """
    a, b = features_a.double(), features_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.atleast_2d(torch.cov(a.T)), torch.atleast_2d(torch.cov(b.T))
    root_a = _sqrtm_psd(cov_a)
    inner = root_a @ cov_b @ root_a
    tr_cross = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    return float(((mu_a - mu_b) ** 2).sum() + cov_a.trace() + cov_b.trace() - 2 * tr_cross)


# --- sample quality: blur against mode dropping --------------------------------------------------
KID_SUBSETS = 100  # Bińkowski et al. 2018 report KID's mean and standard deviation over 100 subsets
KID_SUBSET_SIZE = 1000  # … of 1,000 images each
PR_NEIGHBOURS = 3  # k of the k-NN manifolds: Kynkäänniemi et al. 2019 use k = 3
# Squared distances below this share of the largest |x|² are rounding error of the matrix-product form
# |a|² + |b|² − 2 aᵀb (near 1e-15 in float64) and are taken as 0: identical feature vectors are then at
# distance exactly 0, as the ≤ of the k-NN manifolds needs (see precision_recall).
_SAME_POINT = 1e-12


def polynomial_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KID's kernel k(x, y) = (xᵀy / d + 1)³ between the rows of (M, d) and (N, d), as (M, N)
    (Bińkowski et al. 2018, "Demystifying MMD GANs")."""
    return (a @ b.T / a.shape[1] + 1) ** 3


def mmd2_unbiased(k_aa: torch.Tensor, k_bb: torch.Tensor, k_ab: torch.Tensor) -> float:
    """The unbiased estimate of MMD² from kernel matrices within and across two samples of M and N points
    (Gretton et al. 2012, "A kernel two-sample test", Eq. 3): the within-sample means leave out the
    diagonal (i ≠ j), the cross term keeps every pair. It can be negative when the two distributions
    are the same."""
    m, n = k_aa.shape[0], k_bb.shape[0]
    within_a = (k_aa.sum() - k_aa.diagonal().sum()) / (m * (m - 1))
    within_b = (k_bb.sum() - k_bb.diagonal().sum()) / (n * (n - 1))
    return float(within_a + within_b - 2 * k_ab.mean())


def kernel_inception_distance(features_a: torch.Tensor, features_b: torch.Tensor, n_subsets: int = KID_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE,
                              generator: torch.Generator | None = None) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018): the unbiased MMD² with the cubic polynomial kernel between two feature
    sets (N, d), (M, d), averaged over `n_subsets` pairs of random subsets of min(subset_size, N, M) rows
    each (drawn without replacement within a subset, from `generator` on the CPU).

    Returns (mean, standard deviation over the subsets, n − 1). The standard deviation is the spread of one
    subset's estimate, not the error of the mean (the subsets overlap); when neither set is larger than
    `subset_size`, every subset is a whole set and it is 0. The mean is ≈ 0 for two samples of one
    distribution, unlike the Fréchet distance, whose plug-in estimate is biased upwards for small N."""
    a, b = features_a.double(), features_b.double()
    size = min(subset_size, a.shape[0], b.shape[0])
    if size < 2 or n_subsets < 1:
        raise ValueError(f"KID needs subsets of at least 2 rows and at least one subset, got {size} rows "
                         f"from feature sets of {a.shape[0]} and {b.shape[0]}, {n_subsets} subsets")
    estimates = torch.empty(n_subsets, dtype=torch.float64)
    for i in range(n_subsets):
        x = a[torch.randperm(a.shape[0], generator=generator)[:size].to(a.device)]
        y = b[torch.randperm(b.shape[0], generator=generator)[:size].to(b.device)]
        estimates[i] = mmd2_unbiased(polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y))
    return float(estimates.mean()), float(estimates.std()) if n_subsets > 1 else 0.0


def _squared_distances(a: torch.Tensor, b: torch.Tensor, sq_norm_a: torch.Tensor, sq_norm_b: torch.Tensor,
                       zero_below: float) -> torch.Tensor:
    """‖a_i − b_j‖², (M, N), as |a|² + |b|² − 2 aᵀb (one matrix product); values ≤ `zero_below` set to 0."""
    d2 = torch.addmm(sq_norm_b[None, :], a, b.T, alpha=-2).add_(sq_norm_a[:, None])
    return d2.masked_fill_(d2 <= zero_below, 0.0)


def _row_blocks(n_rows: int, n_cols: int, max_elements: int) -> list[slice]:
    """Consecutive blocks of rows of an (n_rows, n_cols) matrix, each at most `max_elements` (≥ 1 row)."""
    step = max(1, max_elements // max(1, n_cols))
    return [slice(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def knn_radii_squared(features: torch.Tensor, k: int = PR_NEIGHBOURS, max_elements: int = 2**22) -> torch.Tensor:
    """Squared distance of each row of (N, d) to its k-th nearest other row, (N,): the radius of its
    hypersphere in the k-NN estimate of the set's manifold (Kynkäänniemi et al. 2019, Sec. 2).

    A point's own distance (0) is the smallest of its row, so the (k+1)-th smallest is the k-th other
    point; an identical copy counts as another point, at distance 0. Distances are computed a block of
    rows at a time, at most `max_elements` of them at once (32 MB of float64 by default)."""
    x = features.double()
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"a k-NN manifold needs 1 ≤ k < the number of points, got k={k} for {n} points")
    sq_norm = (x * x).sum(1)
    zero_below = _SAME_POINT * float(sq_norm.max())
    radii = torch.empty(n, dtype=torch.float64, device=x.device)
    for rows in _row_blocks(n, n, max_elements):
        d2 = _squared_distances(x[rows], x, sq_norm[rows], sq_norm, zero_below)
        radii[rows] = d2.topk(k + 1, dim=1, largest=False).values[:, k]  # the (k+1)-th smallest
    return radii


def precision_recall(real: torch.Tensor, generated: torch.Tensor, k: int = PR_NEIGHBOURS,
                     max_elements: int = 2**22) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, Eqs. 1–2) of generated against real
    feature vectors (N, d), (M, d).

    Each set's manifold is the union of balls around its points, each ball reaching the point's k-th
    nearest neighbour in the set. Precision is the share of generated points inside the real manifold
    (low: samples off the data, e.g. blurred or with artefacts); recall is the share of real points
    inside the generated manifold (low: parts of the data the model never produces, mode dropping).

    A point is inside a ball when its distance is ≤ the radius, as in the paper: a ball of radius 0 (a
    point with k identical copies) then still holds the point itself, so two identical sets score
    precision = recall = 1 and a set of copies of one real image has recall ≈ 1/N, not 0. The
    generated × real distances are computed once, a block of generated rows at a time."""
    r, g = real.double(), generated.double()
    real_radii = knn_radii_squared(r, k, max_elements)
    generated_radii = knn_radii_squared(g, k, max_elements)
    sq_norm_r, sq_norm_g = (r * r).sum(1), (g * g).sum(1)
    zero_below = _SAME_POINT * max(float(sq_norm_r.max()), float(sq_norm_g.max()))
    in_real = torch.zeros(g.shape[0], dtype=torch.bool, device=g.device)
    covered = torch.zeros(r.shape[0], dtype=torch.bool, device=r.device)
    for rows in _row_blocks(g.shape[0], r.shape[0], max_elements):
        d2 = _squared_distances(g[rows], r, sq_norm_g[rows], sq_norm_r, zero_below)  # (block, N)
        in_real[rows] = (d2 <= real_radii[None, :]).any(1)
        covered |= (d2 <= generated_radii[rows, None]).any(0)
    return float(in_real.double().mean()), float(covered.double().mean())
