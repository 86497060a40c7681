"""What every configuration shares: a frozen dataclass with diffusers' ``config.json`` round trip."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from enum import Enum
from typing import Any, ClassVar, TypeVar

from stable_cascade.limits import check_limits

logger = logging.getLogger(__name__)

C = TypeVar("C", bound="ConfigBase")


def _tuple(value: Any) -> Any:
    """Lists (as read from JSON) become tuples, recursively, so configs stay hashable."""
    if isinstance(value, (list, tuple)):
        return tuple(_tuple(v) for v in value)
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True)
class ConfigBase:
    """Shared behaviour: dict round trip in the diffusers ``config.json`` format."""

    diffusers_class_name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, _tuple(getattr(self, field.name)))
        check_limits(type(self).__name__, {name: getattr(self, name) for name in self.keys()})

    def __getitem__(self, key: str) -> Any:
        """``config["in_channels"]`` as well as ``config.in_channels``, as diffusers' FrozenDict allows."""
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self.keys() else default

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        return {name: _jsonable(getattr(self, name)) for name in self.keys()}

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any], source: str = "config") -> C:
        """Build from a diffusers-style dict; ``_``-prefixed metadata is skipped, unknown keys are logged."""
        known = set(cls.keys())
        unknown = sorted(k for k in data if not k.startswith("_") and k not in known)
        if unknown:
            logger.warning("%s: ignoring keys unknown to %s: %s", source, cls.__name__, ", ".join(unknown))
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except (TypeError, ValueError) as error:  # name the file the bad value came from
            raise (TypeError if isinstance(error, TypeError) else ValueError)(f"{source}: {error}") from error

    def replace(self: C, **changes: Any) -> C:
        unknown = sorted(set(changes) - set(self.keys()))
        if unknown:
            raise TypeError(
                f"{type(self).__name__} has no field(s) {', '.join(unknown)}; "
                f"valid fields: {', '.join(self.keys())}"
            )
        return dataclasses.replace(self, **changes)
