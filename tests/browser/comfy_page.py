"""Drives ComfyUI's own web page (the installed comfyui-frontend-package) through Playwright.

Everything here goes through what a user sees or what the page itself exposes (`window.app`, the canvas, the
dialogs); nothing is stubbed. Positions on the canvas are computed from the graph and the view transform, and
the view is panned so that the point under test sits in the middle of the canvas, away from menus and panels.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.request
from pathlib import Path
from typing import Any

PACK = Path(__file__).resolve().parents[2]
ARTIFACTS = PACK / "test-artifacts" / "browser"
TEMPLATES = PACK / "example_workflows"
VIEWPORT = {"width": 1400, "height": 900}
# What worked for Debian's chromium in a container without a display (see shared RUNTIME_NOTES).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Settings stored on the server before any page opens. The warnings under test are pinned on so that a stored
# user preference can never silence them; the first-visit template dialog is off because tests open it themselves.
UI_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Workflow.ShowMissingNodesWarning": True,
    "Comfy.Workflow.ShowMissingModelsWarning": True,
    "Comfy.Validation.Workflows": True,
    "Comfy.Canvas.SelectionToolbox": True,
    "Comfy.Minimap.Visible": False,
    "LiteGraph.Node.TooltipDelay": 100,
    # Screenshots: node text drawn at every zoom level, no fps counter or zoom buttons over the graph.
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,
    "Comfy.Graph.CanvasInfo": False,
    "Comfy.Graph.CanvasMenu": False,
}
# Nodes that exist only in the front end; they have no server-side definition.
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


def chromium_path() -> str | None:
    return os.environ.get("IP2P_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def store_ui_settings(server_url: str) -> None:
    request = urllib.request.Request(f"{server_url}/settings", data=json.dumps(UI_SETTINGS).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


class ComfyPage:
    def __init__(self, page, url: str, pack_module: str) -> None:
        self.page = page
        self.url = url
        self.pack_module = pack_module
        self.page_errors: list[str] = []
        self.failed_requests: list[str] = []
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        page.on("response", self._record_failure)
        # The "try Nodes 2.0" banner is remembered in local storage only; it would cover the top of the canvas.
        page.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")

    def _record_failure(self, response) -> None:
        ours = (f"/extensions/{self.pack_module}/", f"/api/workflow_templates/{self.pack_module}/")
        if response.status >= 400 and any(part in response.url for part in ours) and not self._is_locale_probe(
                response.url):
            self.failed_requests.append(f"{response.status} {response.url}")

    @staticmethod
    def _is_locale_probe(url: str) -> bool:
        # The help panel asks for docs/<Node>/<locale>.md first and falls back to docs/<Node>.md, which we ship.
        return re.search(r"/docs/[^/]+/[^/]+\.md$", url.split("?")[0]) is not None

    # --- page life -------------------------------------------------------------------------------------------
    def open(self) -> ComfyPage:
        self.page.goto(self.url)
        self.page.wait_for_function(
            "() => window.app && window.app.graph && window.app.canvas && window.LiteGraph"
            " && Object.keys(window.LiteGraph.registered_node_types).length > 100", timeout=90_000)
        return self

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path

    def graph_shot(self, name: str, side: int = 900) -> Path:
        """A square picture of the whole graph alone (focus mode hides the menus): template thumbnails."""
        self.command("Workspace.ToggleFocusMode")
        self.resize({"width": side, "height": side})
        try:
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            path = ARTIFACTS / f"{name}.png"
            self.page.screenshot(path=str(path), clip=self._graph_square(side))
            return path
        finally:
            self.command("Workspace.ToggleFocusMode")
            self.resize(VIEWPORT)

    def _graph_square(self, side: int) -> dict[str, float]:
        """The smallest square (with a margin) around every node, in page pixels, inside the window."""
        left, top, right, bottom = self.page.evaluate("""() => {
            const c = window.app.canvas, box = c.canvas.getBoundingClientRect(), title = LiteGraph.NODE_TITLE_HEIGHT;
            const corners = window.app.graph._nodes.flatMap(n => [
                c.ds.convertOffsetToCanvas([n.pos[0], n.pos[1] - title]),
                c.ds.convertOffsetToCanvas([n.pos[0] + n.size[0], n.pos[1] + n.size[1]])]);
            const xs = corners.map(p => p[0] + box.left), ys = corners.map(p => p[1] + box.top);
            return [Math.min(...xs), Math.min(...ys), Math.max(...xs), Math.max(...ys)]; }""")
        size = min(side, max(right - left, bottom - top) * 1.08)
        x = min(max(0.0, (left + right - size) / 2), side - size)
        y = min(max(0.0, (top + bottom - size) / 2), side - size)
        return {"x": x, "y": y, "width": size, "height": size}

    def resize(self, viewport: dict[str, int]) -> None:
        self.page.set_viewport_size(viewport)
        # The canvas follows the window on a later frame; fitting before that would use the old size.
        self.page.wait_for_function("""() => { const c = window.app.canvas.canvas, box = c.getBoundingClientRect();
            return Math.abs(c.width - box.width * window.devicePixelRatio) < 2 && box.width > 0; }""")
        self.fit_view()

    def command(self, command_id: str) -> None:
        self.page.evaluate("id => window.app.extensionManager.command.execute(id)", command_id)

    # --- workflows -------------------------------------------------------------------------------------------
    def load(self, workflow: dict) -> None:
        self.page.evaluate("async wf => { await window.app.loadGraphData(wf); }", workflow)
        # Dialogs and toasts are raised asynchronously after the graph is configured.
        self.page.wait_for_timeout(800)
        self.fit_view()

    def fit_view(self) -> None:
        self.command("Comfy.Canvas.FitView")
        # Fitting animates the view over several frames; anything placed on the canvas before it ends would move.
        self.page.evaluate("""async () => {
            const ds = window.app.canvas.ds, frame = () => new Promise(r => requestAnimationFrame(r));
            let last = '', still = 0;
            for (let i = 0; i < 300 && still < 5; i++) {
                await frame();
                const now = JSON.stringify([ds.scale, ds.offset[0], ds.offset[1]]);
                still = now === last ? still + 1 : 0;
                last = now;
            } }""")
        self.redraw()

    def redraw(self) -> None:
        self.page.evaluate("() => { window.app.canvas.setDirty(true, true); window.app.canvas.draw(true, true); }")

    def warnings(self) -> list[str]:
        """Texts of every open dialog and every warning or error toast: missing nodes, failed validation."""
        return self.page.evaluate("""() => Array.from(document.querySelectorAll(
              '.p-dialog, .p-toast-message-warn, .p-toast-message-error'))
            .map(e => e.innerText.trim()).filter(t => t.length > 0)""")

    def graph_nodes(self) -> list[dict[str, Any]]:
        return self.page.evaluate("""() => window.app.graph._nodes.map(n => ({
            id: n.id, type: n.type, title: n.title,
            registered: !!window.LiteGraph.registered_node_types[n.type],
            has_errors: !!n.has_errors,
            widgets: (n.widgets || []).map(w => ({name: w.name, value: w.value, type: w.type,
                                                  dom: !!w.element || w.type === 'customtext'}))}))""")

    def overlapping_nodes(self) -> list[str]:
        """Pairs of nodes drawn on top of each other, at the sizes the page gives them (titles included)."""
        return self.page.evaluate("""() => {
            const t = window.LiteGraph.NODE_TITLE_HEIGHT, nodes = window.app.graph._nodes;
            const box = n => [n.pos[0], n.pos[1] - t, n.pos[0] + n.size[0], n.pos[1] + n.size[1]];
            const pairs = [];
            nodes.forEach((a, i) => nodes.slice(i + 1).forEach(b => {
                const [p, q] = [box(a), box(b)];
                if (p[0] < q[2] && q[0] < p[2] && p[1] < q[3] && q[1] < p[3]) pairs.push(`${a.title} / ${b.title}`);
            }));
            return pairs; }""")

    def set_widget(self, node_id: int, name: str, value: Any) -> None:
        found = self.page.evaluate("""([id, name, value]) => {
            const node = window.app.graph.getNodeById(id);
            const widget = node && node.widgets.find(w => w.name === name);
            if (!widget) return false;
            widget.value = value;
            widget.callback?.(value, window.app.canvas, node);
            return true; }""", [node_id, name, value])
        assert found, f"node {node_id} has no widget {name!r}"

    # --- canvas geometry ----------------------------------------------------------------------------------
    def centre_on(self, graph_point: list[float]) -> tuple[float, float]:
        """Pans the view so `graph_point` is at the canvas centre; returns that point in page coordinates."""
        x, y, covered_by = self.page.evaluate("""async ([gx, gy]) => {
            const c = window.app.canvas, box = c.canvas.getBoundingClientRect(), s = c.ds.scale;
            c.ds.offset[0] = box.width / 2 / s - gx;
            c.ds.offset[1] = box.height / 2 / s - gy;
            c.setDirty(true, true); c.draw(true, true);
            // DOM widgets (text areas) follow the canvas on the next animation frames
            await new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)));
            const x = box.left + box.width / 2, y = box.top + box.height / 2;
            const hit = document.elementFromPoint(x, y);
            return [x, y, hit && hit.nodeName !== 'CANVAS' ? hit.outerHTML.slice(0, 120) : null]; }""", graph_point)
        assert covered_by is None, f"canvas centre is covered by {covered_by}"
        return x, y

    def widget_point(self, node_id: int, name: str) -> list[float]:
        return self.page.evaluate("""([id, name]) => {
            const n = window.app.graph.getNodeById(id), w = n.widgets.find(w => w.name === name);
            const h = w.computedHeight || window.LiteGraph.NODE_WIDGET_HEIGHT;
            return [n.pos[0] + n.size[0] / 2, n.pos[1] + (w.y ?? w.last_y) + h / 2]; }""", [node_id, name])

    def input_slot_point(self, node_id: int, name: str) -> list[float]:
        return self.page.evaluate("""([id, name]) => {
            const n = window.app.graph.getNodeById(id);
            return Array.from(n.getConnectionPos(true, n.inputs.findIndex(i => i.name === name))); }""",
                                  [node_id, name])

    def tooltip_at(self, graph_point: list[float]) -> str:
        """Hovers a canvas point like a user and returns the tooltip the page shows there ('' if none)."""
        from playwright.sync_api import TimeoutError as NoTooltip

        x, y = self.centre_on(graph_point)
        self.page.mouse.move(x + 40, y + 40)
        self.page.mouse.move(x, y)
        try:
            self.page.wait_for_selector(".node-tooltip", timeout=3_000)
        except NoTooltip:
            return ""
        return self.page.inner_text(".node-tooltip").strip()

    # --- help panel ------------------------------------------------------------------------------------------
    def open_help(self, node_id: int) -> dict[str, Any]:
        """Selects a node by clicking its title, presses the toolbox's info button, returns the help panel."""
        node = self.page.evaluate("""id => { const n = window.app.graph.getNodeById(id);
            return {title: [n.pos[0] + 30, n.pos[1] - window.LiteGraph.NODE_TITLE_HEIGHT / 2],
                    display: n.constructor.nodeData.display_name}; }""", node_id)
        # A click on a title soon after the previous one (the last node's, at the same spot) is a double click,
        # which opens the title editor instead of selecting: the info button then never shows (seen in CI).
        self.page.wait_for_timeout(600)
        x, y = self.centre_on(node["title"])
        self.page.mouse.click(x, y)
        self.page.click("[data-testid=info-button]", timeout=10_000)
        # Switching nodes clears the panel and shows a loader, so a heading under this node's name is new content.
        self.page.wait_for_function("""name => { const c = document.querySelector('.node-help-content');
            const header = c && c.parentElement.querySelector('.font-semibold');
            return header && header.innerText.trim() === name
                && c.querySelector('h1, .fallback-content') !== null; }""", arg=node["display"], timeout=15_000)
        return self.page.evaluate("""() => { const c = document.querySelector('.node-help-content');
            return {text: c.innerText, fallback: !!c.querySelector('.fallback-content'),
                    h1: c.querySelector('h1')?.innerText.trim() ?? null,
                    tables: c.querySelectorAll('table').length}; }""")

    def upload_image(self, node_id: int, path: Path) -> None:
        """Presses a Load Image node's upload button and picks `path` in the file chooser, as a user does."""
        x, y = self.centre_on(self.widget_point(node_id, "upload"))
        self.page.mouse.move(x, y)
        with self.page.expect_file_chooser(timeout=10_000) as chooser:
            self.page.mouse.down()
            self.page.wait_for_timeout(80)  # a press, not a drag start: the canvas reads it on release
            self.page.mouse.up()
        chooser.value.set_files(str(path))
        self.page.wait_for_function("""([id, name]) => window.app.graph.getNodeById(id).widgets
            .find(w => w.name === 'image').value === name""", arg=[node_id, path.name], timeout=30_000)
        # Nodes load their output images when drawn: bring the whole graph back into view.
        self.fit_view()

    # --- running -------------------------------------------------------------------------------------------
    def queue(self) -> None:
        self.page.evaluate("async () => { await window.app.queuePrompt(0); }")

    def wait_for_image(self, node_id: int, timeout_ms: int) -> dict[str, Any]:
        """Waits until the node (in view) shows a loaded output image on the canvas; returns its URL and size.

        A dialog (failed validation, execution error) ends the wait early with its text as the failure."""
        self.page.wait_for_function("""id => { const n = window.app.graph.getNodeById(id);
            const img = n && n.imgs && n.imgs[0];
            return !!(img && img.complete && img.naturalWidth > 0) || !!document.querySelector('.p-dialog'); }""",
                                    arg=node_id, timeout=timeout_ms)
        shown = self.page.evaluate("""id => { const img = (window.app.graph.getNodeById(id).imgs || [])[0];
            return img ? {src: img.src, width: img.naturalWidth, height: img.naturalHeight} : null; }""", node_id)
        assert shown is not None and shown["width"] > 0, f"no image; the page says: {self.warnings()}"
        return shown
