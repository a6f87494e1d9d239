"""The package layering (README "Layout"): read from the source with `ast`, nothing imported.

Pure math and data (algorithms/, dataset/, training/) -> ComfyUI-bound work (pipeline/) -> nodes/ -> cli/;
testing/, tests/, bench/ and scripts/ sit on top and are never imported by product code.
"""

from __future__ import annotations

from pathlib import Path

from comfyui_ip2p.testing.architecture import ROOT, cycles, format_graph, layering_faults, package_graph


def test_no_import_cycle_between_top_level_packages():
    graph = package_graph()
    assert not cycles(graph), format_graph(graph)


def test_product_imports_point_down_and_never_into_tools():
    assert layering_faults() == []


def test_every_product_package_has_a_layer():
    from comfyui_ip2p.testing.architecture import LAYERS, TOOLS

    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert packages - set(LAYERS) - set(TOOLS) == set(), "a new top-level package needs a place in LAYERS"


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checks_see_a_cycle_an_upward_import_and_a_tool_import(tmp_path):
    _write(tmp_path, {
        "__init__.py": "",
        "dataset/__init__.py": "",
        "dataset/rows.py": "import comfy.utils\nfrom ..pipeline.edit import x\n",
        "pipeline/__init__.py": "",
        "pipeline/edit.py": "from ..dataset import rows\nfrom comfyui_ip2p.testing import fake\n",
        "nodes/__init__.py": "",
        "nodes/n.py": "def f():\n    from ..cli import edit\n",
        "cli/__init__.py": "",
        "cli/edit.py": "import nodes\n",  # ComfyUI's own `nodes` module, not the pack's
        "testing/__init__.py": "",
        "testing/fake.py": "",
    })
    graph = package_graph(tmp_path)
    assert cycles(graph) == [("dataset", "pipeline")]
    assert graph["cli"] == set()
    faults = layering_faults(tmp_path)
    assert any("dataset/rows.py:1" in f and "imports ComfyUI" in f for f in faults)
    assert any("dataset/rows.py:2" in f and "ComfyUI-bound" in f for f in faults)
    assert any("pipeline/edit.py:2" in f and "tool" in f for f in faults)
    assert any("nodes/n.py:2" in f and "cli/ is not below nodes/" in f for f in faults)
    assert len(faults) == 4, faults
