"""The policy's output format: format it, check it strictly, parse it tolerantly.

The policy writes ``<think>…</think> <rule>…</rule> [<check>[x1,y1,x2,y2]</check>]
<bbox>[x1,y1,x2,y2]</bbox> <answer>phrase</answer>`` with integer pixel boxes, corners inclusive,
in the 600x600 frame. ``<check>`` (the hidden support box) is required when the episode hides a
box and optional otherwise. Unlike the official one-support regex, ``<rule>`` is always required.

Strict check (the format reward): the whole text, up to surrounding whitespace, is exactly that tag
sequence; no text field contains a tag; each box holds four non-negative integers; the answer is
not blank.

Tolerant parse (what the pipeline acts on) never raises. Its fallbacks:

- a missing tag gives ``None``; a present but empty text tag gives ``""``;
- the first ``<tag>…</tag>`` pair wins; an unclosed tag (a truncated completion) runs to the next
  known tag or the end of the text;
- a box needs exactly four numbers (ints or decimals, signed, any brackets or separators), else
  ``None``; decimals round half up; swapped corners are reordered; corners are clipped to
  [0, size - 1]; a box that lies wholly outside the frame is ``None``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from numbers import Integral

from conceptseg_edge.errors import InputError

Box = tuple[int, int, int, int]
TAGS = ("think", "rule", "check", "bbox", "answer")
FRAME_SIZE = 600

_ANY_TAG = re.compile(r"</?(?:think|rule|check|bbox|answer)>")
_TEXT = r"(?:(?!</?(?:think|rule|check|bbox|answer)>).)*?"
_BOX = r"\s*\[\s*\d+\s*,\s*\d+\s*,\s*\d+\s*,\s*\d+\s*\]\s*"
_STRICT = {
    has_check: re.compile(
        rf"\s*<think>{_TEXT}</think>\s*<rule>{_TEXT}</rule>\s*"
        + (rf"<check>{_BOX}</check>\s*" if has_check else "")
        + rf"<bbox>{_BOX}</bbox>\s*<answer>(?P<answer>{_TEXT})</answer>\s*",
        re.DOTALL,
    )
    for has_check in (True, False)
}
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class ParsedCompletion:
    """One parsed completion; boxes are inclusive pixel corners in the policy frame."""

    think: str | None
    rule: str | None
    check: Box | None
    bbox: Box | None
    answer: str | None
    well_formed: bool


def template(with_check: bool) -> str:
    """The format as the prompt spells it out to the policy."""
    check = "<check>[x1,y1,x2,y2]</check> " if with_check else ""
    return f"<think>...</think> <rule>...</rule> {check}<bbox>[x1,y1,x2,y2]</bbox> <answer>...</answer>"


def format_box(box: Box) -> str:
    """``[x1,y1,x2,y2]``: the box as the policy writes it."""
    return "[" + ",".join(str(int(c)) for c in box) + "]"


def format_output(*, think: str, rule: str, bbox: Box, answer: str, check: Box | None = None) -> str:
    """Write a well-formed completion (the stage-1 teacher-forced template, test fixtures).

    Raises:
        InputError: a text field holds a tag, the answer is blank, or a box is not four
            non-negative integers.
    """
    for name, text in (("think", think), ("rule", rule), ("answer", answer)):
        if _ANY_TAG.search(text):
            raise InputError(f"{name}: must not contain a format tag, got {text!r}")
    if not answer.strip():
        raise InputError("answer: must not be blank")
    for name, box in (("bbox", bbox), ("check", check)):
        if box is not None and (len(box) != 4 or any(not isinstance(c, Integral) or c < 0 for c in box)):
            raise InputError(f"{name}: expected four non-negative integers, got {box!r}")
    check_part = f"<check>{format_box(check)}</check> " if check is not None else ""
    return (
        f"<think>{think}</think> <rule>{rule}</rule> {check_part}"
        f"<bbox>{format_box(bbox)}</bbox> <answer>{answer}</answer>"
    )


def is_well_formed(text: str, has_hidden_box: bool) -> bool:
    """The strict format check: 1/0 format reward. ``<check>`` is required iff a box is hidden."""
    if not isinstance(text, str):
        return False
    candidates = (True,) if has_hidden_box else (True, False)
    for has_check in candidates:
        m = _STRICT[has_check].fullmatch(text)
        if m and m.group("answer").strip():
            return True
    return False


def parse_output(text: str, *, has_hidden_box: bool = False, size: int = FRAME_SIZE) -> ParsedCompletion:
    """Parse a completion without ever raising; see the module docstring for the fallbacks."""
    if not isinstance(text, str):
        text = ""
    fields = {tag: _extract(text, tag) for tag in TAGS}
    return ParsedCompletion(
        think=fields["think"],
        rule=fields["rule"],
        check=parse_box(fields["check"], size),
        bbox=parse_box(fields["bbox"], size),
        answer=fields["answer"],
        well_formed=is_well_formed(text, has_hidden_box),
    )


def _extract(text: str, tag: str) -> str | None:
    closed = re.search(rf"<{tag}>(.*?)</{tag}>", text, re.DOTALL)
    if closed:
        return closed.group(1).strip()
    opened = text.find(f"<{tag}>")
    if opened < 0:
        return None
    rest = text[opened + len(tag) + 2 :]
    nxt = _ANY_TAG.search(rest)
    return (rest[: nxt.start()] if nxt else rest).strip()


def parse_box(content: str | None, size: int = FRAME_SIZE) -> Box | None:
    """Four numbers from a box tag's content, normalised as the module docstring says; else None."""
    if content is None:
        return None
    numbers = _NUMBER.findall(content)
    if len(numbers) != 4:
        return None
    values = [float(n) for n in numbers]
    if not all(math.isfinite(v) for v in values):  # absurdly long digit strings overflow to inf
        return None
    x1, y1, x2, y2 = (math.floor(v + 0.5) for v in values)
    x1, x2 = sorted((x1, x2))
    y1, y2 = sorted((y1, y2))
    last = size - 1
    if x2 < 0 or y2 < 0 or x1 > last or y1 > last:
        return None
    return (max(x1, 0), max(y1, 0), min(x2, last), min(y2, last))
