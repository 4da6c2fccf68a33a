"""After a thumbs-down, in headless Chromium (fake engine, streaming slowly
enough to be seen): "Try again" streams a new answer beside the disliked one
and one click picks the better (the comparison decided, its pair built); and
"Correct it" turns the answer into the one the user wanted (a pair with source
``correction``). Screenshots go to ``$TUNELOOP_TEST_ARTIFACTS``."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from sqlmodel import Session, select

from server.engine.fake import FakeChatEngine
from store.tables import Comparison, Conversation, Correction, Message, PreferencePair
from tests.conftest import make_settings
from tests.server.test_chat_ui import browser, send, wait_idle  # noqa: F401 - the browser fixture
from tests.support.live import LiveServer, start_live_server

pytestmark = [pytest.mark.browser]

ARTIFACTS = os.environ.get("TUNELOOP_TEST_ARTIFACTS", "test-artifacts")


@pytest.fixture
def server(tmp_path, engine_loop) -> Iterator[LiveServer]:
    engine = FakeChatEngine(delay=0.03)
    engine_loop.run(engine.start())
    live = start_live_server(make_settings(tmp_path, default_max_tokens=12), engine, engine_loop)
    yield live
    live.stop()


@pytest.fixture
def page(browser):  # noqa: F811 - the fixture imported above
    context = browser.new_context(viewport={"width": 1100, "height": 850})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def rows(server: LiveServer, model, *where):
    with Session(server.app.state.db) as session:
        return list(session.exec(select(model).where(*where)).all())


def shoot(page, name: str) -> None:
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, f"{name}.png"), full_page=True)


def disliked_answer(server: LiveServer, page) -> int:
    """Chat once, wait for the answer, rate it down; its message id."""
    page.goto(server.base_url + "/")
    send(page, "What is 2+2?")
    page.wait_for_url("**/c/*")
    wait_idle(page)
    answer = page.locator("article.assistant").last
    answer.locator("button.thumb.down").click()
    page.wait_for_selector("article.assistant button.thumb.down[aria-pressed=true]")
    return int(answer.get_attribute("data-message-id"))


def test_thumbs_down_try_again_then_pick_the_better_answer(server, page):
    disliked = disliked_answer(server, page)
    page.locator(f"#message-{disliked} button.retry").click()
    section = page.locator("section.comparison.retry")
    section.wait_for()
    assert "the first or the new one" in section.locator(".comparison-prompt").inner_text()
    assert int(section.locator("[data-side=a] article").get_attribute("data-message-id")) == disliked
    wait_idle(page)
    page.wait_for_selector(".comparison .choice-form button:not([disabled])")
    shoot(page, "try-again-comparison")
    page.set_viewport_size({"width": 390, "height": 800})
    assert page.evaluate("document.documentElement.scrollWidth - window.innerWidth") <= 0
    shoot(page, "try-again-comparison-phone")
    page.set_viewport_size({"width": 1100, "height": 850})
    section.locator("button[value=b]").click()
    page.wait_for_selector(".comparison", state="detached")

    (comparison,) = rows(server, Comparison)
    assert (comparison.message_a_id, comparison.winner) == (disliked, "b")
    new = rows(server, Message, Message.id == comparison.message_b_id)[0]
    old = rows(server, Message, Message.id == disliked)[0]
    assert new.parent_id == old.parent_id and new.status == "complete"
    assert int(page.locator("article.assistant").last.get_attribute("data-message-id")) == new.id
    assert rows(server, Conversation)[0].current_leaf_id == new.id
    (pair,) = rows(server, PreferencePair)
    assert (pair.source, pair.comparison_id, pair.chosen, pair.rejected) == (
        "comparison", comparison.id, new.content, old.content
    )


def test_correct_a_disliked_answer_into_the_one_wanted(server, page):
    disliked = disliked_answer(server, page)
    answer = page.locator(f"#message-{disliked}")
    answer.locator("details.correct-answer summary").click()
    box = answer.locator(".correction-form textarea")
    assert box.input_value() == rows(server, Message, Message.id == disliked)[0].content
    box.fill("2 + 2 = 4.")
    shoot(page, "correction-form")
    page.set_viewport_size({"width": 390, "height": 800})
    assert page.evaluate("document.documentElement.scrollWidth - window.innerWidth") <= 0
    shoot(page, "correction-form-phone")
    page.set_viewport_size({"width": 1100, "height": 850})
    answer.locator("button.save-correction").click()
    page.wait_for_selector(f"#message-{disliked} .correction-saved")
    assert page.locator(f"#message-{disliked} details.correct-answer summary").inner_text() == "✎ Your correction"

    (correction,) = rows(server, Correction)
    assert (correction.message_id, correction.content) == (disliked, "2 + 2 = 4.")
    (pair,) = rows(server, PreferencePair)
    assert (pair.source, pair.chosen, pair.rejected_message_id) == ("correction", "2 + 2 = 4.", disliked)
    assert pair.prompt == [{"role": "user", "content": "What is 2+2?"}]

    answer.locator("details.correct-answer summary").click()
    answer.locator(".correction-form textarea").fill("  ")
    page.evaluate("document.querySelector('.correction-form textarea').removeAttribute('required')")
    answer.locator("button.save-correction").click()
    page.wait_for_selector("#error-bar:not([hidden])")
    assert "the correction is empty" in page.locator("#error-bar").inner_text()
    assert [p.chosen for p in rows(server, PreferencePair)] == ["2 + 2 = 4."]
