"""Run configuration: frozen, validated on load, overridable with ``--set a.b=c``.

Every key has a default here, next to what it configures; a YAML file or a study only says
what differs. Unknown keys and values outside a registry fail at load time with the key's
dotted name and the allowed keys or values, before any data is touched.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline import augment
from pipeline.data import DATASETS, SIDE_RANGE, source_path
from pipeline.data import image_shape as data_image_shape
from pipeline.datasources import SourceError, source_kind
from pipeline.errors import PipelineError
from pipeline.likelihoods import LIKELIHOODS
from pipeline.objectives import BETA_SCHEDULES, FREE_BITS_MODES
from pipeline.optim import INITS, LR_SCHEDULES, OPTIMIZERS
from pipeline.vae import custom
from pipeline.vae.decoders import DECODERS
from pipeline.vae.encoders import ENCODERS, check_image_shape
from pipeline.vae.priors import PRIORS


class ConfigError(PipelineError, ValueError):
    """A configuration problem, phrased for the person who typed it."""


class _Section(BaseModel):
    # inf and nan are refused everywhere: `objective.beta: .inf` would train a run whose every number is
    # meaningless (and YAML reads `.inf`/`.nan` as floats without complaint).
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


def _one_of(value: str, allowed, key: str) -> str:
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not one of: {', '.join(sorted(allowed))}")
    return value


def _family_or_class(value: str, families, key: str) -> str:
    """A registry family, or an import path of the user's nn.Module, imported now so a typo fails at load."""
    if not custom.is_import_path(value):
        if value not in families:
            raise ValueError(f"{key}={value!r} is not one of: {', '.join(sorted(families))} (or your own "
                             "torch.nn.Module as module.path:ClassName)")
        return value
    try:
        custom.load_class(value, key)
    except custom.CustomModuleError as e:
        raise ValueError(str(e)) from None
    return value


class DataConfig(_Section):
    # A name (fashion-mnist, mnist, cifar10, svhn, celeba) or a path: a folder of images, a .npy or .npz
    # file (pipeline.datasources); a relative path is resolved against the directory commands run in.
    dataset: str = "fashion-mnist"
    val_size: int = Field(5000, ge=1, le=30000)
    split_seed: int = 0
    # Square side the images are resized (shorter side) and centre-cropped to, 8–64; None = as the source.
    image_size: int | None = Field(None, ge=SIDE_RANGE[0], le=SIDE_RANGE[1])
    # 1 (grey) or 3 (RGB), converting as needed; None = as the source (RGB if any image has colour).
    channels: Literal[1, 3] | None = None
    # The share of a source's images that becomes the test set when the source has no test split.
    test_fraction: float = Field(0.1, gt=0, lt=1)
    binarize: Literal["none", "dynamic", "static"] = "none"
    # Train on the first N training images only (smoke runs, tests); None = all.
    train_subset: int | None = Field(None, ge=1)
    # Training-batch augmentation (pipeline.augment): none, or any of shift, hflip, intensity, noise,
    # joined by + or as a list; stored in one canonical order.
    augment: str = "none"
    max_shift: int = Field(2, ge=1, le=8)  # shift: pixels in each direction
    intensity_scale: float = Field(0.2, ge=0, lt=1)  # intensity: a ~ U[1 − s, 1 + s]
    intensity_offset: float = Field(0.1, ge=0, le=1)  # intensity: b ~ U[−o, o]
    noise_std: float = Field(0.1, gt=0, le=1)  # noise: σ on intensities in [0, 1]

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        if v in DATASETS:
            return v
        if not v.strip():
            raise ValueError(f"data.dataset is empty; give one of: {', '.join(DATASETS)}, or a path")
        looks_like_path = "/" in v or v.startswith((".", "~")) or Path(v).suffix.lower() in (".npy", ".npz") \
            or Path(v).exists()
        if not looks_like_path:
            raise ValueError(f"data.dataset={v!r} is not one of: {', '.join(DATASETS)}, nor a path to a folder of "
                             "images or a .npy/.npz file (write ./NAME for a folder in the current directory)")
        try:
            source_kind(source_path(v))
        except SourceError as e:
            raise ValueError(str(e)) from None
        # Held absolute: the config is hashed into the run's directory and stored with its checkpoint, so
        # ./images typed in two directories is two datasets, and a stored run finds its data from anywhere.
        return str(source_path(v))

    @field_validator("augment", mode="before")
    @classmethod
    def _augment(cls, v: Any) -> str:
        return augment.canonical(v)


class ModelConfig(_Section):
    # Encoder and decoder family in one key; model.encoder / model.decoder, where given, override it.
    arch: Literal["mlp", "conv"] = "mlp"
    # A family, or your own nn.Module as module.path:ClassName (protocol: pipeline/vae/custom.py).
    encoder: str | None = None  # mlp | conv | module:Class; None = model.arch
    decoder: str | None = None  # mlp | conv | pixelcnn | module:Class; None = model.arch
    latent_dim: int = Field(20, ge=1, le=512)
    hidden_dim: int = Field(400, ge=8, le=8192)
    encoder_depth: int = Field(1, ge=1, le=6)
    # Hidden layers of the MLP, conv blocks of the conv decoder, masked layers of the PixelCNN.
    decoder_depth: int = Field(1, ge=1, le=12)
    # Conv channels at the lowest resolution, hidden channels of the PixelCNN; ignored by the MLP.
    channels: int = Field(64, ge=4, le=1024)
    # Masked-convolution kernel of the PixelCNN (odd): with decoder_depth it sets how many rows above a
    # pixel the decoder sees, depth · (kernel_size // 2), which decides whether it needs z at all.
    kernel_size: int = Field(5, ge=3, le=11)
    # Keyword arguments (str, int, float, bool) of a custom encoder's / decoder's constructor, besides the
    # latent_dim, image_shape (and params_per_pixel) the pipeline passes; a family takes none.
    encoder_args: dict[str, str | bool | int | float] = {}
    decoder_args: dict[str, str | bool | int | float] = {}

    @property
    def encoder_name(self) -> str:
        return self.encoder or self.arch

    @property
    def decoder_name(self) -> str:
        return self.decoder or self.arch

    @field_validator("encoder")
    @classmethod
    def _encoder(cls, v: str | None) -> str | None:
        return v if v is None else _family_or_class(v, ENCODERS, "model.encoder")

    @field_validator("decoder")
    @classmethod
    def _decoder(cls, v: str | None) -> str | None:
        return v if v is None else _family_or_class(v, DECODERS, "model.decoder")

    @field_validator("encoder_args", "decoder_args", mode="before")
    @classmethod
    def _scalar_args(cls, v: Any, info) -> Any:
        key = f"model.{info.field_name}"
        if not isinstance(v, dict):
            raise ValueError(f"{key}={v!r} must be a mapping of argument names to values, e.g. {{width: 32}}")
        for name, value in v.items():
            if not (isinstance(name, str) and name.isidentifier()):
                raise ValueError(f"{key}: {name!r} is not a Python argument name")
            if not isinstance(value, (str, bool, int, float)):
                raise ValueError(f"{key}.{name}={value!r} is a {type(value).__name__}; constructor arguments "
                                 "from the config are scalars: a string, an integer, a float or a boolean")
        return v

    @model_validator(mode="after")
    def _custom_args(self) -> ModelConfig:
        for role, name, args in (("encoder", self.encoder_name, self.encoder_args),
                                 ("decoder", self.decoder_name, self.decoder_args)):
            if not custom.is_import_path(name):
                if args:
                    raise ValueError(
                        f"model.{role}_args={args} are arguments of your own {role}'s constructor (model.{role}: "
                        f"module.path:ClassName), and model.{role}={name!r} is a built-in family, set by the other "
                        f"model.* keys; remove model.{role}_args")
                continue
            try:
                custom.check_constructor_args(custom.load_class(name, f"model.{role}"), name, role, args)
            except custom.CustomModuleError as e:
                raise ValueError(str(e)) from None
        return self

    @field_validator("kernel_size")
    @classmethod
    def _odd_kernel(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"model.kernel_size={v} must be odd (a masked kernel is centred on its pixel): use {v - 1} or {v + 1}")
        return v


class LikelihoodConfig(_Section):
    name: str = "bernoulli"
    # Fixed scale: σ of `gaussian`, b of `laplace`, on intensities in [0, 1].
    scale: float = Field(0.1, gt=0)
    # σ-VAE soft lower clip on log σ (Rybkin et al. 2021 use −6).
    min_log_sigma: float = -6.0

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _one_of(v, LIKELIHOODS, "likelihood.name")


class PriorConfig(_Section):
    name: str = "standard_normal"
    # Mixture components of `mog`, pseudo-inputs of `vamp` (Tomczak & Welling 2018 use 500 on MNIST).
    components: int = Field(10, ge=1, le=4096)
    # Where `vamp` pseudo-inputs start: `data` (random training images, the run's seed) or `noise`.
    init: Literal["data", "noise"] = "data"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _one_of(v, PRIORS, "prior.name")


class ObjectiveConfig(_Section):
    beta: float = Field(1.0, ge=0)
    schedule: str = "constant"
    warmup_steps: int = Field(1000, ge=1)
    delay_steps: int = Field(0, ge=0)
    cycles: int = Field(4, ge=1)
    ramp_ratio: float = Field(0.5, gt=0, le=1)
    free_bits: str = "none"
    # λ in nats: per dimension for `per_dim`, for the whole KL for `total`.
    free_bits_lambda: float = Field(0.0, ge=0)

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, v: str) -> str:
        return _one_of(v, BETA_SCHEDULES, "objective.schedule")

    @field_validator("free_bits")
    @classmethod
    def _free_bits(cls, v: str) -> str:
        return _one_of(v, FREE_BITS_MODES, "objective.free_bits")


class TrainConfig(_Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    optimizer: str = "adam"  # adam | adamw | rmsprop | sgd (pipeline.optim)
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd
    weight_decay: float = Field(0.01, ge=0)  # adamw (decoupled)
    init: str = "default"  # default | xavier | kaiming: weights of the encoder and decoder
    lr_schedule: str = "constant"  # constant | warmup | cosine
    lr_warmup_steps: int = Field(500, ge=0)  # warmup and cosine: linear warm-up over this many steps
    grad_clip: float | None = Field(100.0, gt=0)
    seed: int = 0
    device: str = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    # Images per recon/sample grid logged each epoch.
    grid_images: int = Field(64, ge=1, le=256)
    # The same for an autoregressive decoder, whose images are drawn pixel by pixel (one decoder pass per
    # pixel: 16 images of the PixelCNN in studies/autoregressive.yaml take seconds on a CPU, 64 take ×4).
    grid_images_autoregressive: int = Field(16, ge=1, le=256)

    @field_validator("optimizer")
    @classmethod
    def _optimizer(cls, v: str) -> str:
        return _one_of(v, OPTIMIZERS, "train.optimizer")

    @field_validator("init")
    @classmethod
    def _init(cls, v: str) -> str:
        return _one_of(v, INITS, "train.init")

    @field_validator("lr_schedule")
    @classmethod
    def _lr_schedule(cls, v: str) -> str:
        return _one_of(v, LR_SCHEDULES, "train.lr_schedule")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda", "mps") or v.startswith("cuda:"):
            return v
        raise ValueError(f"train.device={v!r} is not one of: auto, cpu, cuda, cuda:N, mps")


class TrackingConfig(_Section):
    enabled: bool = True
    experiment: str = "default"
    run_name: str | None = None
    # Per-step metrics are buffered on the device and sent every this many steps.
    flush_every: int = Field(100, ge=1)
    # CPU, memory and (where NVML sees an NVIDIA GPU) GPU utilization, every 10 s, as system/… metrics of the
    # run, by MLflow's monitor (pipeline.system_metrics); nothing with tracking off. Off by default, as in
    # MLflow: its cost is below what throughput measurements resolve (bench/RESULTS.md, "System metrics"),
    # but it adds a writer to the store per run, and its CPU figure is the whole machine's, not the run's.
    system_metrics: bool = False


class EvalConfig(_Section):
    # Evaluate on the test set when training ends (results under test/ in the same MLflow run).
    enabled: bool = True
    # Importance samples for test/iwae_nll; None = 1000 on CUDA, 100 on CPU (an autoregressive decoder:
    # 100 on CUDA, 10 on CPU, since each sample is a decoder pass over the test set).
    iwae_k: int | None = Field(None, ge=1)
    test_subset: int | None = Field(None, ge=2)
    # Also score training images (trainset/…): true = as many as the test set, a number = that many, false = off.
    train_subset: bool | int = True

    @field_validator("train_subset", mode="before")
    @classmethod
    def _train_subset(cls, v: Any) -> bool | int:
        # One message for every wrong value: pydantic would report each member of the union separately.
        if isinstance(v, bool) or (isinstance(v, int) and v >= 2):
            return v
        raise ValueError(f"eval.train_subset={v!r} must be true (as many training images as test images), "
                         "false (off) or a number of images ≥ 2")
    batch_size: int = Field(500, ge=1)
    mi_batch: int = Field(1000, ge=2)
    # Prior samples for sample sharpness and the classifier Fréchet distance; None = 10,000 (an
    # autoregressive decoder on CPU: 256 at 1×28×28, as many drawn values at other sizes, drawn pixel by pixel,
    # and as many test reconstructions; pipeline.evaluate.default_n_samples).
    n_samples: int | None = Field(None, ge=2)


class RunConfig(_Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    likelihood: LikelihoodConfig = LikelihoodConfig()
    prior: PriorConfig = PriorConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        # The models' sizes, checked here when known without reading data (a named dataset, or a given
        # data.image_size); a path's own size is checked when it is prepared and when the model is built.
        d = self.data
        if d.dataset in DATASETS or d.image_size is not None:
            shape = data_image_shape(d) if d.dataset in DATASETS else (d.channels or 1, d.image_size, d.image_size)
            check_image_shape(shape, self.model.encoder_name, self.model.decoder_name)
        moving = [n for n in augment.parse(self.data.augment) if augment.AUGMENTATIONS[n].changes_values]
        if moving and self.data.binarize == "static":
            raise ValueError(
                f"data.augment={self.data.augment!r}: {' and '.join(moving)} change{'s' if len(moving) == 1 else ''} pixel values, and data.binarize=static "
                "fixes each pixel's bit when the data is loaded, so the images would stop being binary; use "
                "data.binarize=dynamic (bits drawn from the augmented intensities) or only shift/hflip"
            )
        if self.data.binarize != "none" and self.likelihood.name != "bernoulli":
            raise ValueError(
                f"data.binarize={self.data.binarize!r} only makes sense with likelihood.name='bernoulli' "
                f"(got {self.likelihood.name!r}); set data.binarize=none"
            )
        decoder = custom.decoder_entry(self.model.decoder_name)
        if decoder.likelihoods is not None and self.likelihood.name not in decoder.likelihoods:
            raise ValueError(
                f"model.decoder={self.model.decoder_name!r} works with likelihood.name in "
                f"{', '.join(sorted(decoder.likelihoods))}, not {self.likelihood.name!r}: it draws each pixel "
                "from a distribution over the data's discrete values"
            )
        if decoder.autoregressive and self.likelihood.name == "bernoulli" and self.data.binarize == "none":
            raise ValueError(
                f"model.decoder={self.model.decoder_name!r} with likelihood.name='bernoulli' needs binary pixels: set "
                "data.binarize=static or dynamic (or use likelihood.name=categorical for 8-bit data)"
            )
        if self.objective.free_bits == "per_dim" and not PRIORS[self.prior.name].factorized:
            raise ValueError(
                f"objective.free_bits='per_dim' needs a prior that factorizes over latent dimensions, and "
                f"prior.name={self.prior.name!r} does not: its KL has no per-dimension split to free. Use "
                "objective.free_bits=total (free bits on the whole KL, Kingma et al. 2016) or prior.name=standard_normal"
            )
        p = self.prior
        if p.name == "vamp" and p.init == "data" and self.data.train_subset is not None \
                and self.data.train_subset < p.components:
            raise ValueError(
                f"prior.components={p.components} VampPrior pseudo-inputs start from as many training images, but "
                f"data.train_subset={self.data.train_subset} has fewer; lower prior.components or set prior.init=noise"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def flat(self) -> dict[str, Any]:
        return flatten(self.to_dict())

    def describe(self) -> str:
        """A short human-readable name for run lists: the ablation axes at a glance."""
        o, m = self.objective, self.model
        fb = "" if o.free_bits == "none" else f" fb={o.free_bits}:{o.free_bits_lambda:g}"
        prior = "" if self.prior.name == "standard_normal" else f" prior={self.prior.name}:{self.prior.components}"
        encoder, decoder = custom.display_name(m.encoder_name), custom.display_name(m.decoder_name)
        arch = encoder if decoder == encoder else f"{encoder}→{decoder}"
        if "kernel_size" in custom.decoder_entry(m.decoder_name).options:
            arch += f" k={m.kernel_size}"
        t = self.train
        extra = "" if self.data.augment == "none" else f" aug={self.data.augment}"
        if (t.optimizer, t.init, t.lr_schedule) != ("adam", "default", "constant"):
            extra += f" {t.optimizer} lr={t.lr:g} init={t.init} {t.lr_schedule}"
        return (
            f"{arch} {self.likelihood.name} β={o.beta:g} {o.schedule}{fb}{prior} "
            f"dec={m.decoder_depth} z={m.latent_dim}{extra} seed={self.train.seed}"
        )

    def result_hash(self) -> str:
        """Hash of everything that changes the trained weights (not device, tracking or evaluation).

        Stable across upgrades: the keys of the first release are hashed as they always were, defaults
        included; a key added later enters the hash only when it differs from its default (which keeps
        the old behaviour), so adding a key never moves an unfinished study to new run directories.
        Prior options the chosen prior does not read (e.g. prior.components of the standard normal) are
        left out too.
        """
        d = self.to_dict()
        d.pop("tracking")
        d.pop("eval")
        d["train"].pop("device")
        d["train"].pop("grid_images_autoregressive")  # drawn with their own generator, after each epoch
        # Options the chosen prior or decoder does not read cannot change the weights.
        read = PRIORS[self.prior.name].options
        d["prior"] = {k: v for k, v in d["prior"].items() if k == "name" or k in read}
        unread = {f"data.{o}" for entry in augment.AUGMENTATIONS.values() for o in entry.options} \
            - {f"data.{o}" for o in augment.options_read(self.data.augment)}
        unread |= {f"train.{o}" for entry in OPTIMIZERS.values() for o in entry.options} \
            - {f"train.{o}" for o in OPTIMIZERS[self.train.optimizer].options}
        unread |= {f"train.{o}" for entry in LR_SCHEDULES.values() for o in entry.options} \
            - {f"train.{o}" for o in LR_SCHEDULES[self.train.lr_schedule].options}
        if self.data.dataset in DATASETS:
            unread.add("data.test_fraction")  # every named dataset has its own test split
        for key in unread:
            section, _, name = key.partition(".")
            d[section].pop(name)
        m = d["model"]
        decoder = self.model.decoder_name
        for option in {o for entry in DECODERS.values() for o in entry.options} - set(custom.decoder_entry(decoder).options):
            m.pop(option)
        for args in ("encoder_args", "decoder_args"):  # added with custom modules: hashed only when given
            if not m[args]:
                m.pop(args)
        # One spelling per model: model.arch (hashed since the first release) names the encoder's family,
        # and the decoder is hashed only where it differs from it, so `arch: conv` and `encoder: conv,
        # decoder: conv` are the same run, and a config written before the split keeps its hash.
        m["arch"] = m.pop("encoder") or m["arch"]
        m["decoder"] = None if decoder == m["arch"] else decoder
        for key, value in flatten(d).items():
            # A custom module's argument (model.encoder_args.width) has no default: always hashed.
            if key not in HASHED_SINCE_V1 and key in _DEFAULTS and value == _DEFAULTS[key]:
                section, _, name = key.rpartition(".")
                d[section].pop(name)
                if not d[section]:
                    d.pop(section)
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# The weight-changing keys of the first release: hashed always, defaults included (see result_hash).
HASHED_SINCE_V1 = frozenset({
    "data.dataset", "data.val_size", "data.split_seed", "data.binarize", "data.train_subset",
    "model.arch", "model.latent_dim", "model.hidden_dim", "model.encoder_depth", "model.decoder_depth",
    "model.channels",
    "likelihood.name", "likelihood.scale", "likelihood.min_log_sigma",
    "objective.beta", "objective.schedule", "objective.warmup_steps", "objective.delay_steps", "objective.cycles",
    "objective.ramp_ratio", "objective.free_bits", "objective.free_bits_lambda",
    "train.epochs", "train.batch_size", "train.lr", "train.grad_clip", "train.seed", "train.precision",
    "train.grid_images",
})


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


_DEFAULTS = flatten(RunConfig().to_dict())


def _allowed_keys(model: type[BaseModel]) -> list[str]:
    return sorted(model.model_fields)


def _section_model(loc: tuple) -> type[BaseModel]:
    model: type[BaseModel] = RunConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            break
    return model


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        key = ".".join(loc)
        if e["type"] == "extra_forbidden":
            section = _section_model(loc[:-1])
            where = ".".join(loc[:-1]) or "the top level"
            lines.append(
                f"unknown key {key!r}; allowed keys in {where}: {', '.join(_allowed_keys(section))}"
            )
        elif e["type"] == "finite_number":
            hint = " (null turns clipping off)" if key == "train.grad_clip" else ""
            lines.append(f"{key}={e.get('input')!r} is not a finite number; give a finite value{hint}")
        elif e["type"] == "literal_error":
            allowed = e.get("ctx", {}).get("expected", "")
            lines.append(f"{key}={e.get('input')!r} is not one of: {allowed}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            # A cross-key check (empty key) names its keys itself, and its input is the whole config.
            lines.append(msg if not key or key.split(".")[-1] in msg else f"{key}: {msg} (got {e.get('input')!r})")
    return "invalid config:\n  " + "\n  ".join(lines)


def _parse_scalar(text: str) -> Any:
    # YAML rules, so `--set train.grad_clip=null` and `--set objective.beta=1e-3` behave as in a file.
    return yaml.safe_load(text) if text.strip() else ""


def apply_overrides(d: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Apply ``a.b=c`` strings (or a {dotted: value} mapping) onto a nested dict, strictly."""
    items = overrides.items() if isinstance(overrides, dict) else [_split_override(o) for o in overrides]
    out = json.loads(json.dumps(d))
    for dotted, value in items:
        parts = dotted.split(".")
        node = out
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"cannot set {dotted!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node[parts[-1]] = value
    return out


def _split_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. objective.beta=4")
    key, _, value = text.partition("=")
    return key.strip(), _parse_scalar(value)


def build_config(data: dict[str, Any] | None = None, overrides=()) -> RunConfig:
    """Validate a nested dict (plus overrides) into a RunConfig, or raise ConfigError."""
    raw = dict(data or {})
    if isinstance(raw.get("likelihood"), str):
        raw["likelihood"] = {"name": raw["likelihood"]}  # `likelihood: bernoulli` shorthand
    raw = apply_overrides(raw, list(overrides) if not isinstance(overrides, dict) else overrides)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None


def load_config(path: str | Path | None = None, overrides=()) -> RunConfig:
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (data, model, ...), got {type(data).__name__}")
    return build_config(data, overrides)
