"""Several servers (replicas) share one database: one that cannot load the
newly active adapter version keeps serving its previous adapter and does not
roll back the others; the version fails only when every live replica failed
to load it. Two replicas here are two adapter registries on the fake engine,
each with its own presence claim, sharing one SQLite database (the app's)."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from safetensors.numpy import save_file
from sqlmodel import select

from server.adapter_watcher import sync_once
from server.adapters import AdapterRegistry
from server.app import create_app
from server.engine.base import AdapterLoadError, AdapterRef
from server.engine.fake import FakeChatEngine
from store.db import session_scope
from store.presence import announce
from store.registry import activate
from store.tables import AdapterVersion
from tests.conftest import make_settings
from tests.support.html import parse

ADMIN = {"Authorization": "Bearer dev-admin-token"}


class RefusingEngine(FakeChatEngine):
    """A replica's engine that cannot load the versions named in ``refuse``
    (its GPU is full, its copy of the folder is unreadable)."""

    def __init__(self, refuse: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.refuse = set(refuse)
        self.attempts: list[str] = []

    async def load_adapter(self, adapter: AdapterRef) -> None:
        self.attempts.append(adapter.name)
        if adapter.name in self.refuse:
            raise AdapterLoadError(f"adapter {adapter.name!r}: CUDA out of memory on this server")
        await super().load_adapter(adapter)


def servable_folder(folder):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}))
    save_file({"a.lora_A.weight": np.zeros((8, 16), dtype=np.float32)}, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.fixture
def fleet(tmp_path):
    """``fleet(*refusals)``: the app's registry is the first replica, one more
    registry per further entry; each entry names the versions it cannot load.
    v1 and v2 exist (servable folders) and v1 is active and served everywhere."""
    app = None

    async def start(*refusals: tuple[str, ...]):
        nonlocal app
        first = RefusingEngine(refusals[0])
        app = create_app(make_settings(tmp_path, adapter_poll_seconds=3600), engine=first)
        db = app.state.db
        replicas = [app.state.adapters] + [AdapterRegistry(RefusingEngine(r), db) for r in refusals[1:]]
        with session_scope(db) as session:
            for v in (1, 2):
                folder = servable_folder(tmp_path / "adapters" / f"v{v}")
                session.add(AdapterVersion(version=v, path=str(folder), status="candidate"))
        with session_scope(db) as session:
            activate(session, 1)
        for replica in replicas:
            await replica.engine.start()
            with session_scope(db) as session:
                announce(session, replica.replica)
            assert await sync_once(replica) is True
        assert [r.active.name for r in replicas] == ["v1"] * len(replicas)
        with session_scope(db) as session:
            activate(session, 2)
        return app, replicas

    yield start
    if app is not None:
        app.state.db.dispose()


async def admin_page(app, path: str) -> str:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        signed_in = await client.post("/admin/login", data={"token": "dev-admin-token", "next": path})
        assert signed_in.status_code == 303, signed_in.text
        response = await client.get(path)
    assert response.status_code == 200, response.text
    return response.text


def statuses(app) -> dict[int, str]:
    with session_scope(app.state.db) as session:
        return {row.version: row.status for row in session.exec(select(AdapterVersion)).all()}


async def admin_get(app, path: str) -> dict:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        response = await client.get(path, headers=ADMIN)
    assert response.status_code == 200, response.text
    return response.json()


async def test_one_replica_failing_keeps_the_version_for_the_others(fleet):
    app, (broken, healthy) = await fleet(("v2",), ())
    assert await sync_once(broken) is False
    assert await sync_once(healthy) is True
    assert await sync_once(broken) is False  # it does not try again while v2 stays active
    assert broken.engine.attempts.count("v2") == 1
    assert (broken.active.name, healthy.active.name) == ("v1", "v2")  # each serves what it can
    assert statuses(app) == {1: "retired", 2: "active"}
    detail = await admin_get(app, "/api/admin/adapters/v2")
    assert detail["status"] == "active" and detail["error"] is None
    [failure] = detail["load_failures"]
    assert failure["server"] == broken.replica and failure["live"] is True
    assert "CUDA out of memory" in failure["error"]
    lineage = await admin_get(app, "/api/admin/adapters/v2/lineage")
    assert lineage["adapter"]["load_failures"] == detail["load_failures"]
    page = parse(await admin_page(app, "/admin/adapters/v2/lineage"))
    assert [row.select_one("code").text() for row in page.select("#load-failures tbody tr")] == [broken.replica]


async def test_every_replica_failing_fails_the_version_and_rolls_back(fleet):
    app, (first, second) = await fleet(("v2",), ("v2",))
    assert await sync_once(first) is False
    assert statuses(app) == {1: "retired", 2: "active"}  # the second may still serve it
    assert await sync_once(second) is False
    assert statuses(app) == {1: "active", 2: "failed"}
    assert [await sync_once(r) for r in (first, second)] == [False, False]  # v1 already serves
    assert (first.active.name, second.active.name) == ("v1", "v1")
    detail = await admin_get(app, "/api/admin/adapters/v2")
    assert detail["status"] == "failed" and "every live server (2)" in detail["error"]
    assert sorted(f["server"] for f in detail["load_failures"]) == sorted([first.replica, second.replica])


async def test_a_single_replica_failing_rolls_back_as_before(fleet):
    app, (alone,) = await fleet(("v2",))
    assert await sync_once(alone) is False
    assert statuses(app) == {1: "active", 2: "failed"}
    assert alone.active.name == "v1" and await sync_once(alone) is False
    detail = await admin_get(app, "/api/admin/adapters/v2")
    assert "CUDA out of memory" in detail["error"] and len(detail["load_failures"]) == 1
