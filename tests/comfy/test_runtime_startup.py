"""What a headless command prints while ComfyUI starts (cli/runtime.py start): ComfyUI's complaints about optional
parts it cannot import (its audio nodes need torchaudio, which this pack does not) are one line, not tracebacks;
--verbose gives them in full; a failure of this pack itself is never summed up.

Each case boots ComfyUI in a fresh subprocess, as a command does, with a package made unimportable there.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import sys
for name in sys.argv[3].split(","):
    sys.modules[name] = None  # `import name` fails, as on a machine without it
from comfyui_ip2p.cli import runtime
runtime.start(sys.argv[1], cpu=True, verbose=sys.argv[2] == "verbose")
import nodes
for name in ("InstructEdit", "GenerateEditInstructions"):
    print(name, "loaded:", name in nodes.NODE_CLASS_MAPPINGS, flush=True)
"""
SUMMARY = re.compile(r"^ComfyUI: (\d+) optional node modules could not be imported \((.*)\); harmless for this pack; "
                     r"--verbose shows ComfyUI's messages$", re.MULTILINE)


def start(base: Path, verbose: bool, missing: str) -> str:
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(base), "verbose" if verbose else "quiet", missing],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.mark.parametrize("verbose", [False, True])
def test_comfyuis_optional_import_failures_are_one_line_unless_verbose(tmp_path, verbose):
    output = start(tmp_path / "base", verbose, "torchaudio")
    assert "InstructEdit loaded: True" in output
    if verbose:
        assert "Traceback" in output and "nodes_audio.py" in output and "torchaudio" in output
        assert not SUMMARY.search(output)
        return
    assert "Traceback" not in output and "IMPORT FAILED" not in output, output
    (line,) = SUMMARY.findall(output)
    count, detail = line
    assert int(count) >= 2 and "nodes_audio, " in detail and "torchaudio" in detail, line
    assert len([row for row in output.splitlines() if row.startswith("ComfyUI:")]) == 1, output


def test_a_failure_of_this_pack_is_shown_in_full_never_summed_up(tmp_path):
    output = start(tmp_path / "base", False, "torchaudio,openai")  # the pack's LLM client needs openai
    assert "GenerateEditInstructions loaded: False" in output and "InstructEdit loaded: True" in output
    assert "InstructPix2Pix: the nodes_dataset nodes failed to load" in output, output
    assert "Traceback" in output and "comfyui_ip2p" in output and "openai" in output, output
    (line,) = SUMMARY.findall(output)
    assert "comfyui_ip2p" not in line[1] and "openai" not in line[1], line
