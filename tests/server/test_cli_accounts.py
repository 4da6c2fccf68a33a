"""``tuneloop users`` and ``tuneloop exclude``: accounts and exclusions from the
command line (passwords from standard input when it is not a terminal)."""

from __future__ import annotations

import io

import pytest
from sqlmodel import select

from server.cli import main
from store.accounts import authenticate
from store.db import make_engine, session_scope, upgrade
from store.tables import AdapterVersion, PreferencePair, TrainingRun, TrainingRunPair, User


@pytest.fixture
def db(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELOOP_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("TUNELOOP_DATABASE_URL", raising=False)
    url = f"sqlite:///{tmp_path / 'data' / 'tuneloop.db'}"
    (tmp_path / "data").mkdir()
    upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


def _run(argv, monkeypatch, stdin: str = ""):
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    return main(argv)


def test_users_are_created_listed_approved_and_disabled(db, monkeypatch, capsys):
    assert _run(["users", "create", "root", "--admin"], monkeypatch, "a long password\n") == 0
    assert _run(["users", "create", "bob"], monkeypatch, "bobs password\n") == 0
    assert "created user account bob" in capsys.readouterr().out
    assert _run(["users", "create", "bob"], monkeypatch, "bobs password\n") == 1
    assert _run(["users", "create", "carol"], monkeypatch, "short\n") == 1
    err = capsys.readouterr().err
    assert "taken" in err and "8 to 256 characters" in err
    assert _run(["users", "disable", "bob"], monkeypatch) == 0
    assert _run(["users", "disable", "root"], monkeypatch) == 1  # the last admin
    assert "last active admin" in capsys.readouterr().err
    assert _run(["users", "list"], monkeypatch) == 0
    listing = capsys.readouterr().out
    assert "root" in listing and "admin" in listing and "disabled" in listing
    with session_scope(db) as s:
        assert authenticate(s, "root", "a long password").role == "admin"
    assert _run(["users", "approve", "bob"], monkeypatch) == 0
    with session_scope(db) as s:
        assert authenticate(s, "bob", "bobs password").status == "active"
    assert _run(["users", "approve", "nobody"], monkeypatch) == 1
    assert "no account 'nobody'" in capsys.readouterr().err


def test_excluding_a_user_says_which_adapters_their_feedback_reached(db, monkeypatch, capsys):
    with session_scope(db) as s:
        user = User(kind="api", name="client")
        s.add(user)
        s.flush()
        pair = PreferencePair(prompt=[{"role": "user", "content": "q"}], chosen="a", rejected="b",
                              source="thumbs", split="train", content_hash="1" * 64, user_id=user.id)
        run = TrainingRun(status="promoted")
        s.add_all([pair, run])
        s.flush()
        s.add(TrainingRunPair(run_id=run.id, pair_id=pair.id, role="new"))
        s.add(AdapterVersion(version=3, path="/x/v3", status="active", training_run_id=run.id))
        user_id, pair_id = user.id, pair.id
    assert _run(["exclude", "user", str(user_id)], monkeypatch) == 0
    out = capsys.readouterr().out
    assert "excluded from training" in out and "already reached v3" in out
    assert _run(["exclude", "pair", str(pair_id), "--undo"], monkeypatch) == 0
    assert _run(["exclude", "conversation", "999"], monkeypatch) == 1
    assert "there is no conversation 999" in capsys.readouterr().err
    with session_scope(db) as s:
        assert s.get(User, user_id).excluded_from_training
        assert not s.exec(select(PreferencePair)).one().excluded_from_training
