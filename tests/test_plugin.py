"""Our merge methods are mergekit plugins once solar-merge is installed: stock `mergekit-yaml`
and mergekit's Python API see them, in the editable install and in a venv with the built
wheel, without importing anything heavy at interpreter start, and never twice."""

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _config(tmp_path, a, b) -> Path:
    path = tmp_path / "avg.yaml"
    path.write_text(yaml.safe_dump({
        "merge_method": "solar_average", "dtype": "float32",
        "models": [{"model": str(a), "parameters": {"weight": 0.4}},
                   {"model": str(b), "parameters": {"weight": 0.6}}]}))
    return path


def _run(python, code: str, *args, env=None):
    env = {k: v for k, v in (env or os.environ).items() if k != "PYTHONPATH"}  # only installs
    return subprocess.run([python, "-c", code, *args], capture_output=True, text=True, check=False,
                          timeout=300, env=env)


STOCK_YAML = "import sys; from mergekit.scripts.run_yaml import main; sys.exit(main())"
STARTUP = ("import sys; print(sorted(m for m in ('solar_merge', 'mergekit', 'torch', "
           "'transformers') if m in sys.modules))")


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """A venv holding only the built solar-merge wheel; the other packages come from this
    interpreter's site-packages as a plain path (so its own .pth files are not run)."""
    import shutil

    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a copy: building in the checkout leaves build/ (and stale files)
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "solar_merge", source / "solar_merge",
                    ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", "-q", "-w", str(tmp / "dist"), str(source)],
                           capture_output=True, text=True, timeout=600, check=False)
    assert build.returncode == 0, build.stderr
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    purelib = _run(python, "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    venv_site = Path(purelib.stdout.strip())
    (venv_site / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    wheel = next((tmp / "dist").glob("solar_merge-*.whl"))
    import zipfile

    zipfile.ZipFile(wheel).extractall(venv_site)  # what pip does, minus the network
    assert (venv_site / "solar_merge.pth").is_file()
    return python


def test_stock_mergekit_yaml_sees_our_methods_from_the_wheel(wheel_venv, tiny_model_factory,
                                                            tmp_path):
    where = _run(wheel_venv, "import solar_merge; print(solar_merge.__file__)")
    assert "venv" in where.stdout  # the wheel's copy, not the checkout
    config = _config(tmp_path, tiny_model_factory(seed=0), tiny_model_factory(seed=1))
    result = _run(wheel_venv, STOCK_YAML, str(config), str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_interpreter_start_imports_nothing_heavy(wheel_venv):
    result = _run(wheel_venv, STARTUP)
    assert result.stdout.split() == ["['solar_merge']"], result.stderr
    timing = _run(wheel_venv, "pass", env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    ours = [line for line in timing.stderr.splitlines() if line.rstrip().endswith("solar_merge")]
    cumulative_us = int(ours[0].split("|")[1])
    assert cumulative_us < 20_000, ours  # measured ~0.6 ms; generous for a loaded machine


def test_mergekit_python_api_sees_our_methods(tiny_model_factory, tmp_path):
    """The installed (editable) package, as CI has it: run_merge in a fresh interpreter."""
    config = _config(tmp_path, tiny_model_factory(seed=0), tiny_model_factory(seed=1))
    code = ("import sys, yaml; from mergekit.config import MergeConfiguration; "
            "from mergekit.merge import run_merge; from mergekit.options import MergeOptions; "
            "c = MergeConfiguration.model_validate(yaml.safe_load(open(sys.argv[1]))); "
            "run_merge(c, sys.argv[2], options=MergeOptions())")
    result = _run(sys.executable, code, str(config), str(tmp_path / "api"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "api" / "model.safetensors").is_file()


def test_registration_happens_once_whatever_imports_it_again():
    code = ("import importlib, solar_merge; importlib.reload(solar_merge); "
            "import solar_merge.methods as m; m.register_all(); "
            "import mergekit.merge_methods as mm; m.register_all(); "
            "importlib.reload(solar_merge); "
            "names = [x.spec.name for x in mm.registered_methods()]; "
            "print(names.count('solar_average'), names.count('solar_slerp'))")
    result = _run(sys.executable, code)
    assert result.stdout.split() == ["1", "1"], result.stderr
