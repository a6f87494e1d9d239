"""Print the pack's package import graph and its cycles: `python scripts/import_graph.py`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testing.architecture import cycles, format_graph, package_graph


def main() -> None:
    graph = package_graph()
    print(format_graph(graph))
    found = cycles(graph)
    print("cycles:", ", ".join(f"{a} <-> {b}" for a, b in found) if found else "none")


if __name__ == "__main__":
    main()
