"""A browser A/B turn samples its second answer hotter, so the two differ more
often: two near-identical answers teach nothing (store.pairs.near_identical)."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlmodel import Session, select

from server.answers import AB_CONTRAST
from server.app import create_app
from store.tables import Comparison, Message
from tests.conftest import make_settings
from tests.support.html import parse


def test_the_second_answer_of_a_browser_ab_turn_is_sampled_hotter(tmp_path):
    app = create_app(make_settings(tmp_path, ab_rate=1.0, default_temperature=0.7))
    with TestClient(app) as client:
        token = parse(client.get("/").text).select_one('meta[name="csrf-token"]').get("content")
        assert client.post("/c", data={"content": "hi", "csrf_token": token}, follow_redirects=False).is_redirect
    with Session(app.state.db) as session:
        comparison = session.exec(select(Comparison)).one()
        a, b = (session.get(Message, i) for i in (comparison.message_a_id, comparison.message_b_id))
    # either side may be the hotter one: a coin flip decides what is shown as A
    assert sorted([a.sampling["temperature"], b.sampling["temperature"]]) == [0.7, 0.7 + AB_CONTRAST]
    assert a.sampling["seed"] != b.sampling["seed"]
