"""Your own encoder or decoder, named by import path: ``model.encoder: mypackage.nets:MyEncoder``.

A value of ``model.encoder`` / ``model.decoder`` with a colon is an import path, ``module.path:ClassName``
(a built-in family name never has one). The class must be a ``torch.nn.Module``; the module is imported
when the config is loaded, so a typo fails before any data is touched.

The protocol (C×H×W images, D = ``model.latent_dim``):

Encoder
    Built as ``Cls(latent_dim=D, image_shape=(C, H, W), **model.encoder_args)``. ``forward(x)`` takes x of
    shape (B, C, H, W), float in [0, 1], and returns the diagonal Gaussian q(z|x) as ``(mu, logvar)``, each
    (B, D) float, or as a ``pipeline.vae.posterior.DiagonalGaussian``.

Decoder
    Built as ``Cls(latent_dim=D, image_shape=(C, H, W), params_per_pixel=P, **model.decoder_args)``.
    ``forward(z)`` takes z of shape (B, D) and returns the likelihood's raw parameters, (B, P, C, H, W).
    P is the likelihood's ``params_per_pixel`` (pipeline/likelihoods.py): 1 for bernoulli and
    continuous_bernoulli (a logit), 1 for gaussian, gaussian_learned and laplace (the mean intensity in
    [0, 1]), 2 for discretized_logistic (location on [−1, 1], then log scale), 256 for categorical (a
    logit per 8-bit level).

    A class attribute ``autoregressive = True`` makes it a PixelCNN-style decoder: ``forward(z, x)`` is then
    teacher-forced on the image it scores and must be causal in raster order (the output at a pixel and
    colour channel depends on z, the pixels before it, and the earlier channels of the pixel itself),
    and images are drawn from it pixel by pixel with a likelihood that can be sampled per value (bernoulli,
    categorical, discretized_logistic). Sampling runs it on the whole image for every pixel, unless the
    instance declares ``rows_above = R``: the promise that it is fully convolutional and that a pixel sees
    at most R rows above it and R columns either side, so a crop of that window gives its output exactly
    (as ``pipeline/vae/pixelcnn.py`` does).

Before training (and whenever a checkpoint is loaded), ``check_custom_modules`` runs each custom module
on a batch of two images under ``torch.no_grad`` and names any mismatch of type, shape, dtype, finiteness
or causality. ``source_digest`` gives the SHA-256 of the module's source file, which the train stage
tags on the MLflow run (``model.encoder_source_sha256``, ``model.decoder_source_sha256``).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import re
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import PipelineError
from pipeline.fileio import atomic_write_json
from pipeline.likelihoods import LIKELIHOODS, Likelihood
from pipeline.vae.decoders import DECODERS, DecoderEntry
from pipeline.vae.encoders import ENCODERS
from pipeline.vae.posterior import DiagonalGaussian

_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
# Constructor arguments the pipeline passes itself, per role.
PASSED = {"encoder": ("latent_dim", "image_shape"), "decoder": ("latent_dim", "image_shape", "params_per_pixel")}
SOURCES_RECORD = "model_sources.json"  # in the run directory: the digests a run started with
DUMMY_BATCH = 2


class CustomModuleError(PipelineError, ValueError):
    """A user's encoder or decoder does not load, build or follow the protocol."""


def is_import_path(name: str | None) -> bool:
    """Whether a `model.encoder`/`model.decoder` value names a class by import path (registry names have no ':')."""
    return isinstance(name, str) and ":" in name


def load_class(spec: str, key: str) -> type[nn.Module]:
    """The nn.Module subclass `module.path:ClassName` names; `key` (model.encoder, …) is named in every error."""
    if not _IMPORT_PATH.fullmatch(spec):
        raise CustomModuleError(f"{key}={spec!r} is not an import path: write module.path:ClassName "
                                "(e.g. mypackage.nets:MyEncoder), with the module dotted and one colon before the class")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # The module itself or a parent package is missing, not a module it imports (nets_v2 importing nets).
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise CustomModuleError(
                f"{key}={spec!r}: cannot import module {module_name!r} (ModuleNotFoundError: {e}); install the "
                "package that holds it (pip install -e <its project>) or put its directory on PYTHONPATH "
                "(`python -m pipeline` run from that directory finds it too)") from None
        raise CustomModuleError(f"{key}={spec!r}: importing module {module_name!r} failed, {_described(e)}; "
                                f"install what it imports ({e.name!r})") from None
    except Exception as e:  # its own code failed: a syntax error, an error at import time
        raise CustomModuleError(f"{key}={spec!r}: importing module {module_name!r} failed, {_described(e)}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            modules = sorted(n for n, v in vars(module).items()
                             if isinstance(v, type) and issubclass(v, nn.Module) and v.__module__ == module.__name__)
            defined = f"; it defines the nn.Module classes {', '.join(modules)}" if modules else ""
            raise CustomModuleError(f"{key}={spec!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) "
                                    f"has no attribute {attr!r}{defined}")
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        what = f"a {type(obj).__name__}" if not isinstance(obj, type) else f"the class {obj.__name__}"
        raise CustomModuleError(f"{key}={spec!r} is {what}, not a subclass of torch.nn.Module: the pipeline builds "
                                "the class with its constructor arguments and calls its forward")
    return obj


def check_constructor_args(cls: type, spec: str, role: str, args: dict[str, Any]) -> None:
    """Fail at config load when the constructor cannot take what the pipeline will pass (its own arguments
    and model.<role>_args): a misspelt option is then named before any data is touched."""
    clash = sorted(set(args) & set(PASSED[role]))
    if clash:
        raise CustomModuleError(f"model.{role}_args sets {', '.join(clash)}, which the pipeline passes itself "
                                f"({', '.join(PASSED[role])}); remove {'it' if len(clash) == 1 else 'them'}")
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):  # a signature Python cannot read: the build names any mismatch
        return
    try:
        signature.bind(**dict.fromkeys(PASSED[role]), **args)
    except TypeError as e:
        bare = signature.replace(parameters=[p.replace(annotation=inspect.Parameter.empty)
                                             for p in signature.parameters.values()], return_annotation=inspect.Signature.empty)
        raise CustomModuleError(
            f"model.{role}={spec!r}: its constructor {cls.__name__}{bare} cannot take "
            f"{_call(cls, role, args)} ({e}); the pipeline passes {', '.join(PASSED[role])}, and model.{role}_args "
            "the rest") from None


def decoder_entry(name: str) -> DecoderEntry:
    """The DECODERS entry of a family, or a view of a custom decoder's class as one (autoregressive from
    its class attribute; an autoregressive one works with the likelihoods that can be sampled per value)."""
    if not is_import_path(name):
        return DECODERS[name]
    cls = load_class(name, "model.decoder")
    autoregressive = bool(getattr(cls, "autoregressive", False))
    sampleable = frozenset(n for n, lik in LIKELIHOODS.items() if lik.sample is not None and lik.pixel_log_prob is not None)
    return DecoderEntry(lambda m, shape, p: build_decoder(m, shape, p), autoregressive,
                        f"{cls.__module__}.{cls.__qualname__}", sampleable if autoregressive else None)


def display_name(name: str) -> str:
    """A family name, or a custom class's name without its module (run names stay short)."""
    return name.rpartition(":")[2] if is_import_path(name) else name


# --- building --------------------------------------------------------------------------------------
class CustomEncoder(nn.Module):
    """The user's encoder (child `net`, so its state_dict keys are `net.…`) with its output as a DiagonalGaussian."""

    def __init__(self, net: nn.Module, spec: str):
        super().__init__()
        self.net = net
        self.spec = spec

    def forward(self, x: torch.Tensor) -> DiagonalGaussian:
        out = self.net(x)
        return out if isinstance(out, DiagonalGaussian) else DiagonalGaussian(*out)


class CustomDecoder(nn.Module):
    """The user's decoder (child `net`). An autoregressive one without `rows_above` sees the whole image
    at every sampling step: the crop of rows 0…r that sampling passes is padded below with zeros (the
    values not yet drawn, which a causal decoder ignores) and its output cropped back."""

    def __init__(self, net: nn.Module, image_shape: tuple[int, int, int], spec: str):
        super().__init__()
        self.net = net
        self.spec = spec
        self.image_shape = tuple(image_shape)
        self.autoregressive = bool(getattr(type(net), "autoregressive", False))
        declared = getattr(net, "rows_above", None)
        self.windowed = declared is not None
        self.rows_above = int(declared) if declared is not None else max(image_shape[1:])

    def forward(self, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        if not self.autoregressive:
            return self.net(z)
        height, width = x.shape[-2:]
        if self.windowed or (height, width) == self.image_shape[1:]:
            return self.net(z, x)
        whole = F.pad(x, (0, self.image_shape[2] - width, 0, self.image_shape[1] - height))
        return self.net(z, whole)[..., :height, :width]


def build_encoder(m, image_shape: tuple[int, int, int]) -> nn.Module:
    """The encoder `model.encoder` names: a family from ENCODERS, or the user's class wrapped in CustomEncoder."""
    name = m.encoder_name
    if not is_import_path(name):
        return ENCODERS[name](m, image_shape)
    cls = load_class(name, "model.encoder")
    net = _construct(cls, name, "encoder", dict(latent_dim=m.latent_dim, image_shape=tuple(image_shape)), m.encoder_args)
    return CustomEncoder(net, name)


def build_decoder(m, image_shape: tuple[int, int, int], params_per_pixel: int) -> nn.Module:
    """The decoder `model.decoder` names: a family from DECODERS, or the user's class wrapped in CustomDecoder."""
    name = m.decoder_name
    if not is_import_path(name):
        return DECODERS[name].build(m, image_shape, params_per_pixel)
    cls = load_class(name, "model.decoder")
    passed = dict(latent_dim=m.latent_dim, image_shape=tuple(image_shape), params_per_pixel=params_per_pixel)
    return CustomDecoder(_construct(cls, name, "decoder", passed, m.decoder_args), image_shape, name)


def _construct(cls: type[nn.Module], spec: str, role: str, passed: dict[str, Any], args: dict[str, Any]) -> nn.Module:
    try:
        net = cls(**passed, **args)
    except Exception as e:
        call = ", ".join(f"{k}={v!r}" for k, v in {**passed, **args}.items())
        raise CustomModuleError(f"model.{role}={spec!r} raised {type(e).__name__} in its constructor "
                                f"{cls.__name__}({call}): {_described(e, cls).partition(': ')[2]}") from None
    return net


# --- the dummy-batch check ---------------------------------------------------------------------------
def check_custom_modules(m, encoder: nn.Module, decoder: nn.Module, image_shape: tuple[int, int, int],
                         likelihood: Likelihood) -> None:
    """Run each custom module on a batch of two images and raise CustomModuleError naming the first
    mismatch with the protocol; nothing for built-in families.

    The global RNG is restored afterwards and the modules run in eval mode (then get their modes back),
    so dropout draws and batch-norm statistics leave the run's numbers as they would be without the check.
    """
    custom_encoder, custom_decoder = isinstance(encoder, CustomEncoder), isinstance(decoder, CustomDecoder)
    if not (custom_encoder or custom_decoder):
        return
    modes = {module: module.training for module in (*encoder.modules(), *decoder.modules())}
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            encoder.eval()
            decoder.eval()
            x = torch.rand(DUMMY_BATCH, *image_shape, generator=torch.Generator().manual_seed(0))
            if custom_encoder:
                q = _check_encoder_output(_forward(encoder.net, (x,), m.encoder_name, "encoder"), m)
            else:
                q = encoder(x)
            if custom_decoder:
                _check_decoder(decoder, q.mu.float(), x, m, image_shape, likelihood.params_per_pixel)
    finally:
        for module, training in modes.items():
            module.training = training


def _forward(net: nn.Module, inputs: tuple[torch.Tensor, ...], spec: str, role: str) -> Any:
    try:
        return net(*inputs)
    except Exception as e:
        shapes = " and ".join(_shape(t) for t in inputs)
        raise CustomModuleError(f"model.{role}={spec!r} raised {type(e).__name__} in forward on a {shapes} batch: "
                                f"{_described(e, type(net)).partition(': ')[2]}") from None


def _check_encoder_output(out: Any, m) -> DiagonalGaussian:
    spec, d = m.encoder_name, m.latent_dim
    where = f"model.encoder={spec!r}"
    if isinstance(out, DiagonalGaussian):
        parts = {"mu": out.mu, "logvar": out.logvar}
    elif isinstance(out, (tuple, list)) and len(out) == 2:
        parts = {"mu": out[0], "logvar": out[1]}
    else:
        got = f"a tensor of shape {_shape(out)}" if isinstance(out, torch.Tensor) else _kind(out)
        raise CustomModuleError(f"{where} returned {got} from forward; expected (mu, logvar), each of shape "
                                f"({DUMMY_BATCH}, {d}) for a batch of {DUMMY_BATCH} and model.latent_dim={d}, or a "
                                "pipeline.vae.posterior.DiagonalGaussian")
    for label, t in parts.items():
        _check_tensor(t, (DUMMY_BATCH, d), f"{where}: {label}", f"(batch {DUMMY_BATCH}, model.latent_dim={d})")
    return DiagonalGaussian(parts["mu"], parts["logvar"])


def _check_decoder(decoder: CustomDecoder, z: torch.Tensor, x: torch.Tensor, m, image_shape, p: int) -> None:
    spec = m.decoder_name
    where = f"model.decoder={spec!r}"
    inputs = (z, x) if decoder.autoregressive else (z,)
    out = _forward(decoder.net, inputs, spec, "decoder")
    expected = (DUMMY_BATCH, p, *image_shape)
    if not isinstance(out, torch.Tensor):
        raise CustomModuleError(f"{where} returned {_kind(out)} from forward; expected a tensor of the likelihood's "
                                f"parameters, shape {expected}")
    _check_tensor(out, expected, f"{where}: forward's output", f"(batch, params_per_pixel={p}, C, H, W)")
    if decoder.autoregressive:
        _check_causal(decoder, z, x, out, where)
        if decoder.windowed:
            _check_window(decoder, z, x, out, where)


def _check_tensor(t: Any, expected: tuple[int, ...], where: str, meaning: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise CustomModuleError(f"{where} is {_kind(t)}, expected a tensor of shape {expected} {meaning}")
    if tuple(t.shape) != expected:
        raise CustomModuleError(f"{where} has shape {tuple(t.shape)}, expected {expected} {meaning}")
    if not t.is_floating_point():
        raise CustomModuleError(f"{where} has dtype {t.dtype}, expected a floating-point tensor")
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise CustomModuleError(f"{where} has {bad} non-finite value(s) (NaN or inf) on a batch of {DUMMY_BATCH} "
                                "images in [0, 1] at initialization")


def _same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Equal up to float rounding: a convolution may sum zero-weighted taps in another order.
    return (a - b).abs() <= 1e-5 + 1e-4 * a.abs().max()


def _check_causal(decoder: CustomDecoder, z: torch.Tensor, x: torch.Tensor, out: torch.Tensor, where: str) -> None:
    """Change one value of x (the centre pixel, each colour channel in turn); every output that comes at or
    before it in the raster-then-channel order must stay put (van den Oord et al. 2016, PixelRNN Sec. 3.4)."""
    n_colors, height, width = x.shape[1:]
    r, c = height // 2, width // 2
    flat = torch.arange(height * width).view(height, width)
    before = (flat < r * width + c).unsqueeze(0).expand(n_colors, height, width)  # (C, H, W)
    for ch in range(n_colors):
        changed = x.clone()
        changed[:, ch, r, c] = (changed[:, ch, r, c] + 0.5) % 1
        fixed = before.clone()
        fixed[: ch + 1, r, c] = True  # its own channel and the earlier ones may not see it
        moved = ~_same(out, _forward(decoder.net, (z, changed), decoder.spec, "decoder"))
        leak = (moved.any(dim=(0, 1)) & fixed).nonzero()
        if len(leak):
            ch2, r2, c2 = (int(v) for v in leak[0])
            raise CustomModuleError(
                f"{where} has autoregressive = True but is not causal: changing x at pixel ({r}, {c}), channel {ch} "
                f"changed its output at pixel ({r2}, {c2}), channel {ch2}, which comes no later in raster order; "
                "mask its convolutions so each output sees only earlier pixels (and earlier channels of its own "
                "pixel), as pipeline/vae/pixelcnn.py does")


def _check_window(decoder: CustomDecoder, z: torch.Tensor, x: torch.Tensor, out: torch.Tensor, where: str) -> None:
    """With rows_above = R, the last pixel's output from the window sampling crops (R rows above, R columns
    to the left) must equal the whole image's."""
    reach = decoder.rows_above
    height, width = x.shape[-2:]
    top, left = max(0, height - 1 - reach), max(0, width - 1 - reach)
    crop = x[:, :, top:, left:]
    windowed = _forward(decoder.net, (z, crop), decoder.spec, "decoder")
    if not isinstance(windowed, torch.Tensor) or windowed.shape[-2:] != crop.shape[-2:] \
            or not _same(out[..., -1, -1], windowed[..., -1, -1]).all():
        got = _shape(windowed) if isinstance(windowed, torch.Tensor) else _kind(windowed)
        raise CustomModuleError(
            f"{where} declares rows_above={reach}, but on the {tuple(crop.shape)} window that pixel-by-pixel "
            f"sampling passes for the last pixel it returns {got} whose last pixel differs from the whole image's: "
            "rows_above promises a fully convolutional decoder that sees at most that many rows above and columns "
            "beside a pixel; declare a larger value, or none (sampling then runs it on the whole image)")


# --- traceability ------------------------------------------------------------------------------------
def source_file(cls: type) -> str:
    """The file that defines a class's module, or 'unavailable'."""
    try:
        return str(Path(inspect.getsourcefile(cls)).resolve())
    except (TypeError, OSError):
        return "unavailable"


def source_digest(cls: type) -> str:
    """SHA-256 of the source file of a class's module; of the class's own source when the file cannot be
    read; 'unavailable' when neither can."""
    path = source_file(cls)
    if path != "unavailable":
        try:
            return hashlib.sha256(Path(path).read_bytes()).hexdigest()
        except OSError:
            pass
    try:
        return hashlib.sha256(inspect.getsource(cls).encode()).hexdigest()
    except (TypeError, OSError):
        return "unavailable"


def source_tags(m) -> dict[str, str]:
    """`model.<role>_source_sha256` and `…_source_file` of each custom module of a model config."""
    tags = {}
    for role, name in (("encoder", m.encoder_name), ("decoder", m.decoder_name)):
        if is_import_path(name):
            cls = load_class(name, f"model.{role}")
            tags[f"model.{role}_source_sha256"] = source_digest(cls)
            tags[f"model.{role}_source_file"] = source_file(cls)
    return tags


def record_sources(m, run_dir: Path, resuming: bool, log) -> dict[str, str]:
    """The source tags of a run's custom modules, as recorded when the run started (run_dir/model_sources.json).

    A run that resumes with a module whose source has changed since keeps its starting digests as tags,
    gets the new one as `…_source_sha256_at_resume`, and a warning in the log: its weights came from two
    versions of the code. Fresh starts (and --restart) record the current sources.
    """
    now = source_tags(m)
    path = Path(run_dir) / SOURCES_RECORD
    try:
        started = json.loads(path.read_text()) if resuming else None
    except (OSError, ValueError):
        started = None
    if not isinstance(started, dict):
        if now or path.exists():
            atomic_write_json(now, path)
        return now
    tags = dict(now)
    for key, digest in now.items():
        if key.endswith("_sha256") and started.get(key) not in (None, digest):
            role = key.removeprefix("model.").removesuffix("_source_sha256")
            log(f"[train] warning: the source of model.{role} changed since this run started "
                f"(sha256 {started[key]} then, {digest} now, {now[key.replace('sha256', 'file')]}); the resumed run "
                "continues with the new code")
            tags[key] = started[key]
            tags[f"{key}_at_resume"] = digest
    return tags


# --- messages ----------------------------------------------------------------------------------------
def _described(e: BaseException, cls: type | None = None) -> str:
    """`TypeError: message (at file:line)`, at the innermost line of the user's class's file (else the
    innermost line), in place of a traceback."""
    frames = traceback.extract_tb(e.__traceback__)
    theirs = source_file(cls) if cls is not None else None
    own = [f for f in frames if theirs and Path(f.filename).resolve() == Path(theirs)]
    frame = (own or frames or [None])[-1]
    at = f" (at {frame.filename}:{frame.lineno})" if frame else ""
    if isinstance(e, SyntaxError) and e.filename:
        at = f" (at {e.filename}:{e.lineno})"
    return f"{type(e).__name__}: {e}{at}"


def _call(cls: type, role: str, args: dict[str, Any]) -> str:
    shown = [f"{k}=…" for k in PASSED[role]] + [f"{k}={v!r}" for k, v in args.items()]
    return f"{cls.__name__}({', '.join(shown)})"


def _shape(t: Any) -> str:
    return f"({', '.join(str(s) for s in t.shape)})" if isinstance(t, torch.Tensor) else _kind(t)


def _kind(obj: Any) -> str:
    if isinstance(obj, (tuple, list)):
        inner = ", ".join(_shape(v) if isinstance(v, torch.Tensor) else type(v).__name__ for v in obj)
        return f"a {type(obj).__name__} of {len(obj)} ({inner})"
    return "None" if obj is None else f"a {type(obj).__name__}"
