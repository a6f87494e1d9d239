"""Builds UI-format workflows (the files the canvas opens) from a short description, using /object_info.

Used by scripts/build_workflows.py to (re)generate the shipped workflows; the JSON files are what ships.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..cli.workflow import _has_control_widget, _input_defs, _is_widget


@dataclass
class _Node:
    id: int
    type: str
    widgets: dict[str, Any]
    title: str | None
    links_in: dict[str, tuple[int, int]] = field(default_factory=dict)


def _node_height(slots: int, outputs: int, widgets: int, multiline: int) -> int:
    """Roughly what the canvas draws, so generated nodes never overlap once the page sizes them."""
    return 46 + 24 * max(slots, outputs) + 28 * widgets + 90 * multiline


class UIWorkflow:
    def __init__(self, object_info: dict[str, dict]) -> None:
        self.info = object_info
        self.nodes: list[_Node] = []
        self.notes: list[tuple[str, str]] = []

    def add(self, node_type: str, title: str | None = None, **widgets: Any) -> int:
        if node_type not in self.info:
            raise KeyError(f"unknown node type {node_type}")
        node = _Node(len(self.nodes) + 1, node_type, widgets, title)
        self.nodes.append(node)
        return node.id

    def connect(self, src: int, slot: int, dst: int, input_name: str) -> None:
        self.nodes[dst - 1].links_in[input_name] = (src, slot)

    def note(self, title: str, text: str) -> None:
        self.notes.append((title, text))

    def _depths(self) -> dict[int, int]:
        depth: dict[int, int] = {}

        def visit(node_id: int) -> int:
            if node_id not in depth:
                sources = self.nodes[node_id - 1].links_in.values()
                depth[node_id] = 1 + max((visit(s) for s, _ in sources), default=-1)
            return depth[node_id]

        for node in self.nodes:
            visit(node.id)
        return depth

    def build(self) -> dict:
        depths = self._depths()
        column_top: dict[int, int] = {}
        links: list[list] = []
        out_links: dict[tuple[int, int], list[int]] = {}
        ui_nodes = []
        for node in self.nodes:
            info = self.info[node.type]
            inputs, values = [], []
            multiline = 0
            for name, kind, options in _input_defs(info):
                multiline += int(bool(options.get("multiline")))
                linked = name in node.links_in
                widget = _is_widget(kind, options)
                if widget:
                    default = options.get("default", kind[0] if isinstance(kind, list) and kind else None)
                    values.append(node.widgets.get(name, default))
                    if _has_control_widget(name, kind, options):
                        values.append("fixed")
                if linked or not widget:
                    slot_type = "COMBO" if isinstance(kind, list) else kind
                    entry: dict[str, Any] = {"name": name, "type": slot_type, "link": None}
                    if widget:
                        entry["widget"] = {"name": name}
                    if linked:
                        link_id = len(links) + 1
                        src, src_slot = node.links_in[name]
                        links.append([link_id, src, src_slot, node.id, len(inputs), slot_type])
                        out_links.setdefault((src, src_slot), []).append(link_id)
                        entry["link"] = link_id
                    inputs.append(entry)
            unknown = set(node.widgets) - {d[0] for d in _input_defs(info)}
            if unknown:
                raise KeyError(f"{node.type} has no inputs {sorted(unknown)}")
            column = depths[node.id]
            height = _node_height(len(inputs), len(info["output"]), len(values), multiline)
            top = column_top.get(column, 60)
            column_top[column] = top + height + 50
            ui_nodes.append({
                "id": node.id, "type": node.type, "pos": [40 + 400 * column, top], "size": [360, height],
                "flags": {}, "order": 0, "mode": 0, "inputs": inputs, "outputs": [],
                "properties": {"Node name for S&R": node.type}, "widgets_values": values,
                **({"title": node.title} if node.title else {}),
            })
        for ui_node, node in zip(ui_nodes, self.nodes, strict=True):
            info = self.info[node.type]
            names = info.get("output_name") or info["output"]
            ui_node["outputs"] = [
                {"name": names[i], "type": "COMBO" if isinstance(t, list) else t,
                 "links": out_links.get((node.id, i), []), "slot_index": i}
                for i, t in enumerate(info["output"])
            ]
        order = sorted(ui_nodes, key=lambda n: depths[n["id"]])
        for index, ui_node in enumerate(order):
            ui_node["order"] = index
        next_id = len(ui_nodes) + 1
        for offset, (title, text) in enumerate(self.notes):
            ui_nodes.append({
                "id": next_id + offset, "type": "MarkdownNote", "pos": [40, max(column_top.values()) + 240 * offset],
                "size": [520, 200], "flags": {}, "order": len(ui_nodes), "mode": 0, "inputs": [], "outputs": [],
                "title": title, "properties": {}, "widgets_values": [text],
            })
        return {
            "last_node_id": len(ui_nodes), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4,
        }
