"""`pip install .` into a fresh environment gives the three commands, working from any folder, and ships the
product only (the templates the commands run, not testing/ or scripts/).

The fresh virtual environment sees the runtime's packages (torch, ComfyUI's requirements, pip, setuptools)
through one path line in a .pth file, so nothing is downloaded. Not `--system-site-packages`: made from the
runtime's venv, that would expose the base interpreter's packages (no torch), and a new venv's bundled
setuptools cannot build a wheel offline. A plain path line does not run the .pth files of the runtime's
site-packages, so the runtime's editable install of this pack stays out: every import below comes from the
copy pip installed (checked).
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

PACK = Path(__file__).resolve().parents[1]
COMMANDS = {  # command -> options its --help must list
    "comfyui-ip2p-edit": ["--image", "--instruction", "--output"],
    "comfyui-ip2p-build-dataset": ["--captions", "--name"],
    "comfyui-ip2p-train": ["--model", "--dataset"],
}
NOT_SHIPPED = ("testing", "scripts", "tests", "bench")


def source_tree(target: Path) -> Path:
    """The working tree without ignored files (setuptools writes build/ and *.egg-info into its source)."""
    listed = None
    if (PACK / ".git").exists() and shutil.which("git"):
        done = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=PACK,
                              capture_output=True, text=True)
        listed = [name for name in done.stdout.split("\0") if name] if done.returncode == 0 else None
    if listed is None:
        shutil.copytree(PACK, target, symlinks=True, ignore=shutil.ignore_patterns(
            ".git", ".runtime", "build", "*.egg-info", "__pycache__", "test-artifacts", ".hypothesis"))
        return target
    for name in listed:
        source = PACK / name
        if not source.is_file() or source.is_symlink():
            continue
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target / name)
    return target


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with this repository pip-installed (not editable) into it; returns the venv."""
    tmp = tmp_path_factory.mktemp("install")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    purelib = Path(subprocess.run([venv / "bin/python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                  check=True, capture_output=True, text=True, env=clean_env()).stdout.strip())
    (purelib / "_runtime_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    source = source_tree(tmp / "source")
    done = subprocess.run([venv / "bin/python", "-m", "pip", "install", "--no-index", "--no-deps",
                           "--no-build-isolation", "--no-cache-dir", "--disable-pip-version-check", str(source)],
                          cwd=tmp, capture_output=True, text=True, timeout=300, env=clean_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return venv


def installed_package(venv: Path) -> Path:
    done = subprocess.run([venv / "bin/python", "-c", "import comfyui_ip2p; print(comfyui_ip2p.__file__)"],
                          cwd=venv.parent, capture_output=True, text=True, timeout=60, env=clean_env())
    assert done.returncode == 0, done.stderr[-2000:]
    return Path(done.stdout.strip()).parent


def test_the_package_is_imported_from_the_install_and_ships_the_product_only(installed):
    package = installed_package(installed)
    assert package.is_relative_to(installed), f"comfyui_ip2p was imported from {package}, not from the install"
    for workflow in ("instruct_edit", "build_dataset"):  # the workflows the commands run
        assert (package / "example_workflows" / f"{workflow}.json").is_file(), f"{workflow}.json is not installed"
    assert (package / "example_workflows" / "instruct_edit.jpg").is_file()
    assert (package / "web" / "docs" / "InstructEdit.md").is_file()
    for tool in NOT_SHIPPED:
        assert not (package / tool).exists(), f"comfyui_ip2p/{tool} is installed"
        assert not (package.parent / tool).exists(), f"a top-level {tool} package is installed"
    record = next(package.parent.glob("comfyui_instructpix2pix-*.dist-info")) / "RECORD"
    for line in record.read_text().splitlines():
        path = line.split(",")[0]
        assert not any(path.startswith((f"comfyui_ip2p/{tool}/", f"{tool}/"))
                       for tool in NOT_SHIPPED), f"installed: {path}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_command_help_works_from_any_folder(installed, command):
    executable = installed / "bin" / command
    assert executable.is_file(), f"pip did not install the {command} entry point"
    elsewhere = installed.parent  # neither the repository nor ComfyUI's folder
    done = subprocess.run([executable, "--help"], cwd=elsewhere, capture_output=True, text=True, timeout=180,
                          env=clean_env())
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.startswith("usage: "), done.stdout[:500]
    for option in COMMANDS[command]:
        assert option in done.stdout, f"{command} --help does not list {option}"
