"""Name -> object registries (models, datasets, strategies). One lookup rule for all of them."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

__all__ = ["Registry", "UnknownNameError", "require_known"]


class UnknownNameError(ValueError):
    """A name that no registry entry has; the message lists the valid names."""


def require_known(kind: str, name: str, names: Collection[str]) -> None:
    """The error for a name that is not among `names`, listing the valid ones."""
    if name not in names:
        raise UnknownNameError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(names))}")


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
        require_known(self.kind, name, self._items)
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
