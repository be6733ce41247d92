"""solar-merge: the SOLAR recipe (DUS, CPT, SFT, DPO, merging) on mergekit and TRL.

Once solar-merge is installed, `solar_average` and `solar_slerp` are mergekit merge methods
everywhere: in `mergekit-yaml`, `mergekit-multi` and mergekit's Python API. mergekit 0.1.5
has no plugin discovery, so the wheel installs `solar_merge.pth` (see setup.py), which imports
this package at interpreter start. This module then only puts a finder on `sys.meta_path`;
the methods are registered right after `mergekit.merge_methods` itself is imported, never
before (mergekit takes seconds to import) and never twice.

Keep this module free of imports beyond the standard library's `sys`: it runs in every Python
process of the environment (measured: `python -X importtime -c pass` grows by ~1 ms).
"""

import sys

__version__ = "0.1.0"

_REGISTRY = "mergekit.merge_methods"


def _register() -> None:
    # Importing methods.py registers its methods. Done with `import`, not `from ... import`:
    # when methods.py itself is what imports mergekit.merge_methods, it is half-initialised
    # here, and registers at the end of its own import.
    import solar_merge.methods  # noqa: F401


class _RegisterAfterImport:
    """A meta path finder whose loader runs mergekit.merge_methods, then registers ours."""

    solar_merge_hook = True  # recognised across reloads, where isinstance() would not be

    def find_spec(self, name, path=None, target=None):
        if name != _REGISTRY:
            return None
        import importlib.machinery

        sys.meta_path.remove(self)
        spec = None
        for finder in sys.meta_path:  # the next finder that knows it (editable installs too)
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find else None
            if spec is not None:
                break
        if spec is None:
            spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            self._inner = spec.loader
            spec.loader = self
        return spec

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _register()


def _install() -> None:
    if _REGISTRY in sys.modules:
        _register()
    elif not any(getattr(f, "solar_merge_hook", False) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


_install()
