"""UI-format workflows (what the canvas saves and the pack ships) to API-format prompts (what /prompt runs).

The conversion needs each node type's input definitions, exactly as `/object_info` serves them, because a
UI node stores its widget values as a list in definition order, not by name.
"""

from __future__ import annotations

from typing import Any

# Nodes that exist only in the front end.
_VIRTUAL = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
_WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
_MODE_MUTED, _MODE_BYPASSED = 2, 4


class WorkflowError(ValueError):
    pass


def object_info_in_process() -> dict[str, dict]:
    """The same data as GET /object_info, read from the loaded node classes."""
    from comfy_api.internal import _ComfyNodeInternal

    import nodes

    info = {}
    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        if issubclass(cls, _ComfyNodeInternal):
            info[name] = cls.GET_NODE_INFO_V1()
            continue
        inputs = cls.INPUT_TYPES()
        info[name] = {
            "input": inputs,
            "input_order": {key: list(value) for key, value in inputs.items()},
            "output": list(cls.RETURN_TYPES),
            "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
            # validators (comfy-cli's among them) find a graph's outputs by this flag
            "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
        }
    return info


def _input_defs(node_info: dict) -> list[tuple[str, Any, dict]]:
    order = node_info.get("input_order") or {k: list(v) for k, v in node_info["input"].items()}
    defs = []
    for section in ("required", "optional"):
        spec = node_info["input"].get(section, {})
        for name in order.get(section, []):
            entry = spec[name]
            kind = entry[0]
            options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            defs.append((name, kind, options))
    return defs


def _is_widget(kind: Any, options: dict) -> bool:
    if options.get("forceInput") or options.get("rawLink"):
        return False
    return isinstance(kind, list) or kind in _WIDGET_TYPES


def _has_control_widget(name: str, kind: Any, options: dict) -> bool:
    """The front end adds a hidden 'control after generate' value after seed-like INT widgets."""
    if "control_after_generate" in options:
        return bool(options["control_after_generate"])
    return kind == "INT" and name in ("seed", "noise_seed")


def _widget_values(node: dict, node_info: dict) -> dict[str, Any]:
    values = node.get("widgets_values") or []
    if isinstance(values, dict):
        return dict(values)
    out: dict[str, Any] = {}
    position = 0
    for name, kind, options in _input_defs(node_info):
        if not _is_widget(kind, options):
            continue
        if position >= len(values):
            break
        out[name] = values[position]
        position += 1
        if _has_control_widget(name, kind, options):
            position += 1
    return out


def _links(ui: dict) -> dict[int, tuple[int, int]]:
    table = {}
    for link in ui.get("links", []):
        if isinstance(link, dict):
            table[link["id"]] = (link["origin_id"], link["origin_slot"])
        else:
            table[link[0]] = (link[1], link[2])
    return table


def _resolve_source(node_id: int, slot: int, nodes_by_id: dict, links: dict) -> tuple[int, int] | Any:
    """Follows reroutes and bypassed nodes back to a real output; a PrimitiveNode yields its value."""
    for _ in range(len(nodes_by_id) + 1):
        node = nodes_by_id[node_id]
        if node["type"] == "PrimitiveNode":
            return ("value", (node.get("widgets_values") or [None])[0])
        passthrough = node["type"] == "Reroute" or node.get("mode") == _MODE_BYPASSED
        if not passthrough:
            return ("link", (node_id, slot))
        upstream = [i for i in node.get("inputs", []) if i.get("link") is not None]
        out_type = node.get("outputs", [{}])[slot].get("type") if node.get("outputs") else None
        match = next((i for i in upstream if i.get("type") == out_type), upstream[0] if upstream else None)
        if match is None:
            return ("none", None)
        node_id, slot = links[match["link"]]
    raise WorkflowError("cycle of reroutes in workflow")


def ui_to_api(ui: dict, object_info: dict[str, dict]) -> dict[str, dict]:
    """Converts a UI-format workflow to an API-format prompt; unknown node types raise WorkflowError."""
    if "nodes" not in ui:
        raise WorkflowError("not a UI-format workflow (no 'nodes' list); API-format prompts need no conversion")
    nodes_by_id = {n["id"]: n for n in ui["nodes"]}
    links = _links(ui)
    prompt: dict[str, dict] = {}
    for node in ui["nodes"]:
        kind = node["type"]
        if kind in _VIRTUAL or node.get("mode") in (_MODE_MUTED, _MODE_BYPASSED):
            continue
        if kind not in object_info:
            raise WorkflowError(f"node {node['id']} is of type {kind!r}, which this ComfyUI does not have")
        inputs = _widget_values(node, object_info[kind])
        for entry in node.get("inputs", []):
            if entry.get("link") is None:
                continue
            origin = links[entry["link"]]
            how, source = _resolve_source(origin[0], origin[1], nodes_by_id, links)
            if how == "link":
                inputs[entry["name"]] = [str(source[0]), source[1]]
            elif how == "value":
                inputs[entry["name"]] = source
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs, "_meta": {"title": node.get("title", kind)}}
    return prompt
