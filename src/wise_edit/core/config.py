"""The settings every editor shares: which module it wraps (`TargetConfig`) and how one
edit is optimised (`EditConfig`). Each method's config extends `EditConfig` with its own
fields and the paper's defaults; a method with several ideas of its own (WISE) groups
their fields in nested `Group` dataclasses, the way peft nests its feature configs.

Settings are named by dotted paths (``routing.alpha``) wherever they are given as text:
``--set``, ``for_model(**{"routing.alpha": ...})`` and `settings_that_differ`."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from torch import nn

from ..families import (
    check_value_module,
    decoder_layers,
    default_layer_index,
    family_of,
    get_submodule,
    infer_layers_path,
)
from .fit import StopOn
from .prompts import FORMAT_NAMES, FormatName

TARGET_FIELDS = ("layer", "target_module", "layers_path")
MAX_SEED = 2**32 - 1
"""The largest seed: `seeds` multiplies it by primes below 2**24 and torch takes seeds
below 2**64, so a larger one fails only at the first edit (as an overflow that names no
setting)."""


def type_error(value: Any, hint: Any) -> str | None:
    """Why ``value`` does not fit the annotation ``hint`` (None when it does). Numbers
    must be finite; a bool is not a number; an int is a float."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        reasons = [type_error(value, arg) for arg in args]
        if None in reasons:
            return None
        return "must be " + " or ".join(r.removeprefix("must be ") for r in reasons if r)
    if hint is type(None):
        return None if value is None else "must be null"
    if origin is Literal:
        return None if value in args else f"must be one of {', '.join(map(repr, args))}"
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return "must be a list"
        return next((type_error(v, args[0]) for v in value if type_error(v, args[0])), None)
    if hint is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else "must be an integer"
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "must be a number"
        return None if math.isfinite(value) else "must be finite"
    if hint is str:
        return None if isinstance(value, str) else "must be a string"
    return None


class Checked:
    """Type checks of every field against its annotation, and named range checks: the
    one way a config (or a group of it) refuses a bad value, naming the field."""

    def _check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            why = type_error(getattr(self, f.name), hints[f.name])
            if why:
                self._validate([(f.name, False, why)])

    def _validate(self, checks: list[tuple[str, bool, str]]) -> None:
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"{type(self).__name__}.{name}={getattr(self, name)!r}: {why}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields; groups as nested objects, tuples as lists."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, Checked):
                value = value.to_dict()
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        """The config of ``data`` as `to_dict` wrote it; an unknown field is an error."""
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__} expects an object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def groups(cls) -> dict[str, type[Group]]:
        """The nested groups of this config by field name."""
        hints = typing.get_type_hints(cls)
        return {
            f.name: hints[f.name]
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if isinstance(hints[f.name], type) and issubclass(hints[f.name], Group)
        }

    @classmethod
    def setting_names(cls) -> list[str]:
        """Every setting's dotted name (``routing.alpha``), groups expanded."""
        groups = cls.groups()
        names = []
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name in groups:
                names += [f"{f.name}.{n}" for n in groups[f.name].setting_names()]
            else:
                names.append(f.name)
        return names


class Group(Checked):
    """A nested group of settings of one idea (WISE's routing, shards, ...)."""

    def __post_init__(self) -> None:
        self._check_types()


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted names: {"routing": {"alpha": 1}} -> {"routing.alpha": 1}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def unflatten(settings: dict[str, Any]) -> dict[str, Any]:
    """Dotted names back into nested objects (the inverse of `flatten`)."""
    out: dict[str, Any] = {}
    for name, value in settings.items():
        *parents, leaf = name.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


@dataclass
class TargetConfig(Checked):
    """Which linear module an editor wraps; the base of every method's config."""

    layer: int | None = field(
        default=None,
        metadata={
            "help": "Decoder layer whose FFN value matrix the editor wraps. "
            "None: the paper's relative depth (27 of 32 layers)."
        },
    )
    target_module: str | None = field(
        default=None,
        metadata={
            "help": "Full dotted path of the value projection; overrides `layer`. "
            "Needed for model families wise-edit does not know."
        },
    )
    layers_path: str | None = field(
        default=None,
        metadata={
            "help": "Dotted path of the decoder ModuleList. None: the family's, or for an "
            "unknown family the ModuleList that `target_module` lies in."
        },
    )

    def __post_init__(self) -> None:
        for name, group in self.groups().items():  # given as a JSON object: build it
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, group.from_dict(value))
        self._check_types()
        self._validate([("layer", self.layer is None or self.layer >= 0, "must be >= 0")])

    @classmethod
    def for_model(cls, model: nn.Module, **overrides: Any) -> Any:
        """The config for ``model`` with ``overrides`` (field names, dotted names such as
        ``routing.alpha``, or the flat names of older versions); methods with
        size-dependent presets extend `preset`. Raises at once when the target cannot be
        found in ``model`` (an unknown family without ``target_module``, a layer out of
        range)."""
        from ..migrate import canonical_settings  # migrate reads this module's classes

        given = canonical_settings(cls, overrides)
        settings = {**cls.preset(model, given), **given}
        config = cls.from_dict(unflatten(settings))
        config.resolve_target(model)
        return config

    @classmethod
    def from_settings(cls, **settings: Any) -> Any:
        """The config of ``settings`` named as `for_model` takes them, without a model's
        preset: ``WiseConfig.from_settings(**{"routing.alpha": 0.3}, layer=2)``."""
        from ..migrate import canonical_settings

        return cls.from_dict(unflatten(canonical_settings(cls, settings)))

    @classmethod
    def preset(cls, model: nn.Module, given: dict[str, Any]) -> dict[str, Any]:
        """Dotted settings chosen for ``model`` before ``given`` ones apply (none here)."""
        return {}

    def resolve_layers_path(self, model: nn.Module) -> str:
        """Dotted path of the decoder stack: given, the family's, or inferred from
        ``target_module`` for a family outside the table."""
        if self.layers_path is not None:
            return self.layers_path
        if self.target_module is not None:
            return infer_layers_path(model, self.target_module)
        return family_of(model).layers

    def resolve_layer(self, model: nn.Module) -> int:
        """Index of the edited decoder layer, counted in the layer list itself."""
        num_layers = len(decoder_layers(model, self.resolve_layers_path(model)))
        layer = default_layer_index(num_layers) if self.layer is None else self.layer
        if layer >= num_layers:
            raise ValueError(
                f"{type(self).__name__}.layer={layer}: the model has {num_layers} layers"
            )
        return layer

    def resolve_target(self, model: nn.Module) -> str:
        """Dotted path of the value projection this config edits in ``model``."""
        if self.target_module is not None:
            self.resolve_layers_path(model)  # the fast path needs the layer it lies in
            # a module without a value matrix (an attention block, a norm) is refused here,
            # before a preset or a save's check reads its `weight`
            check_value_module(get_submodule(model, self.target_module), self.target_module)
            return self.target_module
        layers_path = self.resolve_layers_path(model)
        return f"{layers_path}.{self.resolve_layer(model)}.{family_of(model).value_proj}"


@dataclass
class EditConfig(TargetConfig):
    """How one edit is optimised: the step size, the iteration budget and its early stop,
    the fast editing forward, and the seed of everything sampled. Methods override the
    defaults with the paper's."""

    lr: float = field(default=1e-3, metadata={"help": "Learning rate of the edit's optimiser."})
    max_steps: int = field(default=100, metadata={"help": "Optimisation steps per edit, at most."})
    early_stop_loss: float = field(
        default=1e-2,
        metadata={
            "help": "Stop an edit once the loss named by `early_stop_on` stayed below this "
            "for `early_stop_patience` consecutive steps."
        },
    )
    early_stop_patience: int = field(default=1, metadata={"help": "See early_stop_loss."})
    early_stop_on: StopOn = field(
        default="loss",
        metadata={
            "help": "'loss': the whole training loss; 'lm': only the target NLL (for methods "
            "whose extra terms, e.g. a penalty, need not vanish); 'answer': every trained "
            "target token is the greedy choice and the loss's other terms (WISE: the "
            "routing margins) are below early_stop_loss."
        },
    )
    side_steps: int = field(
        default=0,
        metadata={
            "help": "With early_stop_on='answer': once the answer is right, its target NLL "
            "settled (`fit.SIDE_STEPS_LM`) and only the loss's other terms (WISE: the routing "
            "margins) above the bound, take up to this many updates on those terms alone, "
            "which need no forward of the model, before the next full step checks the "
            "answer again. 0: every step is full. Methods without such terms ignore it."
        },
    )
    fast_path: bool = field(
        default=True,
        metadata={
            "help": "Reuse everything below the edited layer across an edit's steps and "
            "compute logits only at target positions. False runs the whole model every "
            "step (same result within float error; for benchmarks and debugging)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of everything an editor samples."})
    prompt_format: FormatName = field(
        default="auto",
        metadata={
            "help": "How edits are written and asked: 'raw' text, or 'chat' (the tokenizer's "
            "chat template: user turn = prompt, assistant turn = target; routing reads only "
            "the user's text, not the template's fixed tokens). 'auto': chat when the "
            "tokenizer has a chat template, else raw."
        },
    )
    train_stop: bool = field(
        default=True,
        metadata={
            "help": "Train each target followed by the token that ends the answer (EOS for "
            "raw prompts, end of turn for chat), so the edited model answers and stops. "
            "False: the target alone, as in the paper."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self._validate(
            [
                ("prompt_format", self.prompt_format in FORMAT_NAMES, f"one of {FORMAT_NAMES}"),
                ("lr", self.lr > 0, "must be > 0"),
                ("max_steps", self.max_steps >= 1, "must be >= 1"),
                ("early_stop_loss", self.early_stop_loss >= 0, "must be >= 0"),
                ("early_stop_patience", self.early_stop_patience >= 1, "must be >= 1"),
                ("side_steps", self.side_steps >= 0, "must be >= 0"),
                ("seed", 0 <= self.seed <= MAX_SEED, f"must be between 0 and {MAX_SEED}"),
                (
                    "early_stop_on",
                    self.early_stop_on in get_args(StopOn),
                    f"must be one of {get_args(StopOn)}",
                ),
            ]
        )
