"""Registry and ComfyUI-Manager readiness.

- the pyproject metadata the Comfy registry reads is complete, and `comfy node validate` (comfy-cli) passes;
- the archive `comfy node pack` would publish installs into a fresh ComfyUI under another folder name, with no
  editable install to lean on, and serves our nodes, templates, thumbnails and help pages;
- requirements.txt resolves with nothing new to install, and the shipped code never installs packages itself;
- every node has a help page that explains each input and states the real default;
- the shipped UI workflows convert to API format offline with comfy-cli's maintained converter (which agrees with
  ours in headless/workflow.py) and match the node definitions: types, input names, combo values, links.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

PACK = Path(__file__).resolve().parents[1]
TEMPLATES = PACK / "example_workflows"
WORKFLOWS = sorted(TEMPLATES.glob("*.json"))
COMFY_CLI = Path(sys.executable).with_name("comfy")
# Inputs whose choices are files the user brings (the README and each workflow's note say which).
USER_FILES = {("LoadIP2PModel", "checkpoint"), ("CheckpointLoaderSimple", "ckpt_name"), ("LoadImage", "image"),
              ("CLIPDirectionFilter", "clip_weights"), ("CLIPEditMetrics", "clip_weights"),
              ("LoadEditDataset", "dataset")}
NODE_ID = re.compile(r"^[A-Za-z](?:[A-Za-z0-9]|[-_.](?=[A-Za-z0-9]))*$")


# --- helpers -----------------------------------------------------------------------------------------------------
def comfy_cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    assert COMFY_CLI.exists(), "comfy-cli is missing: it is a dev requirement (requirements-dev.txt)"
    return subprocess.run([str(COMFY_CLI), "--skip-prompt", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "200"})


def input_specs(node_info: dict) -> dict[str, tuple]:
    """name -> (type or option list, options dict) for every input of an /object_info entry."""
    specs = {}
    for section in ("required", "optional"):
        for name, spec in node_info["input"].get(section, {}).items():
            specs[name] = (spec[0], spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    return specs


def combo_options(kind, options: dict) -> list | None:
    if isinstance(kind, list):
        return kind
    return options.get("options") if kind == "COMBO" else None


def pack_files() -> list[Path]:
    """What a commit of the working tree would hold: tracked files plus new files git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=PACK,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    return [Path(name) for name in listed if name and ((PACK / name).exists() or (PACK / name).is_symlink())]


def docs_table(markdown: str) -> dict[str, str]:
    """input name -> default cell, from the help page's `| `name` | meaning | default |` rows."""
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and re.fullmatch(r"`[A-Za-z0-9_]+`", cells[0]):
            rows[cells[0].strip("`")] = cells[-1]
    return rows


def default_matches(cell: str, default) -> bool:
    text = cell.strip("`")
    if isinstance(default, bool):
        return text == str(default).lower()
    if isinstance(default, int | float):
        try:
            return float(text) == float(default)
        except ValueError:
            return False
    if default == "":
        return text == "(empty)"
    return text == str(default) or "\n" in str(default)  # multi-line defaults are described, not quoted


# --- fixtures ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def object_info(comfy_nodes) -> dict:
    from comfyui_ip2p.cli.workflow import object_info_in_process

    info = object_info_in_process()
    assert info["SaveImage"]["output_node"] and not info["VAEDecode"]["output_node"]
    return info


@pytest.fixture(scope="module")
def our_nodes(object_info) -> dict[str, dict]:
    return {name: info for name, info in object_info.items()
            if info.get("python_module") == "custom_nodes.comfyui_ip2p"}


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> Path:
    """The working tree as a fresh git repository (what CI clones), for comfy-cli's packer and validator."""
    root = tmp_path_factory.mktemp("staged") / "pack"
    for rel in pack_files():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        source = PACK / rel
        if source.is_symlink():
            target.symlink_to(source.readlink())
        else:
            shutil.copy2(source, target)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"]):
        subprocess.run(cmd, cwd=root, check=True, capture_output=True)
    return root


# --- help pages --------------------------------------------------------------------------------------------------
def help_docs() -> Path:
    import comfyui_ip2p

    assert comfyui_ip2p.WEB_DIRECTORY, "__init__.py sets no WEB_DIRECTORY: ComfyUI would serve no help page"
    return (PACK / comfyui_ip2p.WEB_DIRECTORY / "docs").resolve()


def test_every_node_has_a_description_and_a_help_page_with_real_defaults(our_nodes):
    docs = help_docs()
    assert len(our_nodes) >= 6
    for name, info in our_nodes.items():
        assert info["description"], f"{name} has no description"
        page = docs / f"{name}.md"
        assert page.is_file(), f"{name} has no help page at {page.relative_to(PACK)}"
        text = page.read_text()
        assert text.startswith("# "), f"{page.name} must start with the node's title"
        assert "## Example" in text, f"{page.name} has no example"
        table = docs_table(text)
        for input_name, (_, options) in input_specs(info).items():
            assert input_name in table, f"{page.name} does not explain input {input_name!r}"
            if "default" in options:
                assert default_matches(table[input_name], options["default"]), (
                    f"{page.name}: {input_name} documented as {table[input_name]}, the node says "
                    f"{options['default']!r}")


def test_no_help_page_for_a_node_that_does_not_exist(our_nodes):
    pages = {p.stem for p in help_docs().glob("*.md")}
    assert pages - set(our_nodes) == set(), "help pages without a node"


# --- workflows, converted offline ----------------------------------------------------------------------------------
def with_user_files(object_info: dict, prompt: dict) -> dict:
    """object_info as on a machine that has the files the workflow names (checkpoints, photos, CLIP weights)."""
    info = json.loads(json.dumps(object_info))
    for node in prompt.values():
        for name, value in node["inputs"].items():
            if (node["class_type"], name) in USER_FILES and isinstance(value, str):
                kind, options = input_specs(info[node["class_type"]])[name]
                combo_options(kind, options).append(value)
    return info


def check_against_definitions(prompt: dict, object_info: dict) -> None:
    for node_id, node in prompt.items():
        kind = node["class_type"]
        assert kind in object_info, f"node {node_id}: unknown type {kind}"
        specs = input_specs(object_info[kind])
        required = set(object_info[kind]["input"].get("required", {}))
        assert set(node["inputs"]) <= set(specs), f"{kind}: unknown inputs {set(node['inputs']) - set(specs)}"
        assert required <= set(node["inputs"]), f"{kind}: missing inputs {required - set(node['inputs'])}"
        for name, value in node["inputs"].items():
            expected, options = specs[name]
            if isinstance(value, list):
                source = prompt[value[0]]
                outputs = object_info[source["class_type"]]["output"]
                assert value[1] < len(outputs), f"{kind}.{name}: link to a missing output"
                produced = outputs[value[1]]
                assert produced == expected or "*" in (produced, expected), f"{kind}.{name}: {produced} != {expected}"
                continue
            choices = combo_options(expected, options)
            if choices is not None:
                assert value in choices, f"{kind}.{name}: {value!r} is not one of its choices"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[w.stem for w in WORKFLOWS])
def test_workflow_converts_offline_with_comfy_cli_and_matches_the_nodes(object_info, tmp_path, path):
    from comfy_cli.workflow_to_api import convert_ui_to_api
    from comfyui_ip2p.cli.workflow import ui_to_api

    ui = json.loads(path.read_text())
    prompt = convert_ui_to_api(ui, object_info)

    def essentials(api: dict) -> dict:
        return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}

    assert essentials(prompt) == essentials(ui_to_api(ui, object_info)), "comfy-cli and headless disagree"
    info = with_user_files(object_info, prompt)
    check_against_definitions(prompt, info)
    # comfy-cli's own validator, offline, on the same definitions
    (tmp_path / "object_info.json").write_text(json.dumps(info))
    (tmp_path / "prompt.json").write_text(json.dumps(prompt))
    done = comfy_cli("--json", "workflow", "validate", "--workflow", "prompt.json", "--input", "object_info.json",
                     cwd=tmp_path)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0 and report["data"]["valid"], json.dumps(report.get("data"), indent=1)[:3000]


def test_each_workflow_has_a_jpeg_thumbnail():
    from PIL import Image

    for workflow in WORKFLOWS:
        thumbnail = workflow.with_suffix(".jpg")
        assert thumbnail.is_file(), f"{workflow.name} has no thumbnail {thumbnail.name}"
        with Image.open(thumbnail) as image:
            assert image.format == "JPEG" and min(image.size) >= 256
        assert thumbnail.stat().st_size < 300_000


# --- registry metadata -------------------------------------------------------------------------------------------
def test_pyproject_metadata_is_complete_for_the_registry():
    from comfy_cli.registry.config_parser import extract_node_configuration

    config = extract_node_configuration(str(PACK / "pyproject.toml"))
    project, comfy = config.project, config.tool_comfy
    assert NODE_ID.match(project.name) and len(project.name) < 100
    assert re.fullmatch(r"\d+\.\d+\.\d+", project.version)
    assert project.description
    assert project.license.file or project.license.text
    if project.license.file:
        assert (PACK / project.license.file).is_file()
    for url in (project.urls.repository, project.urls.documentation, project.urls.issues):
        assert url.startswith("https://"), f"missing or bad project URL: {url!r}"
    assert comfy.publisher_id and comfy.display_name
    assert comfy.icon.startswith("https://"), "the registry shows [tool.comfy] Icon: give it an image URL"
    assert project.supported_comfyui_version, "requires-comfyui is missing"
    assert project.supported_os, "no 'Operating System ::' classifier"
    requirements = [line.split("#")[0].strip() for line in (PACK / "requirements.txt").read_text().splitlines()]
    assert sorted(project.dependencies) == sorted(r for r in requirements if r), \
        "pyproject dependencies (registry) and requirements.txt (Manager) differ"


def test_icon_url_points_at_a_file_in_this_repository():
    from comfy_cli.registry.config_parser import extract_node_configuration

    config = extract_node_configuration(str(PACK / "pyproject.toml"))
    repository = config.project.urls.repository.removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{repository}/main/"
    assert config.tool_comfy.icon.startswith(prefix), f"icon {config.tool_comfy.icon} is not in {prefix}"
    assert (PACK / config.tool_comfy.icon.removeprefix(prefix)).is_file()


def test_comfy_node_validate_passes(staged):
    done = comfy_cli("node", "validate", cwd=staged)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "All validation checks passed" in output and "warning" not in output.lower(), output


# --- ComfyUI-Manager rules -------------------------------------------------------------------------------------------
def test_requirements_resolve_with_nothing_new_to_install():
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-",
                           "-r", str(PACK / "requirements.txt")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert [item["metadata"]["name"] for item in report["install"]] == []
    names = (PACK / "requirements.txt").read_text().lower()
    assert not re.search(r"^\s*torch(vision|audio)?\b", names, re.MULTILINE), "ComfyUI brings torch"


def archive_files(staged: Path) -> list[str]:
    """The files of the archive `comfy node pack` builds for the registry (dev-only files are left out)."""
    archive = staged / "node.zip"
    if not archive.exists():
        done = comfy_cli("node", "pack", cwd=staged)
        assert done.returncode == 0, done.stdout + done.stderr
    with zipfile.ZipFile(archive) as zf:
        return zf.namelist()


def package_modules(staged: Path) -> list[Path]:
    """Python files ComfyUI can import from the archive: the root and every folder with an __init__.py."""
    names = set(archive_files(staged))
    return [staged / n for n in names if n.endswith(".py") and (
        "/" not in n or f"{n.rsplit('/', 1)[0]}/__init__.py" in names)]


def test_shipped_code_imports_relatively_and_installs_nothing(staged):
    names = archive_files(staged)
    for tool in ("tests/", "testing/", "bench/", "scripts/"):
        assert not [n for n in names if n.startswith(tool)], f"the registry archive ships {tool}"
    assert not [n for n in names if n.endswith(("synthetic.py", "openai_server.py", "probe_nodes.py"))], (
        "test material is in the registry archive")
    files = package_modules(staged)
    assert any(f.name == "nodes_edit.py" for f in files)
    assert not (staged / "install.py").exists(), "ComfyUI-Manager would run install.py: keep to requirements.txt"
    for path in files:
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import | ast.ImportFrom):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                absolute_self = [m for m in modules if m.split(".")[0] == "comfyui_ip2p"]
                assert not (absolute_self and getattr(node, "level", 0) == 0), (
                    f"{path.relative_to(staged)}:{node.lineno} imports the pack by an absolute name; a user's "
                    "ComfyUI has no `comfyui_ip2p` package: use a relative import")
        assert not re.search(r"pip[\"',\s]+install|pip\.main|ensurepip", source), (
            f"{path.relative_to(staged)} installs packages at run time: list them in requirements.txt")


# --- a fresh ComfyUI with the published archive ------------------------------------------------------------------
# Runs main.py with this checkout's editable install switched off (no single quotes: it goes into sh '...').
NO_EDITABLE_PACK = textwrap.dedent("""\
    import runpy, sys
    # A fresh ComfyUI has no editable install of this pack: drop ours before ComfyUI starts.
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


@pytest.mark.slow
@pytest.mark.server
def test_published_archive_installs_into_a_fresh_comfyui(staged, tmp_path, monkeypatch):
    from comfy_cli.registry.config_parser import extract_node_configuration
    from comfyui_ip2p.cli.runtime import comfyui_dir
    from comfyui_ip2p.testing import comfy_server

    archive_files(staged)  # builds node.zip
    folder = extract_node_configuration(str(staged / "pyproject.toml")).project.name  # the registry's folder name
    base = tmp_path / "base"
    for sub in ("models/checkpoints", "input", "output", "temp", "custom_nodes"):
        (base / sub).mkdir(parents=True)
    with zipfile.ZipFile(staged / "node.zip") as zf:
        zf.extractall(base / "custom_nodes" / folder)
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nunset PYTHONPATH\nexec '{sys.executable}' -c '{NO_EDITABLE_PACK}' \"$@\"\n")
    python.chmod(0o755)
    # The harness normally links this checkout in as custom_nodes/comfyui_ip2p; here only the archive may load.
    monkeypatch.setattr(comfy_server, "link_pack", lambda base_dir: None)
    with comfy_server.ComfyServer(comfyui_dir(), base, python=str(python)) as server:
        info = server.get("/object_info")
        ours = {n for n, i in info.items() if i.get("python_module") == f"custom_nodes.{folder}"}
        assert {"InstructEdit", "LoadIP2PModel", "DualCFGSampler", "IP2PReferenceResize"} <= ours, server.log_tail()
        loaded = [line for line in server.log_tail(200_000).splitlines() if line.endswith(f"custom_nodes/{folder}")]
        assert loaded and "IMPORT FAILED" not in loaded[0], server.log_tail()
        templates = server.get("/api/workflow_templates")
        assert sorted(templates.get(folder, [])) == sorted(w.stem for w in WORKFLOWS), templates
        for workflow in WORKFLOWS:
            for suffix in (".json", ".jpg"):
                assert fetch(server, f"/api/workflow_templates/{folder}/{workflow.stem}{suffix}"), workflow.stem
        docs = help_docs()
        for name in ours:
            assert fetch(server, f"/extensions/{folder}/docs/{name}.md") == (docs / f"{name}.md").read_bytes()


def fetch(server, path: str) -> bytes:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(server.url + path, timeout=10) as response:
            return response.read()
    except urllib.error.HTTPError as error:
        raise AssertionError(f"the fresh ComfyUI does not serve {path}: HTTP {error.code}") from error
