"""Training recipes: a TOML file of sections, every key typed and range-checked.

    camelid train configs/quickstart.toml --set optim.lr=1e-3 --set train.steps=200
    camelid train quickstart        # a shipped recipe, by name

Unknown sections or keys, wrong types and values out of range are errors that name the key,
raised when the recipe is loaded, before any work starts. Each numeric key declares its range
next to its default (``_ranged``); the check, :func:`recipe_keys` and the table in
docs/training.md (a test compares them) all read it from there.

Relative paths (``data.dir``, ``data.tokenizer``, ``run.out_dir``) in a recipe file are relative
to that file's directory, so the recipe means the same from any directory; in a shipped recipe
(a template inside the package) and in ``--set`` values they are relative to the current
directory. A loaded recipe holds absolute paths, and so does the resolved ``recipe.toml``
written to every run directory.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from camelid.config import PRESETS, ModelConfig, RopeScaling
from camelid.errors import CamelidError, ConfigError
from camelid.model.lora import TARGETS as LORA_TARGETS
from camelid.model.lora import LoraConfig


class RecipeError(CamelidError):
    """A recipe that cannot be run as written."""


def shipped_dir() -> Path:
    """The recipes that ship inside the package (``configs/`` at the repository root)."""
    return Path(str(resources.files("camelid") / "configs"))


def shipped_recipes() -> list[str]:
    """The names ``camelid train NAME`` accepts, sorted."""
    return sorted(p.stem for p in shipped_dir().glob("*.toml"))


def find_recipe(name: str | Path) -> Path:
    """``name`` as a recipe file: an existing file, else a shipped recipe of that name
    (``quickstart`` or ``quickstart.toml``). An unknown name lists the shipped ones."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        run_dir = path.parent.parent if (path / "trainer.json").is_file() else path  # a checkpoint
        saved = run_dir / "recipe.toml"
        hint = f"; the run's recipe is {saved}" if saved.is_file() else ""
        raise RecipeError(f"{path}: is a directory, not a recipe file{hint}")
    stem = path.name.removesuffix(".toml")
    if str(path.parent) == "." and stem in shipped_recipes():
        return shipped_dir() / f"{stem}.toml"
    raise RecipeError(
        f"{name}: no such recipe file, nor a shipped recipe of that name "
        f"(shipped: {', '.join(shipped_recipes())})"
    )


def is_shipped(path: Path) -> bool:
    """Whether ``path`` is one of the package's own recipes (also through the ``configs/``
    symlink): a template whose relative paths mean the user's current directory."""
    return path.resolve().parent == shipped_dir().resolve()


# ------------------------------------------------------------------------ declared ranges
@dataclass(frozen=True)
class Range:
    """The values a numeric key accepts. A bound is a number or another key of the recipe
    (``le="train.steps"``); at most one lower (``ge``/``gt``) and one upper (``le``/``lt``)."""

    ge: float | str | None = None
    gt: float | str | None = None
    le: float | str | None = None
    lt: float | str | None = None

    @property
    def crosses_keys(self) -> bool:
        return any(isinstance(b, str) for b in (self.ge, self.gt, self.le, self.lt))

    def text(self) -> str:
        """As the docs and the errors write it: ``>= 1``, ``> 0``, ``[0, 1)``, ``[0, optim.lr]``."""
        lo = ("[", self.ge) if self.ge is not None else ("(", self.gt)
        hi = ("]", self.le) if self.le is not None else (")", self.lt)
        if lo[1] is not None and hi[1] is not None:
            return f"{lo[0]}{_bound(lo[1])}, {_bound(hi[1])}{hi[0]}"
        if lo[1] is not None:
            return f"{'>=' if lo[0] == '[' else '>'} {_bound(lo[1])}"
        return f"{'<=' if hi[0] == ']' else '<'} {_bound(hi[1])}"

    def check(self, key: str, value: float, recipe: Recipe) -> None:
        bounds = {k: recipe.get(b) if isinstance(b, str) else b
                  for k, b in (("ge", self.ge), ("gt", self.gt), ("le", self.le), ("lt", self.lt))
                  if b is not None}  # fmt: skip
        ok = (
            value >= bounds.get("ge", -math.inf)
            and value > bounds.get("gt", -math.inf)
            and value <= bounds.get("le", math.inf)
            and value < bounds.get("lt", math.inf)
        )
        if not ok:
            text = self.text()
            where = "in " if text[0] in "[(" else ""
            refs = [b for b in (self.ge, self.gt, self.le, self.lt) if isinstance(b, str)]
            given = "".join(f" with {b} = {recipe.get(b)!r}" for b in refs)
            raise RecipeError(f"{key} must be {where}{text}, got {value!r}{given}")


def _bound(b: float | str) -> str:
    return b if isinstance(b, str) else f"{b:g}"


def _ranged(default: Any, **bounds: float | str) -> Any:
    """A numeric field and the values it accepts, e.g. ``_ranged(0.9, ge=0, lt=1)``."""
    return field(default=default, metadata={"range": Range(**bounds)})


def _one_of(default: str, *choices: str) -> Any:
    return field(default=default, metadata={"choices": choices})


def _path(default: str) -> Any:
    """A path: relative to the recipe file's directory (see the module docstring)."""
    return field(default=default, metadata={"path": True})


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
class InitSection:
    # Start from these weights instead of a random init: a Hugging Face Llama directory, a
    # camelid run or one of its checkpoints. The model is theirs ([model] may only set
    # max_seq_len) and so is the tokenizer: the data must be prepared with it.
    model: str = _path("")


@dataclass
class LoraSection:
    # LoRA fine-tuning of an init.model: rank r of the adapters (0: off, every weight trains),
    # scale alpha / r, dropout on the adapters' input, the projections adapted (peft's names).
    r: int = _ranged(0, ge=0)
    alpha: float = _ranged(16.0, gt=0)
    dropout: float = _ranged(0.0, ge=0, lt=1)
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))

    def config(self) -> LoraConfig | None:
        """The adapters' settings (None: off); a bad target is an error naming the valid ones."""
        if self.r == 0:
            return None
        try:
            return LoraConfig(r=self.r, alpha=self.alpha, dropout=self.dropout,
                              target_modules=tuple(self.targets))  # fmt: skip
        except ConfigError as e:
            raise RecipeError(str(e).replace("lora target_modules", "lora.targets")) from None


@dataclass
class DpoSection:
    # Direct preference optimisation of init.model on preference pairs: a JSONL file of
    # {"prompt", "chosen", "rejected"} (empty: off). The tokenizer is init.model's; data.dir
    # is not used. val_data: held-out pairs, scored at every evaluation (empty: none).
    data: str = _path("")
    val_data: str = _path("")
    beta: float = _ranged(0.1, gt=0)  # how far the policy may move from the reference
    label_smoothing: float = _ranged(0.0, ge=0, lt=0.5)  # conservative DPO's share of noise
    max_len: int = _ranged(0, ge=0)  # tokens of prompt + longer completion; 0: train.seq_len
    truncate: bool = False  # cut a longer pair's completions to fit, instead of skipping it

    @property
    def enabled(self) -> bool:
        return bool(self.data)


@dataclass
class DataSection:
    dir: str = _path("")  # a dataset written by `camelid prepare` (required)
    tokenizer: str = _path("")  # must be the tokenizer the dataset was prepared with


@dataclass
class OptimSection:
    lr: float = _ranged(3e-3, gt=0)
    min_lr: float = _ranged(3e-4, ge=0, le="optim.lr")
    weight_decay: float = _ranged(0.1, ge=0)
    beta1: float = _ranged(0.9, ge=0, lt=1)
    beta2: float = _ranged(0.95, ge=0, lt=1)
    eps: float = _ranged(1e-8, gt=0)
    grad_clip: float = _ranged(1.0, ge=0)  # 0: measure the norm only, never clip


@dataclass
class ScheduleSection:
    kind: str = _one_of("cosine", "cosine", "wsd", "constant")
    warmup_steps: int = _ranged(100, ge=0, le="train.steps")
    decay_fraction: float = _ranged(0.2, ge=0, le=1)  # wsd: share of the steps spent decaying


@dataclass
class TrainSection:
    steps: int = _ranged(1000, ge=1)
    batch_size: int = _ranged(8, ge=1)  # sequences per micro-batch, per rank
    grad_accum: int = _ranged(1, ge=1)
    seq_len: int = _ranged(256, ge=1)
    seed: int = _ranged(0, ge=0)
    device: str = _one_of("auto", "auto", "cpu", "cuda")
    precision: str = _one_of("auto", "auto", "fp32", "bf16")  # auto: bf16 on GPU, fp32 on CPU
    compile: bool = False
    activation_checkpointing: bool = False
    expert_parallel: bool = False  # under torchrun: split each MoE layer's experts over ranks


@dataclass
class MoeSection:
    """How a mixture-of-experts model's experts are kept balanced (a dense model ignores it)."""

    # DeepSeek-V3's auxiliary-loss-free balancing: after each kept step every expert's selection
    # bias moves by this much toward the mean load (up if under-loaded, down if over); 0: off.
    # DeepSeek-V3 used 0.001 over a very long run; in runs of thousands of steps that is too
    # slow to stop a collapse, 0.01 stops it (measured, docs/moe.md).
    bias_update_rate: float = _ranged(1e-2, ge=0)
    aux_loss_coef: float = _ranged(0.0, ge=0)  # Switch auxiliary loss (Switch used 0.01); 0: off
    z_loss_coef: float = _ranged(0.0, ge=0)  # router z-loss (ST-MoE used 0.001); 0: off


@dataclass
class CheckpointSection:
    interval: int = _ranged(500, ge=0)  # steps; 0: only at the end
    keep: int = _ranged(3, ge=0)  # 0: keep every checkpoint
    export_hf: bool = True  # write Hugging Face weights + tokenizer at the end


@dataclass
class EvalSection:
    interval: int = _ranged(200, ge=0)  # steps; 0: only at the end
    batches: int = _ranged(20, ge=1)
    sample_prompt: str = "def fibonacci(n):\n"
    sample_tokens: int = _ranged(64, ge=0)  # 0: no sample
    sample_chat: bool = False  # the prompt as a user turn of the chat template (chat models)
    temperature: float = _ranged(0.0, ge=0)  # 0: greedy


@dataclass
class LogSection:
    interval: int = _ranged(10, ge=1)
    tensorboard: bool = False


@dataclass
class GuardSection:
    enabled: bool = True
    window: int = _ranged(50, ge=1)  # recent good losses the spike detector compares with
    z_threshold: float = _ranged(6.0, gt=0)  # robust z-score (median / MAD) of a spike
    min_history: int = _ranged(20, ge=1, le="guard.window")  # good steps before detecting
    max_bad_steps: int = _ranged(3, ge=0)  # bad steps in a row before a roll-back (0: never)
    # MoE: a step whose max |router logit| exceeds this is bad (0: never). Past ~20 a sigmoid
    # gate is saturated (1 - 2e-9) and a softmax gap of 20 gives one expert all the weight, so
    # at 50 the router passes no useful gradient; a z-loss there (logsumexp² ~ 2500) would dwarf
    # the LM loss; and it is still below fp32's exp overflow (88.7), so it fires before infs do.
    router_logit_limit: float = _ranged(50.0, ge=0)
    # MoE: warn once when an expert got no token for this many steps in a row (0: never).
    dead_expert_steps: int = _ranged(20, ge=0)
    # A fire drill: "nan:STEP" or "spike:STEP" corrupts that step's loss on purpose, to check
    # that the guard reacts (each fires once).
    drill: list[str] = field(default_factory=list)


@dataclass
class RunSection:
    out_dir: str = _path("runs/run")
    peak_tflops: float = _ranged(0.0, ge=0)  # for MFU; 0: a known GPU's, or measured on CPU


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    init: InitSection = field(default_factory=InitSection)
    lora: LoraSection = field(default_factory=LoraSection)
    dpo: DpoSection = field(default_factory=DpoSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    moe: MoeSection = field(default_factory=MoeSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    log: LogSection = field(default_factory=LogSection)
    guard: GuardSection = field(default_factory=GuardSection)
    run: RunSection = field(default_factory=RunSection)

    def get(self, key: str) -> Any:
        """The value of ``section.key``."""
        section, _, name = key.partition(".")
        return getattr(getattr(self, section), name)

    def validate(self) -> None:
        """Every declared range and choice (keys whose bounds name other keys last, so those
        are checked first), then the checks that span sections."""
        declared = [(key, f) for key, f in _declared_fields() if "range" in f.metadata]
        declared.sort(key=lambda kf: kf[1].metadata["range"].crosses_keys)
        for key, f in declared:
            f.metadata["range"].check(key, self.get(key), self)
        for key, f in _declared_fields():
            if "choices" in f.metadata:
                _choice(key, self.get(key), f.metadata["choices"])
        t = self.train
        if self.init.model:
            other = sorted(set(self.model.overrides) - {"max_seq_len"})
            if other:
                raise RecipeError(
                    f"init.model {self.init.model} gives the model, so [model] may only set "
                    f"max_seq_len, not {', '.join(other)}"
                )
        if self.dpo.enabled:  # before [lora]'s: DPO without init.model is told as such
            self._validate_dpo()
        self.lora.config()  # its targets are checked here
        if self.lora.r and not self.init.model:
            raise RecipeError(
                "lora.r > 0 adapts a trained model: set init.model to the one to fine-tune"
            )
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
        if t.expert_parallel and not config.is_moe and not self.init.model:
            raise RecipeError(
                f"train.expert_parallel = true splits the experts of a mixture-of-experts model, "
                f"but model {self.model.preset!r} with these fields is dense (n_experts = 0)"
            )
        if self.dpo.val_data and not self.dpo.enabled:
            raise RecipeError("dpo.val_data is set but dpo.data is not: set the training pairs")
        if not self.data.dir and not self.dpo.enabled:
            raise RecipeError("data.dir is required: a dataset directory from `camelid prepare`")
        for drill in self.guard.drill:
            kind, _, step = drill.partition(":")
            if kind not in ("nan", "spike") or not step.isdigit():
                raise RecipeError(f"guard.drill: {drill!r} is not 'nan:STEP' or 'spike:STEP'")

    def _validate_dpo(self) -> None:
        """A DPO run fine-tunes init.model on dpo.data, with init.model's tokenizer."""
        if not self.init.model:
            raise RecipeError(
                "dpo.data trains a model on preference pairs: set init.model to the one to "
                "fine-tune (a Hugging Face directory, a camelid run or a checkpoint)"
            )
        for key in ("data.dir", "data.tokenizer"):
            if self.get(key):
                raise RecipeError(
                    f"{key} is for token datasets; a DPO run reads dpo.data with init.model's "
                    f"tokenizer: remove {key}"
                )
        if self.dpo_max_len < 2:
            key = "dpo.max_len" if self.dpo.max_len else "train.seq_len (dpo.max_len = 0)"
            raise RecipeError(f"{key} must be at least 2 for a DPO run, got {self.dpo_max_len}")

    @property
    def dpo_max_len(self) -> int:
        """The most tokens of a pair's prompt plus its longer completion."""
        return self.dpo.max_len or self.train.seq_len

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
        """The recipe as a file that reads back to the same run. Paths are written absolute
        (a relative one in memory means the current directory, in a file the file's)."""
        lines = ["# The resolved recipe of this run (file + --set overrides + defaults)."]
        paths = {key for key, f in _declared_fields() if f.metadata.get("path")}
        for section, values in self.to_dict().items():
            lines.append(f"\n[{section}]")
            for key, value in values.items():
                if f"{section}.{key}" in paths and value:
                    value = os.path.abspath(value)
                if value is not None:
                    lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"


def _declared_fields() -> list[tuple[str, dataclasses.Field]]:
    """``(section.key, field)`` for every key outside [model] (whose keys are ModelConfig's)."""
    out = []
    for section in fields(Recipe):
        if section.name != "model":
            out += [(f"{section.name}.{f.name}", f) for f in fields(section.default_factory)]
    return out


@dataclass(frozen=True)
class RecipeKey:
    """One documented key: what docs/training.md's table shows for it."""

    key: str
    type: str  # int, float, bool, str, list[str]
    default: str  # as TOML
    allowed: str  # the range (``[0, 1)``), the choices (``cosine, wsd, constant``) or ""


def recipe_keys() -> list[RecipeKey]:
    """Every key outside [model], with its type, default and allowed values."""
    out = []
    for key, f in _declared_fields():
        section = key.split(".")[0]
        hint = typing.get_type_hints(type(getattr(Recipe(), section)))[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if "range" in f.metadata:
            allowed = f.metadata["range"].text()
        elif "choices" in f.metadata:
            allowed = ", ".join(f.metadata["choices"])
        else:
            allowed = ""
        name = getattr(hint, "__name__", None) if typing.get_origin(hint) is None else None
        out.append(RecipeKey(key, name or str(hint), _toml_value(default), allowed))
    return out


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
    """Read ``path`` (a file or a shipped recipe's name; None: only defaults), apply
    ``section.key=value`` overrides, resolve paths, and check every key."""
    raw: dict[str, Any] = {}
    base = None  # the directory the file's relative paths are relative to (None: the cwd)
    if path is not None:
        path = find_recipe(path)
        try:
            raw = tomllib.loads(path.read_text())
        except OSError as e:
            raise RecipeError(f"{path}: cannot read the recipe ({e.strerror or e})") from None
        except UnicodeDecodeError:
            raise RecipeError(f"{path}: not a text file, so not a TOML recipe") from None
        except tomllib.TOMLDecodeError as e:
            raise RecipeError(f"{path}: not valid TOML ({e})") from None
        base = None if is_shipped(path) else path.parent
    from_file = {(s, k) for s, v in raw.items() if isinstance(v, dict) for k in v}
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
        from_file.discard((section, name))  # typed on the command line: relative to the cwd
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
    for key, f in _declared_fields():
        value = recipe.get(key)
        if f.metadata.get("path") and value:
            section, name = key.split(".")
            value = Path(value).expanduser()
            if base is not None and (section, name) in from_file:
                value = base / value  # an absolute value stays as it is
            setattr(getattr(recipe, section), name, os.path.abspath(value))
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
