"""A plain install is the library: build the wheel, install it into a fresh environment outside the checkout (the
editable install out of the way) and import every module from there."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("sat_video", "mixins")
PROJECT_FILES = ("setup.py", "pyproject.toml", "README.md")

IMPORT_ALL = """
import importlib, json, pathlib, pkgutil, sys
site, expected = pathlib.Path(sys.argv[1]).resolve(), set(json.loads(sys.argv[2]))
found = {}
for top in ("sat_video", "mixins"):
    package = importlib.import_module(top)
    found[top] = package.__file__
    for info in pkgutil.walk_packages(package.__path__, top + "."):
        found[info.name] = importlib.import_module(info.name).__file__
elsewhere = {name: path for name, path in found.items() if not pathlib.Path(path).resolve().is_relative_to(site)}
assert not elsewhere, f"imported from outside the installed wheel: {elsewhere}"
missing = sorted(expected - set(found))
assert not missing, f"modules of the checkout missing from the wheel: {missing}"
from sat_video.model.build import import_plugins
import_plugins()  # the built-in mixins are found beside the installed sat_video
print(len(found))
"""


def _checkout_modules() -> list[str]:
    names = []
    for top in PACKAGES:
        for path in (ROOT / top).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return sorted(names)


@pytest.mark.slow
def test_the_wheel_holds_every_module_and_imports_outside_the_checkout(tmp_path):
    source = tmp_path / "source"  # a copy, so that building leaves no build/ or egg-info in the checkout
    source.mkdir()
    for name in PROJECT_FILES:
        shutil.copy2(ROOT / name, source / name)
    for top in PACKAGES:
        shutil.copytree(ROOT / top, source / top, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist",
                    source], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("sat_video-*.whl")
    in_wheel = {name.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
                for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".py")}
    assert sorted(in_wheel) == _checkout_modules()

    # A fresh environment that sees this one's dependencies through a .pth line: a path added that way has its own
    # .pth files ignored, so the editable install's finder is never installed there.
    environment = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", environment], check=True)
    python = environment / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                               capture_output=True, text=True).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel],
                   check=True, capture_output=True)

    imported = subprocess.run([python, "-c", IMPORT_ALL, site, json.dumps(_checkout_modules())], cwd=tmp_path,
                              capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert int(imported.stdout.split()[-1]) == len(_checkout_modules())
