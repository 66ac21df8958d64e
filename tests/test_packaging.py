"""Packaging (issue 26): the wheel holds what the package reads, and works without the repository.

The source distribution and the wheel are built as `python -m build` builds
them (the wheel from the unpacked sdist), without build isolation so that no
network is needed, from a copy of the tree in tmp_path (the shared work tree
gets no build files). The wheel is installed with `pip install --no-deps
--target` and run from a folder outside the repository, its dependencies
from this environment's site-packages.
"""

import email
import importlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

import retrain
from retrain import cli, demo

ROOT = Path(__file__).resolve().parents[1]
# What the sdist is made from (MANIFEST.in and setup.cfg name nothing else).
SOURCE_FILES = ("setup.cfg", "pyproject.toml", "README.md", "MANIFEST.in", "LICENSE")
SOURCE_DIRS = ("retrain", "docs", "examples")
COMMANDS = {
    "retrain": "retrain.cli:entry_point",
    "retrain-label-image": "retrain.label_image:entry_point",
    "retrain-report": "retrain.report.__main__:main",
    "retrain-demo": "retrain.demo:entry_point",
}


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """(sdist, wheel) Paths built by `python -m build --no-isolation` from a copy of the tree."""
    base = tmp_path_factory.mktemp("packaging")
    tree, out = base / "tree", base / "dist"
    tree.mkdir()
    for name in SOURCE_FILES:
        shutil.copy2(ROOT / name, tree / name)
    for name in SOURCE_DIRS:
        # examples/digits: the images an older `make demo` wrote there.
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "digits", ".*")
        shutil.copytree(ROOT / name, tree / name, ignore=ignore)
    done = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(tree)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (sdist,) = out.glob("retrain-*.tar.gz")
    (wheel,) = out.glob("retrain-*.whl")
    return sdist, wheel


@pytest.fixture(scope="module")
def installed(dist, tmp_path_factory):
    """The wheel installed with `pip install --no-deps --target`: (target folder, env for it)."""
    target = tmp_path_factory.mktemp("target")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index"]
        + ["--target", str(target), str(dist[1])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    # The target first, then this environment's site-packages for the dependencies.
    path = os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]])
    return target, {**os.environ, "PYTHONPATH": path}


def run_installed(installed, argv, cwd, timeout=120):
    """Runs `argv` (a command of target/bin, or python) from `cwd` with the installed wheel."""
    target, env = installed
    program = argv[0] if argv[0] == sys.executable else str(target / "bin" / argv[0])
    return subprocess.run(
        [program, *argv[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_wheel_holds_every_data_file_of_the_package(dist):
    """Every non-Python file under retrain/ (the report template...) is in the wheel."""
    names = set(zipfile.ZipFile(dist[1]).namelist())
    data = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "retrain").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".py"
    }
    assert "retrain/report/templates/report.html.j2" in data
    assert data <= names, sorted(data - names)
    python = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "retrain").rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert python <= names, sorted(python - names)


def test_wheel_metadata_version_requirements_and_commands(dist):
    wheel = zipfile.ZipFile(dist[1])
    info = f"retrain-{retrain.__version__}.dist-info"
    metadata = email.message_from_bytes(wheel.read(f"{info}/METADATA"))
    assert metadata["Version"] == retrain.__version__
    requires = [re.split(r"[<>=!; \[]", r)[0].lower() for r in metadata.get_all("Requires-Dist")]
    # --engine litert-int8 calibrates on scikit-image's photos: a run-time requirement,
    # not a test extra's (an extra's requirements carry `; extra == ...`).
    plain = [r for r in metadata.get_all("Requires-Dist") if "extra ==" not in r]
    assert any(r.lower().startswith("scikit-image") for r in plain)
    assert {"tensorflow", "keras", "jinja2"} <= set(requires)
    # The licence the metadata names, whole, inside the wheel and the sdist.
    assert metadata["License"] == "Apache-2.0"
    licence = wheel.read(f"{info}/licenses/LICENSE").decode()
    assert licence == (ROOT / "LICENSE").read_text() and "Version 2.0, January 2004" in licence
    entry_points = wheel.read(f"{info}/entry_points.txt").decode()
    for command, target in COMMANDS.items():
        assert f"{command} = {target}" in entry_points
        module, _, name = target.partition(":")
        assert callable(getattr(importlib.import_module(module), name))


def test_sdist_holds_the_guide_and_the_demo_settings(dist):
    names = {name.split("/", 1)[1] for name in tarfile.open(dist[0]).getnames() if "/" in name}
    assert {"setup.cfg", "pyproject.toml", "README.md", "LICENSE", "examples/digits.yaml"} <= names
    assert {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")} <= names
    assert "retrain/report/templates/report.html.j2" in names


def test_installed_wheel_imports_and_answers_outside_the_repository(installed, tmp_path):
    target = installed[0]
    for command in ("retrain", "retrain-label-image", "retrain-demo"):
        done = run_installed(installed, [command, "--version"], tmp_path)
        assert (done.returncode, done.stdout) == (0, f"retrain {retrain.__version__}\n"), done
    where = (
        "import importlib.metadata as m, jinja2, retrain;"
        "print(retrain.__file__); print(m.version('retrain'));"
        "env = jinja2.Environment(loader=jinja2.PackageLoader('retrain.report', 'templates'));"
        "print(env.get_template('report.html.j2').filename)"
    )
    done = run_installed(installed, [sys.executable, "-c", where], tmp_path)
    assert done.returncode == 0, done.stderr
    module, version, template = done.stdout.splitlines()
    assert Path(module).is_relative_to(target) and Path(template).is_relative_to(target)
    assert version == retrain.__version__
    done = run_installed(installed, [sys.executable, "-m", "retrain", "--help"], tmp_path)
    assert done.returncode == 0 and "--image_dir" in done.stdout, done.stderr


def test_version_imports_no_tensorflow(installed, tmp_path):
    """`--version` answers at once: neither command imports TensorFlow for it."""
    for module in ("retrain", "retrain.label_image"):
        argv = [sys.executable, "-X", "importtime", "-m", module, "--version"]
        done = run_installed(installed, argv, tmp_path)
        assert done.returncode == 0 and done.stdout == f"retrain {retrain.__version__}\n"
        imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines()}
        assert "retrain" in imported and "tensorflow" not in imported


def test_demo_runs_from_the_installed_wheel(installed, tmp_path):
    """`retrain-demo` writes the digits, trains and labels, with no file of the repository."""
    out = tmp_path / "demo"
    done = run_installed(
        installed, ["retrain-demo", "--output_dir", str(out), "--per_class", "10"], tmp_path, 600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "Wrote 100 digit images" in done.stdout
    assert re.search(r"Final test accuracy = [\d.]+%", done.stdout)
    # label_image's lines for the demo's picture: its path, then the top labels.
    assert f"{out / 'digits' / demo.DEMO_IMAGE}\n" in done.stdout
    assert (out / "output" / "model.keras").is_file()
    assert (out / "output" / "labels.txt").read_text().split() == [str(d) for d in range(10)]


def test_demo_runs_the_settings_of_examples_digits_yaml(monkeypatch):
    """The demo's run and `python -m retrain --config examples/digits.yaml` are one Config."""
    monkeypatch.chdir(ROOT)
    from_yaml = cli.resolve_config(["--config", "examples/digits.yaml"])
    settings = yaml.safe_load((ROOT / "examples" / "digits.yaml").read_text())
    base = Path(settings["image_dir"]).parent
    assert cli.resolve_config(demo.demo_argv(base)) == from_yaml


def test_demo_usage_errors_are_one_line(capsys):
    for argv in (["--per_class", "3"], ["--per_class", "x"], ["--no_such_flag"]):
        with pytest.raises(SystemExit) as exit_info:
            demo.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("retrain-demo: error:"), err
