"""Packaging: everything is in pyproject.toml except `solar_merge.pth`, which setuptools cannot
declare. That one-line file, at the top of site-packages, imports solar_merge at interpreter
start, so that stock `mergekit-yaml` sees `solar_average` and `solar_slerp` (mergekit 0.1.5
has no plugin discovery; solar_merge/__init__.py explains what the import does and costs).
It is written into both kinds of wheel: the regular one and the editable one (`pip install -e`).
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "solar_merge.pth"
# A .pth line that starts with `import` is executed; a broken install must not break Python.
LINE = ('import sys; exec("try:\\n import solar_merge\\nexcept Exception as e:\\n '
        'sys.stderr.write(f\'solar-merge: mergekit plugin not loaded ({e})\\\\n\')")\n')


class BuildPy(build_py):
    def run(self):
        super().run()
        with open(os.path.join(self.build_lib, PTH), "w") as f:
            f.write(LINE)

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]


class EditableWheel(editable_wheel):
    def _select_strategy(self, name, tag, build_lib):
        return _WithPth(super()._select_strategy(name, tag, build_lib))


class _WithPth:
    """The editable strategy setuptools chose, plus our .pth file in the wheel."""

    def __init__(self, inner):
        self.inner = inner

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def __call__(self, wheel, files, mapping):
        self.inner(wheel, files, mapping)
        wheel.writestr(PTH, LINE)


setup(cmdclass={"build_py": BuildPy, "editable_wheel": EditableWheel})
