"""The paper's instruction format (InstructPix2Pix, section 3.1.1; the reference code's
generate_txt_dataset.py): prompts for completion and chat models, the answer parser, the identity test,
caption files in. Plain data and text; the run that asks an endpoint is instructions.py.

    prompt     = caption + "\\n##\\n"
    completion = instruction + "\\n%%\\n" + edited caption      (stop sequence "\\nEND")
    temperature 0.7, frequency penalty 0.1, at most 256 tokens
"""

from __future__ import annotations

import csv
import json
import os
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Mode = Literal["completion", "chat"]
MODES: tuple[Mode, ...] = ("completion", "chat")

PROMPT_SEPARATOR = "\n##\n"
OUTPUT_SEPARATOR = "\n%%\n"
STOP_SEQUENCE = "\nEND"
MAX_PART_CHARS = 400  # longer parts are a model rambling, not a caption

CAPTION_SUFFIXES = (".txt", ".jsonl", ".csv")
_IDENTITY_STRIP = string.whitespace + ".!?"


@dataclass(frozen=True)
class EditInstruction:
    input_caption: str
    instruction: str
    output_caption: str


# Original examples in the paper's format; varied edit kinds (colour, style, time, addition, weather, swap).
CHAT_EXAMPLES: tuple[EditInstruction, ...] = (
    EditInstruction(
        "a red bicycle leaning against a brick wall",
        "make the bicycle blue",
        "a blue bicycle leaning against a brick wall",
    ),
    EditInstruction(
        "portrait of an old fisherman, oil painting",
        "turn it into a charcoal sketch",
        "portrait of an old fisherman, charcoal sketch",
    ),
    EditInstruction(
        "a quiet street in Lisbon at noon",
        "make it night with glowing street lamps",
        "a quiet street in Lisbon at night with glowing street lamps",
    ),
    EditInstruction(
        "a golden retriever sitting on the grass",
        "give the dog a party hat",
        "a golden retriever wearing a party hat sitting on the grass",
    ),
    EditInstruction(
        "a mountain lake under a clear summer sky",
        "add a thunderstorm",
        "a mountain lake under a dark sky with a thunderstorm",
    ),
    EditInstruction(
        "a bowl of green apples on a wooden table",
        "replace the apples with oranges",
        "a bowl of oranges on a wooden table",
    ),
)

SYSTEM_PROMPT = (
    "You write instructions for an image editing model. The user gives the caption of an image. "
    "Invent one plausible, visual edit of that image and answer with exactly three lines:\n"
    "line 1: the edit as a short imperative instruction\n"
    "line 2: %%\n"
    "line 3: the caption of the edited image, worded like the input caption and changed only as the "
    "instruction says\n"
    "Write nothing else: no quotes, labels, numbering or explanations."
)


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters; the defaults are the paper's. None leaves a parameter out of the request."""

    temperature: float | None = 0.7
    frequency_penalty: float | None = 0.1
    max_tokens: int | None = 256
    stop: tuple[str, ...] | None = (STOP_SEQUENCE,)
    seed: int | None = None  # a different seed is a different cache entry: the way to re-roll

    def as_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "temperature": self.temperature,
            "frequency_penalty": self.frequency_penalty,
            "max_tokens": self.max_tokens,
            "stop": list(self.stop) if self.stop is not None else None,
            "seed": self.seed,
        }
        return {name: value for name, value in params.items() if value is not None}


# ---------------------------------------------------------------------------------------------------------
# Prompts and parsing
# ---------------------------------------------------------------------------------------------------------


def format_completion(instruction: str, output_caption: str) -> str:
    return instruction + OUTPUT_SEPARATOR + output_caption


def completion_prompt(caption: str, examples: Sequence[EditInstruction] = ()) -> str:
    """The paper's prompt; examples, if any, go first in the same format so a base model can follow it."""
    shots = "".join(
        e.input_caption + PROMPT_SEPARATOR + format_completion(e.instruction, e.output_caption) + STOP_SEQUENCE + "\n\n"
        for e in examples
    )
    return shots + caption + PROMPT_SEPARATOR


def chat_messages(
    caption: str,
    system_prompt: str = SYSTEM_PROMPT,
    examples: Sequence[EditInstruction] = CHAT_EXAMPLES,
) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}]
    for example in examples:
        messages.append({"role": "user", "content": example.input_caption})
        messages.append(
            {"role": "assistant", "content": format_completion(example.instruction, example.output_caption)}
        )
    messages.append({"role": "user", "content": caption})
    return messages


def build_request(
    mode: Mode,
    model: str,
    caption: str,
    sampling: Sampling = Sampling(),
    system_prompt: str = SYSTEM_PROMPT,
    examples: Sequence[EditInstruction] = CHAT_EXAMPLES,
    completion_few_shot: bool = False,
) -> dict[str, Any]:
    """The JSON body for one caption; also the material of its cache key."""
    if mode == "completion":
        shots = examples if completion_few_shot else ()
        return {"model": model, "prompt": completion_prompt(caption, shots), **sampling.as_params()}
    if mode == "chat":
        return {
            "model": model,
            "messages": chat_messages(caption, system_prompt, examples),
            **sampling.as_params(),
        }
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


class MalformedOutputError(ValueError):
    """The model's text does not follow `instruction \\n%%\\n edited caption`."""


def parse_completion(text: str, max_part_chars: int = MAX_PART_CHARS) -> tuple[str, str]:
    """(instruction, edited caption) from a model's text, or MalformedOutputError saying why not."""
    cleaned = text.replace("\r\n", "\n")
    # Servers that ignore `stop` (or chat models imitating the format) may still write the end marker.
    cleaned = cleaned.split(STOP_SEQUENCE, 1)[0]
    parts = _split_on_separator(cleaned)
    if len(parts) == 1:
        raise MalformedOutputError("no separator")
    if len(parts) > 2:
        raise MalformedOutputError("multiple separators")
    instruction, edited = (part.strip() for part in parts)
    check_parts(instruction, edited, max_part_chars)
    return instruction, edited


def check_parts(instruction: str, edited: str, max_part_chars: int = MAX_PART_CHARS) -> None:
    """MalformedOutputError unless both parts are one non-empty line of at most `max_part_chars` characters."""
    if not instruction.strip() or not edited.strip():
        raise MalformedOutputError("empty part")
    if "\n" in instruction or "\n" in edited:
        raise MalformedOutputError("multi-line part")
    if max(len(instruction), len(edited)) > max_part_chars:
        # The limit, not the length, in the message: it is also the reason's label, counted across captions.
        raise MalformedOutputError(f"too long (over {max_part_chars} characters)")


def _split_on_separator(text: str) -> list[str]:
    """Split on lines that hold only `%%` (spaces around it tolerated)."""
    lines = text.split("\n")
    parts: list[list[str]] = [[]]
    for line in lines:
        if line.strip() == "%%":
            parts.append([])
        else:
            parts[-1].append(line)
    return ["\n".join(part) for part in parts]


def normalise_caption(caption: str) -> str:
    return caption.strip(_IDENTITY_STRIP).lower()


def is_identical_edit(caption: str, output_caption: str) -> bool:
    return normalise_caption(caption) == normalise_caption(output_caption)


# ---------------------------------------------------------------------------------------------------------
# Captions in, rows out
# ---------------------------------------------------------------------------------------------------------


def read_captions(path: str | os.PathLike[str]) -> list[str]:
    """Captions from .txt (one a line), .jsonl (field `caption`, else `input`) or .csv (column `caption`)."""
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _clean(path.read_text(encoding="utf-8-sig").splitlines())
    if suffix == ".jsonl":
        return _clean(_jsonl_captions(path))
    if suffix == ".csv":
        return _clean(_csv_captions(path))
    raise ValueError(f"unsupported caption file {path.name}: use one of {', '.join(CAPTION_SUFFIXES)}")


def _jsonl_captions(path: Path) -> Iterable[str]:
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path.name}:{number}: not JSON ({exc})") from None
        caption = record.get("caption", record.get("input")) if isinstance(record, dict) else None
        if not isinstance(caption, str):
            raise ValueError(f"{path.name}:{number}: no string field 'caption' or 'input'")
        yield caption


def _csv_captions(path: Path) -> Iterable[str]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        column = next((c for c in ("caption", "input") if c in columns), None)
        if column is None:
            raise ValueError(f"{path.name}: no 'caption' column (columns: {', '.join(columns)})")
        for record in reader:
            yield record[column] or ""


def as_captions(source: str | os.PathLike[str] | Sequence[str]) -> list[str]:
    """Captions from a list, a caption file path, or a block of text with one caption per line.

    A one-line string ending in .txt/.jsonl/.csv is a path (and must exist); any other string is text.
    Captions are stripped and blank ones dropped.
    """
    if isinstance(source, os.PathLike):
        return read_captions(source)
    if isinstance(source, str):
        candidate = source.strip()
        if "\n" not in candidate and candidate.lower().endswith(CAPTION_SUFFIXES):
            if not Path(candidate).expanduser().is_file():
                raise FileNotFoundError(f"caption file not found: {candidate}")
            return read_captions(candidate)
        return _clean(source.splitlines())
    return _clean(source)


def _clean(captions: Iterable[str]) -> list[str]:
    out = []
    for caption in captions:
        if not isinstance(caption, str):
            raise TypeError(f"captions must be strings, got {type(caption).__name__}")
        text = caption.strip()
        if text:
            out.append(text)
    return out
