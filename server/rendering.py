"""HTML rendering: the Jinja templates under ``web/`` and safe Markdown.

Answers are Markdown; raw HTML in them (or in what users type) is escaped,
never passed through, and links may only use http(s)/mailto schemes, so
neither a user nor the model can inject a script.
"""

from __future__ import annotations

from pathlib import Path

from fastapi.templating import Jinja2Templates
from markdown_it import MarkdownIt
from markupsafe import Markup

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
TEMPLATES_DIR = WEB_DIR / "templates"
STATIC_DIR = WEB_DIR / "static"

_SAFE_SCHEMES = ("http://", "https://", "mailto:")

_markdown = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})
_markdown.enable("table")
_markdown.enable("strikethrough")


def _validate_link(url: str) -> bool:
    lowered = url.strip().lower()
    return lowered.startswith(_SAFE_SCHEMES) or lowered.startswith(("#", "/")) and not lowered.startswith("//")


_markdown.validateLink = _validate_link  # type: ignore[method-assign]


def render_markdown(text: str) -> Markup:
    """Markdown to HTML with every raw HTML tag escaped."""
    return Markup(_markdown.render(text or ""))


def make_templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(TEMPLATES_DIR))
    templates.env.filters["markdown"] = render_markdown
    return templates
