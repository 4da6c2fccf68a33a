"""Assert on HTML with CSS selectors, on the standard library only.

A small DOM built with ``html.parser`` and a selector engine for what page
tests need: type, ``#id``, ``.class``, ``[attr]``, ``[attr=v]``, ``[attr^=v]``,
``[attr*=v]``, ``[attr$=v]``, descendant (space) and child (``>``)
combinators, and ``,`` groups.

    doc = parse(response.text)
    assert doc.select_one("#login-error").text() == "..."
    assert len(doc.select("table#runs-table tbody tr[data-run-id]")) == 3
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html.parser import HTMLParser

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


@dataclass(eq=False)
class Node:
    tag: str
    attrs: dict[str, str] = field(default_factory=dict)
    children: list[Node | str] = field(default_factory=list)
    parent: Node | None = None

    def get(self, name: str, default: str | None = None) -> str | None:
        return self.attrs.get(name, default)

    @property
    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    def text(self) -> str:
        """All text inside, whitespace collapsed."""
        parts: list[str] = []

        def walk(node: Node) -> None:
            for child in node.children:
                if isinstance(child, str):
                    parts.append(child)
                else:
                    walk(child)

        walk(self)
        return " ".join("".join(parts).split())

    def elements(self) -> list[Node]:
        """Every element below this one, in document order."""
        found: list[Node] = []
        for child in self.children:
            if isinstance(child, Node):
                found.append(child)
                found.extend(child.elements())
        return found

    def select(self, selector: str) -> list[Node]:
        groups = [_parse_selector(part) for part in selector.split(",")]
        return [el for el in self.elements() if any(_matches(el, steps) for steps in groups)]

    def select_one(self, selector: str) -> Node:
        """The first match; raises ``LookupError`` (with the selector) if none."""
        found = self.select(selector)
        if not found:
            raise LookupError(f"nothing matches {selector!r}")
        return found[0]


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document")
        self.current = self.root

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: (v if v is not None else "") for k, v in attrs}, parent=self.current)
        self.current.children.append(node)
        if tag not in VOID:
            self.current = node

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: (v if v is not None else "") for k, v in attrs}, parent=self.current)
        self.current.children.append(node)

    def handle_endtag(self, tag: str) -> None:
        node: Node | None = self.current
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.current = node.parent

    def handle_data(self, data: str) -> None:
        self.current.children.append(data)


def parse(html: str) -> Node:
    builder = _Builder()
    builder.feed(html)
    builder.close()
    return builder.root


_TOKEN = re.compile(
    r"""(?P<tag>[a-zA-Z][\w-]*|\*)|\#(?P<id>[\w-]+)|\.(?P<cls>[\w-]+)"""
    r"""|\[(?P<attr>[\w:-]+)(?:(?P<op>[\^*$]?=)(?:"(?P<dq>[^"]*)"|'(?P<sq>[^']*)'|(?P<bare>[^\]]*)))?\]"""
)


@dataclass
class _Compound:
    tag: str | None = None
    ids: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    attrs: list[tuple[str, str | None, str | None]] = field(default_factory=list)

    def matches(self, node: Node) -> bool:
        if self.tag not in (None, "*") and node.tag != self.tag.lower():
            return False
        if any(node.get("id") != i for i in self.ids):
            return False
        if not set(self.classes) <= node.classes:
            return False
        for name, op, value in self.attrs:
            actual = node.get(name)
            if actual is None:
                return False
            if op == "=" and actual != value:
                return False
            if op == "^=" and not actual.startswith(value or ""):
                return False
            if op == "*=" and (value or "") not in actual:
                return False
            if op == "$=" and not actual.endswith(value or ""):
                return False
        return True


def _parse_compound(text: str) -> _Compound:
    compound = _Compound()
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise ValueError(f"unsupported selector part {text[position:]!r}")
        if match["tag"]:
            compound.tag = match["tag"]
        elif match["id"]:
            compound.ids.append(match["id"])
        elif match["cls"]:
            compound.classes.append(match["cls"])
        else:
            value = next((match[g] for g in ("dq", "sq", "bare") if match[g] is not None), None)
            compound.attrs.append((match["attr"], match["op"], value))
        position = match.end()
    return compound


def _parse_selector(selector: str) -> list[tuple[str, _Compound]]:
    """``"a > b c"`` -> [(" ", a), (">", b), (" ", c)] (the first combinator is unused)."""
    tokens = re.findall(r"""(?:\[[^\]]*\]|[^\s>])+|>""", selector.strip())
    steps: list[tuple[str, _Compound]] = []
    combinator = " "
    for token in tokens:
        if token == ">":
            combinator = ">"
            continue
        steps.append((combinator, _parse_compound(token)))
        combinator = " "
    if not steps:
        raise ValueError(f"empty selector {selector!r}")
    return steps


def _matches(node: Node, steps: list[tuple[str, _Compound]]) -> bool:
    combinator, last = steps[-1]
    if not last.matches(node):
        return False
    if len(steps) == 1:
        return True
    rest = steps[:-1]
    parent = node.parent
    if combinator == ">":
        return parent is not None and _matches(parent, rest)
    while parent is not None:
        if _matches(parent, rest):
            return True
        parent = parent.parent
    return False
