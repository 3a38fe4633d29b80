"""A package whose names load with their module on first use."""

import importlib


def lazy_exports(package: str, homes: dict[str, list[str]]):
    """A package's `__getattr__` that imports a name's module on first use, so that
    `fedcollm tasks` or `models` answer without loading torch (PEP 562)."""
    module_of = {name: module for module, names in homes.items() for name in names}

    def __getattr__(name: str):
        if name not in module_of:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module_of[name]}"), name)

    return __getattr__, sorted(module_of)
