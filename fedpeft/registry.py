"""Name -> object registries (models, datasets, strategies). One lookup rule for all of them."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

__all__ = ["Registry", "UnknownNameError"]


class UnknownNameError(ValueError):
    """A name that no registry entry has; the message lists the valid names."""


class Registry(Generic[T]):
    """A named collection; registering a name twice and looking up an unknown name are errors.
    With `declared` (fedpeft.catalog's names for the kind), registering any other name is one too."""

    def __init__(self, kind: str, declared: Collection[str] | None = None) -> None:
        self.kind = kind
        self._declared = declared
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            if self._declared is not None and name not in self._declared:
                raise ValueError(f"{self.kind} {name!r} is not declared in fedpeft.catalog")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; valid: {', '.join(sorted(self._items))}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
