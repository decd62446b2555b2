"""Adapter configs: a dataclass per method, checked types, JSON round trip.

A method's config subclasses :class:`AdapterConfig`. Fields are checked
against their type hints when the config is built, so a wrong key or type is
an error that names the key and the allowed keys, whether the config came
from Python, JSON, or the shorthand ``lora[r=8,alpha=16]``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from typing import Any, Callable, ClassVar, Literal, Union

from .errors import ConfigError
from .suggestions import option_suggestion


def option(default: Any = dataclasses.MISSING, *, help: str,  # noqa: A002 - the word users know
           default_factory: Callable[[], Any] | Any = dataclasses.MISSING) -> Any:
    """A config field with a one-line help text, shown by ``peftkit methods NAME`` and the method docs.

    Use it in a config dataclass instead of a plain default: ``r: int = option(8, help="rank")``, or
    ``option(default_factory=dict, help=...)`` for a mutable default.
    """
    if not help.strip() or "\n" in help:
        raise ValueError("option help must be one non-empty line")
    metadata = {"help": help.strip()}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class AdapterConfig:
    """Base of every method's config.

    Common fields:
      target_modules: which modules to adapt: a list of names (exact, or a
        dotted suffix such as ``"q_proj"``), a regex string (full match), or
        ``"all-linear"``. ``None`` takes the architecture's default.
      exclude_modules: names (list) or a regex of modules never adapted.
      layers_to_transform: only adapt these transformer layer indices.
      modules_to_save: extra modules (e.g. a classification head) trained and
        saved with the adapter, kept as one copy per adapter.
    """

    method: ClassVar[str] = ""
    #: Inherited fields this method refuses to be set (a virtual-token method adapts no layers: target_modules
    #: and the like): left out of ``option_details``, so ``peftkit methods NAME`` and the docs do not offer them.
    refused_options: ClassVar[tuple[str, ...]] = ()

    target_modules: Union[list[str], str, None] = option(
        None, help='modules to adapt: names or dotted suffixes (list), a regex, or "all-linear"; '
                   "null takes the architecture's default")
    exclude_modules: Union[list[str], str, None] = option(
        None, help="modules never adapted: names (list) or a regex")
    layers_to_transform: Union[list[int], int, None] = option(
        None, help="adapt only these transformer layer indices (null: every layer)")
    modules_to_save: Union[list[str], None] = option(
        None, help="extra modules (e.g. a classification head) trained and saved with the adapter, one copy each")

    def __post_init__(self) -> None:
        self.validate()

    # -- checks --------------------------------------------------------------

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def option_details(cls) -> list[dict[str, Any]]:
        """Each option's name, type (in words), default and help, for ``peftkit methods NAME``."""
        hints = typing.get_type_hints(cls)
        return [{"name": f.name, "type": _type_name(hints[f.name]), "default": _plain(_default(f)),
                 "help": cls.option_help(f.name)} for f in dataclasses.fields(cls) if f.name not in cls.refused_options]

    @classmethod
    def option_help(cls, name: str) -> str:
        """The one-line help of option ``name`` ("" when none is given).

        A subclass that redeclares a field only to change its default keeps the help of the
        nearest base class that gives one.
        """
        for klass in cls.__mro__:
            found = getattr(klass, "__dataclass_fields__", {}).get(name)
            if found is not None and found.metadata.get("help"):
                return str(found.metadata["help"])
        return ""

    def validate(self) -> None:
        """Check every field against its type hint (and coerce int -> float)."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            ok, coerced = _check(value, hints[f.name])
            if not ok:
                raise ConfigError(
                    f"{self.method or type(self).__name__} config: {f.name}={value!r} has the wrong type; "
                    f"expected {_type_name(hints[f.name])}")
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)
        for name in ("target_modules", "exclude_modules"):  # a string is a regex: a broken one fails here
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as exc:
                    raise ConfigError(
                        f"{self.method or type(self).__name__} config: {name}={value!r} is not a valid regular "
                        f'expression ({exc}); give a list of module names, e.g. ["q_proj","v_proj"], or a regex '
                        f"that matches whole module names") from None
        self.check()

    def check(self) -> None:
        """Method-specific checks (ranges, combinations); override in subclasses."""

    # -- round trips -----------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        data = dict(data)
        data.pop("method", None)
        return cls(**data)

    @classmethod
    def refuse_unknown_keys(cls, keys: Any) -> None:
        """ConfigError naming the keys that are not options of this config, with peftkit's name for another
        library's (``lora_alpha`` -> ``alpha``) or the closest spelling, and the options it has."""
        allowed = cls.field_names()
        unknown = sorted(k for k in keys if k not in allowed)
        if unknown:
            hints = [(f"{key!r}: " if len(unknown) > 1 else "") + hint for key in unknown
                     if (hint := option_suggestion(key, allowed))]
            raise ConfigError(
                f"unknown {'key' if len(unknown) == 1 else 'keys'} {', '.join(map(repr, unknown))} for method "
                f"{cls.method!r}" + (f" ({'; '.join(hints)})" if hints else "")
                + f"; allowed keys: {', '.join(allowed)}")

    def __new__(cls, *args: Any, **kwargs: Any) -> "AdapterConfig":
        # Checked here, before the dataclass's __init__ would raise a bare TypeError for PEFT's names
        # (peftkit.LoraConfig(lora_alpha=16)).
        if kwargs:
            cls.refuse_unknown_keys(kwargs)
        return super().__new__(cls)

    def to_json(self) -> str:
        return json.dumps({"method": self.method, **self.to_dict()}, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "AdapterConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config JSON is malformed: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError("config JSON must be an object of key/value pairs")
        return cls.from_dict(data)

    def to_shorthand(self) -> str:
        """The shorthand form, listing only fields that differ from the defaults."""
        defaults = {f.name: _default(f) for f in dataclasses.fields(self)}
        parts = []
        for key, value in self.to_dict().items():
            if value != _plain(defaults[key]):
                parts.append(f"{key}={json.dumps(value, separators=(',', ':'))}")
        return f"{self.method}[{','.join(parts)}]" if parts else self.method

    def replace(self, **changes: Any) -> "AdapterConfig":
        return dataclasses.replace(self, **changes)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        args = typing.get_args(tp)
        return f"a mapping of {_type_name(args[0])} to {_type_name(args[1])}" if args else "a mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _check(value: Any, tp: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits type hint ``tp``; returns the (possibly coerced) value."""
    if tp is Any:
        return True, value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return _check_union(value, tp)
    if origin is Literal:
        return value in typing.get_args(tp), value
    if origin in (list, tuple):
        return _check_sequence(value, tp)
    if origin is dict:
        return _check_mapping(value, tp)
    return _check_plain(value, tp)


def _check_union(value: Any, tp: Any) -> tuple[bool, Any]:
    for arg in typing.get_args(tp):
        ok, coerced = _check(value, arg)
        if ok:
            return True, coerced
    return False, value


def _check_sequence(value: Any, tp: Any) -> tuple[bool, Any]:
    if not isinstance(value, (list, tuple)):
        return False, value
    (item_tp, *_) = typing.get_args(tp) or (Any,)
    out = []
    for item in value:
        ok, coerced = _check(item, item_tp)
        if not ok:
            return False, value
        out.append(coerced)
    return True, out


def _check_mapping(value: Any, tp: Any) -> tuple[bool, Any]:
    if not isinstance(value, dict):
        return False, value
    key_tp, val_tp = typing.get_args(tp) or (Any, Any)
    out_d = {}
    for k, v in value.items():
        ok_k, k2 = _check(k, key_tp)
        if not ok_k and key_tp is int and isinstance(k, str) and k.lstrip("-").isdigit():
            ok_k, k2 = True, int(k)  # JSON object keys are strings
        ok_v, v2 = _check(v, val_tp)
        if not (ok_k and ok_v):
            return False, value
        out_d[k2] = v2
    return True, out_d


def _check_plain(value: Any, tp: Any) -> tuple[bool, Any]:
    """A type hint that is not generic: None, float (ints widen), int (bools refused), a class."""
    if tp is type(None):
        return value is None, value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if isinstance(tp, type):
        return isinstance(value, tp), value
    return True, value
