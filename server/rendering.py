"""HTML rendering: the Jinja templates under ``web/``, the one ``render`` of a
page or htmx fragment, and safe Markdown.

Answers are Markdown; raw HTML in them (or in what users type) is escaped,
never passed through, and links may only use http(s)/mailto schemes, so
neither a user nor the model can inject a script.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
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


def is_htmx(request: Request) -> bool:
    """Whether htmx sent the request (it then swaps a fragment into the page)."""
    return request.headers.get("HX-Request") == "true"


def wants_fragment(request: Request, target_id: str) -> bool:
    """Whether to answer with just the fragment ``#target_id`` (an htmx swap into
    it) rather than the full page (no JS, boosted links, history restore)."""
    headers = request.headers
    return (
        is_htmx(request)
        and headers.get("HX-Target") == target_id
        and headers.get("HX-Boosted") != "true"
        and headers.get("HX-History-Restore-Request") != "true"
    )


def render(
    templates: Jinja2Templates,
    request: Request,
    name: str,
    context: Mapping[str, Any],
    base: Mapping[str, Any] | None = None,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> HTMLResponse:
    """The template ``name`` rendered with ``context`` over ``base`` (what every
    page of an area needs: its CSRF token, the serving adapter, ...).

    The answer carries ``Vary: HX-Request``, because the same URL answers htmx
    with a fragment and a browser with a full page; ``headers`` are added last
    (they may widen ``Vary``)."""
    response = templates.TemplateResponse(request, name, {**(base or {}), **context}, status_code=status)
    response.headers["Vary"] = "HX-Request"
    response.headers.update(headers or {})
    return response
