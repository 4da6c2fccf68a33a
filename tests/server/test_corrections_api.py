"""Corrections and "try again" over HTTP on the fake engine: the JSON API
(``POST /api/messages/{id}/correction``, ``POST /api/messages/{id}/retry``)
with its 4xx answers, the pages without JavaScript (form posts, then the
redirect), the feedback rate limit, and the admin pairs page."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, col, select

from server.app import create_app
from server.identity import create_api_key
from store.db import session_scope
from store.tables import Comparison, Conversation, Correction, Message, PreferencePair
from tests.conftest import make_settings
from tests.support.html import parse

MAX_CHARS = 100


@pytest.fixture
def app(tmp_path):
    return create_app(make_settings(tmp_path, max_message_chars=MAX_CHARS))


@pytest.fixture
def client(app):
    with TestClient(app) as client:
        yield client


def new_key(app, name: str) -> dict[str, str]:
    with session_scope(app.state.db) as session:
        _, key = create_api_key(session, name)
    return {"Authorization": f"Bearer {key}"}


def answer(client, headers, messages=None) -> int:
    body = {"messages": messages or [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 4}
    response = client.post("/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 200, response.text
    return int(response.headers["X-Tuneloop-Message-Id"])


def rows(app, model, *where):
    with Session(app.state.db) as session:
        return list(session.exec(select(model).where(*where).order_by(col(model.id))).all())


def correct(client, headers, message_id: int, text):
    return client.post(f"/api/messages/{message_id}/correction", json={"text": text}, headers=headers)


def test_a_correction_makes_a_pair_and_a_later_one_replaces_it(app, client):
    alice = new_key(app, "alice")
    message_id = answer(client, alice)
    first = correct(client, alice, message_id, "It is 4.")
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["message_id"] == message_id and body["text"] == "It is 4." and body["pair_id"] is not None
    (pair,) = rows(app, PreferencePair)
    model = rows(app, Message, Message.id == message_id)[0].content
    assert (pair.id, pair.source, pair.chosen, pair.rejected) == (body["pair_id"], "correction", "It is 4.", model)
    assert pair.prompt == [{"role": "user", "content": "What is 2+2?"}] and pair.rejected_message_id == message_id

    second = correct(client, alice, message_id, "Four.")
    assert second.status_code == 200
    assert [(p.source, p.chosen) for p in rows(app, PreferencePair)] == [("correction", "Four.")]
    assert [c.content for c in rows(app, Correction)] == ["Four."]
    shown = client.get(f"/api/messages/{message_id}", headers=alice).json()
    assert shown["correction"]["text"] == "Four."


@pytest.mark.parametrize(("text", "status", "says"), [
    ("", 400, "the correction is empty; write the answer you wanted"),
    (" \n\t ", 400, "the correction is empty"),
    ("x" * (MAX_CHARS + 1), 400, f"the limit is {MAX_CHARS} (TUNELOOP_MAX_MESSAGE_CHARS)"),
    ("COPY", 400, "the model's answer unchanged"),
    (None, 422, "text"),
])
def test_a_correction_that_is_not_an_answer_gets_a_4xx_naming_why(app, client, text, status, says):
    alice = new_key(app, "alice")
    message_id = answer(client, alice)
    if text == "COPY":  # the model's answer with its whitespace changed
        text = "  " + "\n".join(rows(app, Message, Message.id == message_id)[0].content.split()) + " "
    response = client.post(f"/api/messages/{message_id}/correction",
                           json={} if text is None else {"text": text}, headers=alice)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert says in error["message"] and error["code"] == status
    if status == 400:
        assert error["param"] == "text"
    assert rows(app, Correction) == [] and rows(app, PreferencePair) == []


def test_only_your_own_finished_model_answers_can_be_corrected(app, client):
    alice, bob = new_key(app, "alice"), new_key(app, "bob")
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "I wrote this"},
               {"role": "user", "content": "2+2?"}]
    message_id = answer(client, alice, history)
    written = rows(app, Message, Message.caller_written == True)[0]  # noqa: E712
    question = rows(app, Message, Message.id == rows(app, Message, Message.id == message_id)[0].parent_id)[0]
    cases = {
        "someone else's": (bob, message_id, 404, f"message {message_id} not found"),
        "missing": (alice, 10**9, 404, "not found"),
        "a question": (alice, question.id, 400, "only answers can be corrected"),
        "caller-written": (alice, written.id, 400, "caller sent as history"),
    }
    for name, (headers, target, status, says) in cases.items():
        response = correct(client, headers, target, "Four.")
        assert response.status_code == status, (name, response.text)
        assert says in response.json()["error"]["message"], name
    with session_scope(app.state.db) as session:
        session.get(Message, message_id).status = "streaming"
    unfinished = correct(client, alice, message_id, "Four.")
    assert unfinished.status_code == 409 and "still being generated" in unfinished.json()["error"]["message"]
    assert rows(app, Correction) == []


def test_corrections_count_against_the_feedback_rate_limit(tmp_path):
    app = create_app(make_settings(tmp_path, rate_limits=True, rate_limit_feedback="2/minute"))
    with TestClient(app) as client:
        alice = new_key(app, "alice")
        message_id = answer(client, alice)
        assert client.post(f"/api/messages/{message_id}/feedback", json={"rating": "down"},
                           headers=alice).status_code == 200
        assert correct(client, alice, message_id, "Four.").status_code == 200
        refused = correct(client, alice, message_id, "It is 4.")
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        assert "too many feedback requests" in refused.json()["error"]["message"]
    assert [c.content for c in rows(app, Correction)] == ["Four."]


def test_retry_answers_again_and_the_choice_makes_a_same_context_pair(app, client):
    alice, bob = new_key(app, "alice"), new_key(app, "bob")
    message_id = answer(client, alice)
    assert client.post(f"/api/messages/{message_id}/retry", headers=bob).status_code == 404
    made = client.post(f"/api/messages/{message_id}/retry", headers=alice)
    assert made.status_code == 200, made.text
    body = made.json()
    assert body["a"]["message_id"] == message_id and body["b"]["content"]
    again = client.post(f"/api/messages/{message_id}/retry", headers=alice)
    assert again.status_code == 409 and "already in a comparison" in again.json()["error"]["message"]

    chosen = client.post(f"/api/comparisons/{body['id']}/choice", json={"winner": "b"}, headers=alice)
    assert chosen.status_code == 200
    (comparison,) = rows(app, Comparison)
    new = rows(app, Message, Message.id == body["b"]["message_id"])[0]
    old = rows(app, Message, Message.id == message_id)[0]
    assert (comparison.message_a_id, comparison.message_b_id, comparison.winner) == (old.id, new.id, "b")
    assert new.parent_id == old.parent_id
    pairs = rows(app, PreferencePair)
    if new.content.strip() != old.content.strip():  # the fake engine may say the same twice
        assert [(p.source, p.chosen_message_id, p.rejected_message_id) for p in pairs] == [
            ("comparison", new.id, old.id)
        ]


def test_retry_is_refused_once_the_conversation_went_on(app, client):
    alice = new_key(app, "alice")
    first = answer(client, alice)
    with session_scope(app.state.db) as session:
        message = session.get(Message, first)
        session.add(Message(conversation_id=message.conversation_id, parent_id=first, role="user", content="ok"))
    refused = client.post(f"/api/messages/{first}/retry", headers=alice)
    assert refused.status_code == 409 and "only the latest answer" in refused.json()["error"]["message"]


# --- pages, without JavaScript -------------------------------------------------------


def csrf(client) -> str:
    return parse(client.get("/").text).select_one('meta[name="csrf-token"]').get("content")


def browser_answer(app, client) -> tuple[str, int, int]:
    """A chat turn posted as a form (no JavaScript): the csrf token, the conversation and its answer."""
    token = csrf(client)
    posted = client.post("/c", data={"csrf_token": token, "content": "What is 2+2?"}, follow_redirects=False)
    assert posted.status_code == 303
    conversation_id = int(re.search(r"/c/(\d+)", posted.headers["location"]).group(1))
    (answer_row,) = rows(app, Message, Message.role == "assistant", Message.conversation_id == conversation_id)
    return token, conversation_id, answer_row.id


def test_without_javascript_a_thumbs_down_offers_try_again_then_the_choice(app, client):
    token, conversation_id, message_id = browser_answer(app, client)
    page = parse(client.get(f"/c/{conversation_id}").text)
    assert page.select(f"#message-{message_id} .retry-form") == []  # only after a thumbs-down
    client.post(f"/answers/{message_id}/feedback", data={"csrf_token": token, "rating": "down"})
    page = parse(client.get(f"/c/{conversation_id}").text)
    assert page.select_one(f"#message-{message_id} form.retry-form").get("action") == f"/answers/{message_id}/retry"
    assert page.select_one(f"#message-{message_id} form.correction-form textarea[name=content]") is not None

    retried = client.post(f"/answers/{message_id}/retry", data={"csrf_token": token}, follow_redirects=False)
    assert retried.status_code == 303 and retried.headers["location"] == f"/c/{conversation_id}"
    page = parse(client.get(f"/c/{conversation_id}").text)
    section = page.select_one("section.comparison.retry")
    assert "the first or the new one" in section.select_one(".comparison-prompt").text()
    sides = [int(a.get("data-message-id")) for a in section.select("article.assistant")]
    assert sides[0] == message_id and len(sides) == 2
    assert section.select_one("article[data-status=complete]") is not None
    comparison_id = int(section.get("data-comparison-id"))

    chosen = client.post(f"/comparisons/{comparison_id}/choice", data={"csrf_token": token, "winner": "b"},
                         follow_redirects=False)
    assert chosen.status_code == 303
    assert rows(app, Comparison)[0].winner == "b"
    assert rows(app, Conversation)[0].current_leaf_id == sides[1]


def test_htmx_try_again_answers_with_the_comparison_fragment(app, client):
    token, _, message_id = browser_answer(app, client)
    htmx = {"HX-Request": "true", "X-CSRF-Token": token}
    rated = client.post(f"/answers/{message_id}/feedback", data={"rating": "down"}, headers=htmx)
    fragment = parse(rated.text)
    assert fragment.select_one(f"#feedback-{message_id} .retry-form button.retry") is not None
    swapped = client.post(f"/answers/{message_id}/retry", headers=htmx)
    assert swapped.status_code == 200
    section = parse(swapped.text).select_one("section.comparison.retry")
    assert section.select_one("article[data-status=pending]").get("sse-connect").startswith("/answers/")
    assert [b.get("value") for b in section.select(".choice-form button")] == ["a", "b", "tie", "both_bad"]


def test_without_javascript_a_correction_is_saved_and_shown(app, client):
    token, conversation_id, message_id = browser_answer(app, client)
    client.post(f"/answers/{message_id}/feedback", data={"csrf_token": token, "rating": "down"})
    saved = client.post(f"/answers/{message_id}/correction", data={"csrf_token": token, "content": "It is 4."},
                        follow_redirects=False)
    assert saved.status_code == 303 and saved.headers["location"] == f"/c/{conversation_id}#message-{message_id}"
    page = parse(client.get(f"/c/{conversation_id}").text)
    assert page.select_one(f"#message-{message_id} .correction-form textarea").text() == "It is 4."
    assert page.select_one(f"#message-{message_id} .correction-saved") is not None
    assert [(p.source, p.chosen) for p in rows(app, PreferencePair)] == [("correction", "It is 4.")]
    empty = client.post(f"/answers/{message_id}/correction", data={"csrf_token": token, "content": "  "},
                        headers={"Accept": "text/html"})
    assert empty.status_code == 400 and "the correction is empty" in parse(empty.text).select_one(".error").text()


# --- the dashboard ------------------------------------------------------------------


def test_admins_see_filter_and_exclude_correction_pairs(app, client):
    alice = new_key(app, "alice")
    message_id = answer(client, alice)
    pair_id = correct(client, alice, message_id, "It is 4.").json()["pair_id"]
    assert client.post("/admin/login", data={"token": "dev-admin-token", "next": "/admin"},
                       follow_redirects=False).status_code == 303
    page = parse(client.get("/admin/pairs").text)
    assert "correction" in [o.get("value") for o in page.select("select[name=source] option")]
    only = parse(client.get("/admin/pairs?source=correction").text)
    (row,) = only.select("#pairs-table tbody tr")
    assert row.get("data-source") == "correction" and row.get("data-excluded") == "false"
    assert f"correction of answer #{message_id}" in row.select_one(".sources").text()
    assert row.select_one(".chosen").text() == "It is 4."
    assert parse(client.get("/admin/feedback").text).select_one("#card-corrections .big").text() == "1"
    conversation_id = rows(app, Message, Message.id == message_id)[0].conversation_id
    transcript = parse(client.get(f"/admin/conversations/{conversation_id}").text)
    assert transcript.select_one(f"#m{message_id} .correction-text").text() == "It is 4."

    token = only.select_one("meta[name=csrf-token]").get("content")
    form = {k.get("name"): k.get("value") for k in row.select("form input[type=hidden]")}
    assert form["kind"] == "pair" and form["id"] == str(pair_id) and form["csrf_token"] == token
    excluded = client.post("/admin/exclusions", data=form, follow_redirects=False)
    assert excluded.status_code == 303 and excluded.headers["location"].startswith("/admin/pairs?")
    after = parse(client.get(excluded.headers["location"]).text)
    assert after.select_one("#pairs-table tbody tr").get("data-excluded") == "true"
    assert "excluded from training" in after.select_one(".notice").text()
    assert rows(app, PreferencePair)[0].excluded_from_training
