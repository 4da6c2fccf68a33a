"""The chat UI in headless Chromium on the real engine: chat, watch the answer
stream in, stop, regenerate, rate, choose in an A/B turn, and find the rows in
the database."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
from sqlmodel import Session, select

from store.tables import Comparison, Conversation, Feedback, Message
from tests.support.browser import wait_for_js

pytestmark = [pytest.mark.engine, pytest.mark.browser]

CHROMIUM = os.environ.get("TUNELOOP_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
ARTIFACTS = os.environ.get("TUNELOOP_TEST_ARTIFACTS", "test-artifacts")


# Module scope, never session: a running sync_playwright keeps an event loop
# current in this thread, and later modules that start one of their own
# (another sync_playwright, asyncio.run, async tests) would fail.
@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        pytest.fail(f"Chromium not found at {CHROMIUM}: `make test` installs Debian's chromium package")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1100, "height": 850})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, "last-browser-test.png"), full_page=True)
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def db_rows(server, model, *where):
    with Session(server.app.state.db) as session:
        return list(session.exec(select(model).where(*where)).all())


def send(page, text: str) -> None:
    page.fill("#composer-input", text)
    page.keyboard.press("Enter")


def wait_idle(page, timeout: float = 90_000) -> None:
    busy = "document.querySelector('article[data-status=pending], article[data-status=streaming]')"
    wait_for_js(page, f"!{busy}", timeout)


def test_chat_streams_then_rate_and_find_rows(live_server, page):
    server = live_server(default_max_tokens=48)
    page.goto(server.base_url + "/")
    send(page, "Hello! <b>Tell</b> me about the moon.")
    page.wait_for_url("**/c/*")
    answer = page.locator("article.assistant").last
    lengths = set()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and answer.get_attribute("data-status") != "complete":
        # one atomic read: a locator found now may have stopped streaming by the time it is read
        length = page.evaluate("document.querySelector('article.assistant .answer-text.streaming')?.innerText.length")
        if length is not None:
            lengths.add(length)
        time.sleep(0.05)
    assert answer.get_attribute("data-status") == "complete"
    assert len({n for n in lengths if n > 0}) >= 2, f"the answer did not stream in: {lengths}"
    # user text is escaped, not rendered as HTML
    assert page.locator("article.user .user-text").last.inner_text() == "Hello! <b>Tell</b> me about the moon."
    assert page.locator("article.user b").count() == 0

    answer.locator("button.thumb.down").click()
    page.wait_for_selector("article.assistant button.thumb.down[aria-pressed=true]")
    answer = page.locator("article.assistant").last
    answer.locator("input[name=comment]").fill("too short")
    answer.locator("button.save-reason").click()
    page.wait_for_selector("article.assistant .reason summary:has-text('too short')")

    message_id = int(answer.get_attribute("data-message-id"))
    feedback = db_rows(server, Feedback, Feedback.message_id == message_id)
    assert [(f.rating, f.comment) for f in feedback] == [("down", "too short")]
    message = db_rows(server, Message, Message.id == message_id)[0]
    assert message.content.strip() and message.adapter_version is None and message.sampling["seed"] is not None


def test_stop_and_regenerate(live_server, page):
    server = live_server(default_max_tokens=400)
    page.goto(server.base_url + "/")
    send(page, "Write a long story about a dragon.")
    page.wait_for_url("**/c/*")
    wait_for_js(page, "document.querySelector('.answer-text.streaming')?.innerText.length > 10", timeout=90_000)
    page.locator("button.stop").click()
    page.wait_for_selector("article.assistant[data-status=stopped]", timeout=30_000)
    stopped_id = int(page.locator("article.assistant").last.get_attribute("data-message-id"))
    stopped = db_rows(server, Message, Message.id == stopped_id)[0]
    assert stopped.status == "stopped" and stopped.completion_tokens < 400

    page.locator("button.regenerate").click()
    wait_for_js(page, "document.querySelector('.answer-text.streaming')?.innerText.length > 5", timeout=90_000)
    page.locator("button.stop").click()
    wait_idle(page)
    regenerated_id = int(page.locator("article.assistant").last.get_attribute("data-message-id"))
    regenerated = db_rows(server, Message, Message.id == regenerated_id)[0]
    assert regenerated_id != stopped_id and regenerated.parent_id == stopped.parent_id
    assert page.locator(".sibling-count").last.inner_text() == "2/2"


def test_ab_turn_choose_with_keyboard(live_server, page):
    server = live_server(ab_rate=1.0, default_max_tokens=24)
    page.goto(server.base_url + "/")
    send(page, "Give me a name for a cat.")
    page.wait_for_url("**/c/*")
    page.wait_for_selector(".comparison")
    assert page.locator(".comparison article.assistant").count() == 2
    wait_idle(page)
    page.wait_for_selector(".comparison .choice-form button:not([disabled])")
    page.evaluate("document.activeElement && document.activeElement.blur()")
    page.keyboard.press("2")
    page.wait_for_selector(".comparison", state="detached")
    comparison = db_rows(server, Comparison)[0]
    assert comparison.winner == "b"
    conversation = db_rows(server, Conversation, Conversation.id == comparison.conversation_id)[0]
    assert conversation.current_leaf_id == comparison.message_b_id
    shown = int(page.locator("article.assistant").last.get_attribute("data-message-id"))
    assert shown == comparison.message_b_id

    send(page, "And one for a dog?")  # the chosen answer continues the conversation
    page.wait_for_selector(".comparison")
    wait_idle(page)
    second = db_rows(server, Comparison, Comparison.id != comparison.id)[0]
    answer_a = db_rows(server, Message, Message.id == second.message_a_id)[0]
    question = db_rows(server, Message, Message.id == answer_a.parent_id)[0]
    assert question.parent_id == comparison.message_b_id


def test_phone_width_has_no_horizontal_scroll(live_server, browser):
    server = live_server(ab_rate=1.0, default_max_tokens=8)
    context = browser.new_context(viewport={"width": 390, "height": 800}, is_mobile=True)
    page = context.new_page()
    page.goto(server.base_url + "/")
    send(page, "Hi")
    page.wait_for_selector(".comparison")
    wait_idle(page)
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, "phone.png"), full_page=True)
    context.close()
    assert overflow <= 0
