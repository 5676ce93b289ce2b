"""Training recipes: a TOML file of sections, every key typed and validated.

    camelid train configs/quickstart.toml --set optim.lr=1e-3 --set train.steps=200

Unknown sections or keys and wrong types are errors that name the key. The resolved recipe
(file + overrides + defaults) is written to every run directory as ``recipe.toml``.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from camelid.config import PRESETS, ModelConfig, RopeScaling
from camelid.errors import CamelidError, ConfigError


class RecipeError(CamelidError):
    """A recipe that cannot be run as written."""


# ModelConfig fields a recipe may not set: the name is the preset's.
_NOT_IN_RECIPES = ("name",)


@dataclass
class ModelSection:
    """A preset plus any of :class:`ModelConfig`'s own fields on top (``[model] preset = "tiny"
    dim = 128``); a field that is not given is the preset's — or, for ``vocab_size``, the
    tokenizer's, and for ``max_seq_len`` at least ``train.seq_len``. Each key is checked
    against ModelConfig's fields and their types, so a model field is declared only there."""

    preset: str = "llama-16m"
    overrides: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def schema() -> dict[str, Any]:
        """The keys a recipe's [model] may hold, with their types."""
        hints = typing.get_type_hints(ModelConfig)
        known = {"preset": str}
        known.update(
            (f.name, hints[f.name]) for f in fields(ModelConfig) if f.name not in _NOT_IN_RECIPES
        )
        return known

    def to_dict(self) -> dict[str, Any]:
        table = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
                 for k, v in self.overrides.items()}  # fmt: skip
        return {"preset": self.preset, **table}


@dataclass
class DataSection:
    dir: str = ""  # a dataset written by `camelid prepare`
    tokenizer: str = ""  # must be the tokenizer the dataset was prepared with


@dataclass
class OptimSection:
    lr: float = 3e-3
    min_lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class ScheduleSection:
    kind: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: share of the steps spent decaying to min_lr


@dataclass
class TrainSection:
    steps: int = 1000
    batch_size: int = 8  # sequences per micro-batch, per rank
    grad_accum: int = 1
    seq_len: int = 256
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    compile: bool = False
    activation_checkpointing: bool = False


@dataclass
class CheckpointSection:
    interval: int = 500  # steps; 0: only at the end
    keep: int = 3
    export_hf: bool = True  # write Hugging Face weights + tokenizer at the end


@dataclass
class EvalSection:
    interval: int = 200  # steps; 0: only at the end
    batches: int = 20
    sample_prompt: str = "def fibonacci(n):\n"
    sample_tokens: int = 64
    temperature: float = 0.0  # 0: greedy


@dataclass
class LogSection:
    interval: int = 10
    tensorboard: bool = False


@dataclass
class GuardSection:
    enabled: bool = True
    window: int = 50  # recent good losses the spike detector compares with
    z_threshold: float = 6.0  # robust z-score (median / MAD) above which a loss is a spike
    min_history: int = 20  # no spike detection before this many good steps
    max_bad_steps: int = 3  # consecutive bad steps before rolling back (0: never roll back)
    # A fire drill: "nan:STEP" or "spike:STEP" corrupts that step's loss on purpose, to check
    # that the guard reacts (each fires once).
    drill: list[str] = field(default_factory=list)


@dataclass
class RunSection:
    out_dir: str = "runs/run"
    peak_tflops: float = 0.0  # for MFU; 0: known GPU peak, or measured on CPU at start-up


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    log: LogSection = field(default_factory=LogSection)
    guard: GuardSection = field(default_factory=GuardSection)
    run: RunSection = field(default_factory=RunSection)

    def validate(self) -> None:
        """Checks that span keys; per-key types were checked on the way in."""
        t, s, o = self.train, self.schedule, self.optim
        for key, value in (
            ("train.steps", t.steps),
            ("train.batch_size", t.batch_size),
            ("train.grad_accum", t.grad_accum),
            ("train.seq_len", t.seq_len),
        ):
            if value <= 0:
                raise RecipeError(f"{key} must be positive, got {value}")
        _choice("train.device", t.device, ("auto", "cpu", "cuda"))
        _choice("train.precision", t.precision, ("auto", "fp32", "bf16"))
        _choice("schedule.kind", s.kind, ("cosine", "wsd", "constant"))
        if not o.lr > 0 or o.min_lr < 0 or o.min_lr > o.lr:
            raise RecipeError(
                f"need 0 <= optim.min_lr <= optim.lr and lr > 0, got {o.min_lr}, {o.lr}"
            )
        if s.warmup_steps < 0 or not 0 <= s.decay_fraction <= 1:
            raise RecipeError("schedule.warmup_steps must be >= 0 and decay_fraction in [0, 1]")
        if self.model.preset not in PRESETS:
            raise RecipeError(
                f"model.preset: unknown preset {self.model.preset!r}; known: {', '.join(PRESETS)}"
            )
        config = self.model_config(PRESETS[self.model.preset].get("vocab_size", 32000))
        given = self.model.overrides.get("max_seq_len")
        if given is not None and config.max_seq_len < t.seq_len:
            raise RecipeError(
                f"model.max_seq_len ({given}) is shorter than train.seq_len ({t.seq_len})"
            )
        if not self.data.dir:
            raise RecipeError("data.dir is required: a dataset directory from `camelid prepare`")
        for drill in self.guard.drill:
            kind, _, step = drill.partition(":")
            if kind not in ("nan", "spike") or not step.isdigit():
                raise RecipeError(f"guard.drill: {drill!r} is not 'nan:STEP' or 'spike:STEP'")

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The preset with the recipe's fields on top; vocab from the tokenizer unless given."""
        overrides = dict(self.model.overrides)
        overrides.setdefault("vocab_size", vocab_size)
        base = {**PRESETS[self.model.preset], **overrides}  # derived sizes follow the overrides
        if "max_seq_len" not in overrides:
            base["max_seq_len"] = max(base.get("max_seq_len", 0), self.train.seq_len)
        try:
            config = ModelConfig(**base)
        except ConfigError as e:  # name the recipe key when the message starts with a field
            text = str(e)
            named = text.split(" ", 1)[0] in ModelSection.schema()
            raise RecipeError(f"model.{text}" if named else f"[model] {text}") from None
        name = _model_name(self.model.preset, config, [*overrides, "max_seq_len"])
        return dataclasses.replace(config, name=name)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["model"] = self.model.to_dict()
        return out

    def to_toml(self) -> str:
        lines = ["# The resolved recipe of this run (file + --set overrides + defaults)."]
        for section, values in self.to_dict().items():
            lines.append(f"\n[{section}]")
            for key, value in values.items():
                if value is not None:
                    lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"


def _model_name(preset: str, config: ModelConfig, keys: list[str]) -> str:
    """The preset's name, or, when the recipe (or the tokenizer's vocabulary) changes the
    shape, ``llama-16m (modified: dim=64, n_layers=2)``: a 5M model is not a "llama-16m"."""
    original = ModelConfig.from_preset(preset)
    changed = []
    for key in dict.fromkeys(keys):
        value = getattr(config, key)
        if value != getattr(original, key):
            if isinstance(value, RopeScaling):
                value = f"llama3 x{value.factor:g}"
            changed.append(f"{key}={value}")
    return f"{preset} (modified: {', '.join(changed)})" if changed else preset


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read ``path`` (or only defaults when None), apply ``section.key=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise RecipeError(f"{path}: recipe file not found") from None
        except tomllib.TOMLDecodeError as e:
            raise RecipeError(f"{path}: not valid TOML ({e})") from None
    for item in overrides or []:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise RecipeError(f"--set {item!r}: expected section.key=value")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()  # a bare word: take it as a string
        raw.setdefault(section, {})[name] = value
    recipe = Recipe()
    sections = {f.name: f for f in fields(Recipe)}
    for section, values in raw.items():
        if section not in sections:
            raise RecipeError(f"unknown recipe section [{section}]; known: {', '.join(sections)}")
        if not isinstance(values, dict):
            raise RecipeError(f"[{section}] must be a table of keys")
        target = getattr(recipe, section)
        if section == "model":
            hints = ModelSection.schema()
        else:
            hints = typing.get_type_hints(type(target))
            hints = {f.name: hints[f.name] for f in fields(target)}
        for key, value in values.items():
            if key not in hints:
                raise RecipeError(
                    f"unknown recipe key {section}.{key}; known in [{section}]: {', '.join(hints)}"
                )
            value = _coerce(f"{section}.{key}", value, hints[key])
            if section == "model" and key != "preset":
                target.overrides[key] = value
            else:
                setattr(target, key, value)
    recipe.validate()
    return recipe


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the field's type; ints are accepted where floats are expected."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for t in options:
        if t is type(None) and value is None:
            return None
        if t is float and isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise RecipeError(f"{key} must be finite, got {value}")
            return float(value)
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t in (bool, str) and type(value) is t:
            return value
        if typing.get_origin(t) is list and isinstance(value, list):
            (item,) = typing.get_args(t)
            return [_coerce(key, v, item) for v in value]
        if dataclasses.is_dataclass(t) and isinstance(value, dict):  # a table, e.g. rope_scaling
            inner = typing.get_type_hints(t)
            unknown = set(value) - set(inner)
            if unknown:
                raise RecipeError(f"{key}: unknown key(s) {', '.join(sorted(unknown))}; known: "
                                  f"{', '.join(inner)}")  # fmt: skip
            kwargs = {k: _coerce(f"{key}.{k}", v, inner[k]) for k, v in value.items()}
            try:
                return t(**kwargs)
            except ConfigError as e:
                raise RecipeError(f"{key}: {e}") from None
    names = " or ".join(
        "a table" if dataclasses.is_dataclass(t) else getattr(t, "__name__", str(t))
        for t in options
        if t is not type(None)
    )
    raise RecipeError(f"{key} must be {names}, got {value!r} ({type(value).__name__})")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise RecipeError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")
