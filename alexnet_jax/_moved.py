"""Old module names of the flat layout, kept importable: each reads its names from their new homes.

`alexnet_jax.MOVED_MODULES` is the table; this is the module object that stands in
`sys.modules` for each old name.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import types
import warnings
from typing import Any


class MovedModule(types.ModuleType):
    """Stands for `old`: a name read from it comes from the first module of `new` that has it.

    Each name warns once (FutureWarning, one line) with the place to import it from.
    """

    def __init__(self, old: str, new: tuple[str, ...]) -> None:
        super().__init__(old, f"Moved: see {', '.join(f'alexnet_jax.{m}' for m in new)}.")
        self.__spec__ = importlib.machinery.ModuleSpec(old, None)
        self._new = tuple(f"alexnet_jax.{m}" for m in new)
        self._warned: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        modules = [importlib.import_module(target) for target in self._new]
        having = [m for m in modules if hasattr(m, name)]
        # Where the name is defined, not a module that imports it.
        home = next((m for m in having if getattr(getattr(m, name), "__module__", None) == m.__name__), None)
        home = home or (having[0] if having else None)
        if home is not None:
            if name not in self._warned:
                self._warned.add(name)
                warnings.warn(f"{self.__name__} moved: import {name} from {home.__name__}", FutureWarning, stacklevel=2)
            return getattr(home, name)
        raise AttributeError(f"module {self.__name__!r} (moved to {', '.join(self._new)}) has no attribute {name!r}")

    def __dir__(self) -> list[str]:
        return sorted({n for target in self._new for n in dir(importlib.import_module(target))})
