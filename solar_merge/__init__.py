"""solar-merge: the SOLAR recipe (DUS, CPT, SFT, DPO, merging) on mergekit and TRL.

Importing this package makes `solar_average` and `solar_slerp` available by name in
mergekit's registry. mergekit takes seconds to import, so commands that only read configs
must not pay for it: if mergekit is already imported we register now, otherwise right after
mergekit's merge_methods package finishes importing.
"""

import importlib.abc
import importlib.machinery
import sys

__version__ = "0.1.0"

_REGISTRY = "mergekit.merge_methods"


def _register() -> None:
    from solar_merge.methods import register_all

    register_all()


class _RegisterAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Wraps the loader of mergekit.merge_methods so that registration follows its import."""

    def find_spec(self, name, path, target=None):
        if name != _REGISTRY:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None:
            self._inner = spec.loader
            spec.loader = self
        return spec

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _register()


if _REGISTRY in sys.modules:
    _register()
elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterImport())
