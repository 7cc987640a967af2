"""A small decorator registry for code variants (layouts, backbone families, eval kinds, fusions), as timm does."""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterable, TypeVar

from featcache.errors import ConfigError, FeatcacheError

T = TypeVar("T")


def nearest(name: str, known: Iterable[str], n: int = 3) -> str:
    """' (did you mean x?)' for the closest known names, or ''."""
    close = difflib.get_close_matches(name, list(known), n=n, cutoff=0.5)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


class Registry(Generic[T]):
    """Names to objects, each with a one-line help; an unknown name fails listing the known ones."""

    def __init__(self, what: str, error: type[FeatcacheError] = ConfigError, entry_points: str | None = None) -> None:
        """``entry_points``: a packaging entry-point group whose modules register more names when first needed
        (how stage packages, and other installed packages, add variants without the registry's owner naming them)."""
        self.what, self.error, self.group = what, error, entry_points
        self._items: dict[str, T] = {}
        self._help: dict[str, str] = {}
        self._loaded = entry_points is None

    def _load_plugins(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        from importlib.metadata import entry_points

        for ep in entry_points(group=self.group):
            ep.load()  # importing the module registers its names

    def register(self, name: str, help: str = "") -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.what} {name!r} is registered twice")
            self._items[name] = obj
            self._help[name] = help
            return obj

        return deco

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        self._load_plugins()
        return list(self._items)

    def help(self, name: str) -> str:
        return self._help.get(name, "")

    def get(self, name: str) -> T:
        if name not in self._items:
            self._load_plugins()
        try:
            return self._items[name]
        except KeyError:
            raise self.error(
                f"unknown {self.what} {name!r}{nearest(name, self._items)}; available: {', '.join(sorted(self._items))}"
            ) from None

    def __contains__(self, name: str) -> bool:
        return name in self._items
