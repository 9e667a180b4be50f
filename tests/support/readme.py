"""The README's code blocks, each with the marker that says what the tests do with it.

A block is preceded by ``<!-- readme-test: KIND [NAME] [(note)] -->``; KIND is one of ``run``
(the tests run it), ``ci`` (``.ci/run`` runs it), ``transcript`` (a command and its exact
output, reproduced), ``config`` (a TOML example the tests load), ``fragment`` (part of a file a
test builds), ``illustration`` (output shown, its format checked).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tests.support.process import REPO

KINDS = {"run", "ci", "transcript", "config", "fragment", "illustration"}
_BLOCK = re.compile(
    r"(?:<!-- readme-test: (?P<marker>[^>]*?) -->\n)?```(?P<lang>[a-z]*)\n(?P<text>.*?)```",
    re.S,
)


@dataclass(frozen=True)
class Block:
    kind: str  # "" when the block has no marker
    name: str
    lang: str
    text: str
    line: int


def blocks() -> list[Block]:
    source = (REPO / "README.md").read_text()
    found = []
    for match in _BLOCK.finditer(source):
        marker = (match["marker"] or "").split("(")[0].split()
        kind = marker[0] if marker else ""
        name = marker[1] if len(marker) > 1 else ""
        line = source.count("\n", 0, match.start("text"))
        found.append(Block(kind, name, match["lang"], match["text"], line))
    return found


def block(kind: str, name: str = "") -> Block:
    [found] = [b for b in blocks() if b.kind == kind and b.name == name]
    return found
