"""Time to first token as a person sees it: headless Chromium types a message
into a running tuneloop, presses Enter, and times until the first streamed
token is on the screen (and until the answer is complete).

    .venv/bin/python bench/browser_ttft.py --url http://127.0.0.1:8000 [--quick]

Prints one JSON summary line last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
PROMPTS = [
    "What is the tallest mountain?", "Give me a tip for sleeping well.", "Name three rivers.",
    "How do I boil an egg?", "What is a prime number?", "Suggest a name for a dog.",
]


def measure(url: str, turns: int, chromium: str) -> dict:
    from playwright.sync_api import sync_playwright

    first_token, complete = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(url + "/")
        for i in range(turns):
            prompt = PROMPTS[i % len(PROMPTS)]
            before = page.locator("article.assistant").count()
            page.fill("#composer-input", prompt)
            started = time.perf_counter()
            page.keyboard.press("Enter")
            if i == 0:
                page.wait_for_url("**/c/*")
            # first streamed text visible in the newest answer
            page.wait_for_function(
                "n => { const a = document.querySelectorAll('article.assistant');"
                " return a.length > n && a[a.length-1].querySelector('.answer-text').innerText.trim().length > 0 }",
                arg=before if i else 0, timeout=120_000, polling="raf",
            )
            first_token.append((time.perf_counter() - started) * 1000)
            page.wait_for_function(
                "!document.querySelector('article[data-status=pending], article[data-status=streaming]')",
                timeout=300_000,
            )
            complete.append((time.perf_counter() - started) * 1000)
            print(f"turn {i + 1}: first token {first_token[-1]:.0f} ms, complete {complete[-1]:.0f} ms",
                  file=sys.stderr)
        browser.close()
    return {
        "benchmark": "browser_ttft", "url": url, "turns": turns,
        "ttft_ms_p50": round(statistics.median(first_token), 1),
        "ttft_ms_min": round(min(first_token), 1), "ttft_ms_max": round(max(first_token), 1),
        "complete_ms_p50": round(statistics.median(complete), 1),
        "note": "includes the first turn's page navigation; A/B turns count when the first of the two answers "
                "shows text",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--quick", action="store_true", help="3 turns instead of 10")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    print(json.dumps(measure(args.url.rstrip("/"), 3 if args.quick else 10, args.chromium)))


if __name__ == "__main__":
    main()
