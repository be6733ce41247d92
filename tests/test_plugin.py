"""Installed like a library: the built wheel installs with constraints.txt into a fresh venv
and runs from a folder outside the checkout (shipped recipes, the demo's plan); runtime
dependencies are ranges, the tested set is constraints.txt, which README's set-up commands and
.ci/run install. Our merge methods are mergekit plugins once solar-merge is installed: stock
`mergekit-yaml` and mergekit's Python API see them, in the editable install and in a venv with
the built wheel, without importing anything heavy at interpreter start, and never twice."""

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


def _pinned(path: Path) -> dict[str, str]:
    from packaging.utils import canonicalize_name

    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return {canonicalize_name(name): version
            for name, _, version in (line.partition("==") for line in lines if line)}


def _differs_from_constraints() -> list[str]:
    """Installed runtime dependencies whose version is not the one constraints.txt pins."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pinned = _pinned(ROOT / "constraints.txt")
    out = []
    for dep in _pyproject()["project"]["dependencies"]:
        name = canonicalize_name(Requirement(dep).name)
        try:
            here = version(name).split("+")[0]
        except PackageNotFoundError:
            here = None
        if here != pinned.get(name):
            out.append(f"{name} {here} (constraints.txt: {pinned.get(name)})")
    return out


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """A fresh venv with the built solar-merge wheel installed by pip with constraints.txt,
    offline (--no-index): the other packages come from this interpreter's site-packages as a
    plain path (so its own .pth files are not run), and pip finds them already there at the
    constrained versions, or fails."""
    import shutil

    different = _differs_from_constraints()
    if different:
        pytest.skip("this environment is not the tested set, which the wheel is installed "
                    "with: " + ", ".join(different))
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a copy: building in the checkout leaves build/ (and stale files)
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("training", "merge_configs"):  # the files solar_merge/recipes/ links to
        shutil.copytree(ROOT / name, source / name)
    shutil.copytree(ROOT / "solar_merge", source / "solar_merge", symlinks=True,
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
    install = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install",
                              "--no-index", "-c", str(ROOT / "constraints.txt"), str(wheel)],
                             capture_output=True, text=True, timeout=600, check=False)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    assert (venv_site / "solar_merge.pth").is_file()
    assert (venv / "bin" / "solar-merge").is_file()
    return python


@pytest.mark.smollm2
def test_the_wheel_lists_copies_and_plans_from_an_empty_folder(wheel_venv, tmp_path):
    """What a user of `pip install solar-merge` does first, in a folder that is not a
    checkout: list the shipped recipes, copy one out, validate it, plan the demo."""
    here = tmp_path / "empty"
    here.mkdir()
    cli = str(Path(wheel_venv).parent / "solar-merge")

    def run(*args):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        result = subprocess.run([cli, *args], cwd=here, capture_output=True, text=True,
                                timeout=600, check=False, env={**env, "HF_HUB_OFFLINE": "1"})
        assert result.returncode == 0, f"solar-merge {' '.join(args)}: {result.stderr[-3000:]}"
        return result.stdout

    listing = run("recipes")
    assert "/venv/" in listing and str(ROOT) not in listing  # the wheel's files
    assert "solar_10.7b" in listing and "smollm2_demo" in listing and "sft_slerp" in listing
    run("recipes", "copy", "solar_10.7b", ".")
    assert (here / "merge_configs" / "sft_slerp.yaml").read_text() == \
        (ROOT / "merge_configs" / "sft_slerp.yaml").read_text()
    assert "recipe `solar-10.7b`" in run("validate", "training/solar_10.7b.yaml")
    assert f"-> {here}/runs/solar-10.7b" in run("validate", "solar_10.7b")
    plan = run("demo", "--quick", "--dry-run", "--out", "demo")
    assert "13 stages" in plan and "train:cpt" in plan and "merge:solar_slerp" in plan
    assert (here / "demo" / "recipe.yaml").read_text() == \
        (ROOT / "training" / "smollm2_demo.yaml").read_text()
    assert not (here / "demo" / "cpt").exists()  # nothing trained


def test_runtime_dependencies_are_ranges_pinned_in_constraints():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = _pyproject()["project"]
    pinned = _pinned(ROOT / "constraints.txt")
    for dep in [*project["dependencies"], *project["optional-dependencies"]["test"]]:
        req = Requirement(dep)
        assert not any(s.operator in ("==", "===") for s in req.specifier), dep
        name = canonicalize_name(req.name)
        assert name in pinned and req.specifier.contains(pinned[name]), (dep, pinned.get(name))
    for dep in project["dependencies"]:  # a lower bound tested, an upper bound declared
        operators = {s.operator for s in Requirement(dep).specifier}
        assert ">=" in operators and "<" in operators, dep
    assert pinned["torch"] == "2.13.0"  # matches the CPU build 2.13.0+cpu too


def test_readme_setup_commands_install_the_constraints_and_ci_runs_the_second():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    install, test = block.strip().splitlines()
    assert install.endswith("&& solar-merge demo") and "pytest" in test
    for line in (install, test):
        assert line.startswith("pip install -c constraints.txt -e "), line
    assert test in (ROOT / ".ci" / "run").read_text().splitlines()


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
    assert cumulative_us < 20_000, ours  # a few imports of the stdlib; 20 ms allows a loaded machine


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
