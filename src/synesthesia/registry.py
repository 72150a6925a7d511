"""One small registry class: generators, methods and students are found by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from synesthesia import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps a name to a class or factory; unknown names raise listing the valid ones.

    >>> METHODS = Registry("method")
    >>> @METHODS.register("ce")
    ... class CrossEntropy: ...
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            valid = ", ".join(sorted(self._items)) or "(none)"
            raise UserError(f"unknown {self.kind} {name!r}; valid: {valid}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
