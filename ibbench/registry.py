"""Named factories: `@REG.register("name")` next to the code, `REG.get("name")` everywhere else."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from ibbench.errors import UnknownNameError

__all__ = ["Registry", "UnknownNameError"]

T = TypeVar("T", bound=Callable)


class Registry(Generic[T]):
    """A mapping from names to factories of one kind (encoders, decoders, objectives, datasets)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated factory under `name` (names are unique)."""

        def decorate(factory: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = factory
            return factory

        return decorate

    def get(self, name: str) -> T:
        """The factory registered as `name`; UnknownNameError lists the valid names otherwise."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownNameError(self.kind, name, self.names()) from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
