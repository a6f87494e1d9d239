"""The pack's help pages and templates as a user meets them in ComfyUI's web page: the node's info button opens
our help page (not the generic fallback), and the template browser lists each shipped workflow once, with its
thumbnail, and opens it."""

from __future__ import annotations

import re
import urllib.request
from io import BytesIO
from pathlib import Path

import comfyui_ip2p
import pytest
from comfy_page import PACK, TEMPLATES
from PIL import Image

pytestmark = [pytest.mark.browser, pytest.mark.server]

WORKFLOWS = sorted(TEMPLATES.glob("*.json"))


def docs_dir() -> Path:
    # ComfyUI serves a pack's WEB_DIRECTORY at /extensions/<folder>/; the front end reads help from its docs/.
    web = comfyui_ip2p.WEB_DIRECTORY
    assert web, "__init__.py sets no WEB_DIRECTORY, so ComfyUI serves none of the help pages"
    return (PACK / web / "docs").resolve()


def heading(markdown: str) -> str:
    return re.search(r"^# (.+)$", markdown, re.MULTILINE).group(1).strip()


def input_names(node_info: dict) -> list[str]:
    return [name for section in ("required", "optional") for name in node_info["input"].get(section, {})]


def test_every_node_opens_its_own_help_page_from_the_info_button(ui, our_nodes):
    docs = docs_dir()
    ui.page.evaluate("() => window.app.graph.clear()")
    for name in sorted(our_nodes):
        page_file = docs / f"{name}.md"
        assert page_file.is_file(), f"no help page {page_file.relative_to(PACK)}"
        node_id = ui.page.evaluate("""type => { const n = window.LiteGraph.createNode(type);
            n.pos = [200, 200]; window.app.graph.add(n); return n.id; }""", name)
        panel = ui.open_help(node_id)
        assert not panel["fallback"], f"{name}: the page showed the generic fallback, not our help page"
        assert panel["h1"] == heading(page_file.read_text()), name
        assert panel["tables"] >= 1, f"{name}: the inputs table did not render"
        missing = [i for i in input_names(our_nodes[name]) if i not in panel["text"]]
        assert missing == [], f"{name}: help page does not explain {missing}"
        if name == "InstructEdit":
            ui.screenshot("help_InstructEdit")
        ui.page.evaluate("id => window.app.graph.remove(window.app.graph.getNodeById(id))", node_id)


def test_templates_are_listed_once_with_thumbnails_and_open(ui, ui_server, pack_module):
    listed = ui_server.get("/api/workflow_templates").get(pack_module, [])
    assert sorted(listed) == sorted(w.stem for w in WORKFLOWS), "each shipped workflow must be listed exactly once"
    ui.command("Comfy.BrowseTemplates")
    dialog = ui.page.locator(".p-dialog")
    dialog.get_by_text(pack_module, exact=True).click()
    for workflow in WORKFLOWS:
        card = dialog.locator(f'[data-testid="template-workflow-{workflow.stem}"]')
        assert card.count() == 1, f"{workflow.stem} shown {card.count()} times"
        card.locator("img").first.wait_for(state="visible", timeout=15_000)
        shown = card.locator("img").first.evaluate(
            """img => new Promise(done => { const report = () => done([img.naturalWidth, img.naturalHeight]);
                img.complete ? report() : img.addEventListener('load', report, {once: true}); })""")
        url = f"{ui_server.url}/api/workflow_templates/{pack_module}/{workflow.stem}.jpg"
        with urllib.request.urlopen(url, timeout=10) as response:
            thumbnail = Image.open(BytesIO(response.read()))
        assert thumbnail.format == "JPEG"
        assert tuple(shown) == thumbnail.size, f"{workflow.stem}: the card does not show our thumbnail"
    ui.screenshot("templates")
    dialog.locator('[data-testid="template-workflow-instruct_edit"]').click()
    ui.page.wait_for_function("""() => window.app.graph._nodes.some(n => n.type === 'InstructEdit')""",
                              timeout=15_000)
    assert ui.warnings() == []
