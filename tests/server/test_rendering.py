"""Answers render as Markdown with no way to inject HTML or script."""

from __future__ import annotations

from server.rendering import render_markdown


def test_markdown_is_rendered():
    html = render_markdown("**bold** and `code`\n\n- item")
    assert "<strong>bold</strong>" in html and "<code>code</code>" in html and "<li>item</li>" in html


def test_raw_html_and_script_are_escaped():
    html = render_markdown('<script>alert(1)</script><img src=x onerror="alert(2)">')
    assert "<script" not in html and "<img" not in html
    assert "&lt;script&gt;" in html


def test_only_safe_link_schemes_become_links():
    html = render_markdown("[a](javascript:alert(1)) [b](https://example.org) [c](data:text/html,x) [d](//evil)")
    assert 'href="https://example.org"' in html
    assert html.count("<a ") == 1
