"""Dataset export and import (store.exchange.export / datasets_import), the
``tuneloop export|import`` commands and the admin download/upload, on SQLite
and PostgreSQL."""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, col, select

from server.app import create_app
from server.cli import main
from store.conversations import add_message, start_conversation
from store.corrections import record_correction
from store.db import make_engine, session_scope, upgrade
from store.exchange.export import NothingToExport, export_dataset, parse_since
from store.exchange.importing import DatasetImportError, import_dataset
from store.pairs import build_pairs
from store.selection import select_for_run
from store.tables import Comparison, Feedback, ImportBatch, ImportBatchPair, Message, PreferencePair, User
from tests.conftest import make_settings

FORMATS = ("trl", "axolotl", "llamafactory")


@pytest.fixture
def db(database_url):
    upgrade(database_url)
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def seed(engine) -> None:
    """Three pairs (thumbs with a system message and two turns, an A/B choice,
    and one from a user excluded afterwards) plus a tie and a comment on a thumb."""
    with session_scope(engine) as s:
        alice, bob = User(kind="browser", name="alice"), User(kind="api", name="bob")
        s.add_all([alice, bob])
        s.flush()
        chat = start_conversation(s, alice, "web", "maths")
        system = add_message(s, chat, None, "system", "Answer briefly.")
        q1 = add_message(s, chat, system.id, "user", "Hi")
        a1 = add_message(s, chat, q1.id, "assistant", "Hello!", adapter_version="v1")
        q2 = add_message(s, chat, a1.id, "user", "What is 2+2?")
        good = add_message(s, chat, q2.id, "assistant", "4", adapter_version="v2")
        bad = add_message(s, chat, q2.id, "assistant", "5")
        s.add(Feedback(message_id=good.id, user_id=alice.id, rating="up", comment="right", tags=["correct"]))
        s.add(Feedback(message_id=bad.id, user_id=alice.id, rating="down", tags=["wrong", "math"]))
        ab = start_conversation(s, alice, "api", "capital")
        q = add_message(s, ab, None, "user", "Capital of France?")
        a = add_message(s, ab, q.id, "assistant", "Paris.", adapter_version="v2")
        b = add_message(s, ab, q.id, "assistant", "Lyon.", adapter_version="v1")
        s.add(Comparison(user_id=alice.id, conversation_id=ab.id, message_a_id=a.id, message_b_id=b.id, winner="a"))
        s.add(Comparison(user_id=alice.id, conversation_id=ab.id, message_a_id=b.id, message_b_id=a.id, winner="tie"))
        hidden = start_conversation(s, bob, "api", "secret")
        hq = add_message(s, hidden, None, "user", "Secret?")
        h1 = add_message(s, hidden, hq.id, "assistant", "Yes.")
        h2 = add_message(s, hidden, hq.id, "assistant", "No.")
        s.add(Comparison(user_id=bob.id, conversation_id=hidden.id, message_a_id=h1.id, message_b_id=h2.id, winner="b"))
        s.flush()
        report = build_pairs(s, eval_share=0.5)
        bob.excluded_from_training = True  # an admin excludes him after his pair was built
        s.add(bob)
    assert report.added == 3


def pairs_of(engine) -> list[tuple]:
    with Session(engine) as s:
        rows = s.exec(select(PreferencePair).order_by(col(PreferencePair.id))).all()
    return [(r.prompt, r.chosen, r.rejected, r.split, r.content_hash) for r in rows]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def source(tmp_path):
    """A seeded SQLite store (the place exports come from)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'source.db'}")
    upgrade(str(engine.url))
    seed(engine)
    yield engine
    engine.dispose()


# --- export -------------------------------------------------------------------


def test_export_shapes_carry_metadata_and_leave_excluded_pairs_out(db, tmp_path):
    seed(db)
    with Session(db) as s:
        trl = export_dataset(s, "trl", tmp_path / "trl.jsonl")
        axolotl = export_dataset(s, "axolotl", tmp_path / "axo.jsonl")
        factory = export_dataset(s, "llamafactory", tmp_path / "lf.jsonl")
    assert (trl.rows, axolotl.rows, factory.rows) == (2, 2, 2)  # bob is excluded
    choice, thumbs = read_jsonl(trl.path)  # build_pairs takes A/B choices first
    assert thumbs["prompt"] == [
        {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"},
    ]
    assert thumbs["chosen"] == [{"role": "assistant", "content": "4"}]
    assert thumbs["rejected"] == [{"role": "assistant", "content": "5"}]
    assert (thumbs["source"], thumbs["chosen_adapter_version"], thumbs["rejected_adapter_version"]) == (
        "thumbs", "v2", None,
    )
    assert thumbs["split"] in ("train", "eval") and thumbs["created_at"].endswith("+00:00")
    assert (choice["source"], choice["chosen"][0]["content"]) == ("comparison", "Paris.")

    axo = read_jsonl(axolotl.path)[1]
    assert axo["messages"] == thumbs["prompt"]
    assert axo["chosen"] == {"role": "assistant", "content": "4"} and axo["rejected"]["content"] == "5"

    lf = read_jsonl(factory.path)[1]
    assert lf["system"] == "Answer briefly."
    assert [t["from"] for t in lf["conversations"]] == ["human", "gpt", "human"]
    assert lf["chosen"] == {"from": "gpt", "value": "4"} and lf["rejected"] == {"from": "gpt", "value": "5"}
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    assert info["lf"]["file_name"] == "lf.jsonl" and info["lf"]["ranking"] is True
    assert info["lf"]["formatting"] == "sharegpt" and info["lf"]["columns"]["messages"] == "conversations"


def test_export_filters_by_split_and_since(db, tmp_path):
    seed(db)
    with Session(db) as s:
        splits = {r["split"] for r in read_jsonl(export_dataset(s, "trl", tmp_path / "all.jsonl").path)}
        counts = {}
        for split in ("train", "eval"):
            try:
                rows = read_jsonl(export_dataset(s, "trl", tmp_path / f"{split}.jsonl", split=split).path)
            except NothingToExport:  # one side may hold none of the two pairs
                rows = []
            assert {r["split"] for r in rows} <= {split}
            counts[split] = len(rows)
        assert sum(counts.values()) == 2
        with pytest.raises(NothingToExport, match="nothing to export: there are no pairs in split all since 2999"):
            export_dataset(s, "trl", tmp_path / "later.jsonl", since=parse_since("2999-01-01"))
        empty = export_dataset(s, "trl", tmp_path / "later.parquet", "parquet", since=parse_since("2999-01-01"))
        past = export_dataset(s, "trl", tmp_path / "earlier.jsonl", since=parse_since("2000-01-01"))
    assert not (tmp_path / "later.jsonl").exists()
    assert pq.read_table(empty.path).num_rows == 0 and "chosen" in pq.read_table(empty.path).column_names
    assert splits <= {"train", "eval"} and past.rows == 2


def test_feedback_export_has_thumbs_choices_and_corrections(db, tmp_path):
    seed(db)
    with session_scope(db) as s:
        alice = s.exec(select(User).where(User.name == "alice")).one()
        five = s.exec(select(Message).where(Message.content == "5")).one()
        record_correction(s, alice, five.id, "2 + 2 = 4.", max_chars=8000, eval_share=0.5)
    with Session(db) as s:
        jsonl = export_dataset(s, "feedback", tmp_path / "fb.jsonl")
        parquet = export_dataset(s, "feedback", tmp_path / "fb.parquet", file_format="parquet")
    rows = read_jsonl(jsonl.path)
    assert pq.read_table(parquet.path).to_pylist() == rows
    thumbs = [r for r in rows if r["kind"] == "thumb"]
    choices = [r for r in rows if r["kind"] == "comparison"]
    assert len(thumbs) == 2 and len(choices) == 3  # the tie is a decided choice too
    up = next(r for r in thumbs if r["rating"] == "up")
    assert (up["answer"], up["comment"], up["tags"], up["adapter_version"]) == ("4", "right", ["correct"], "v2")
    assert up["prompt"][-1] == {"role": "user", "content": "What is 2+2?"} and up["message_id"] is not None
    assert {c["winner"] for c in choices} == {"a", "b", "tie"}
    assert [c["excluded_from_training"] for c in choices if c["winner"] == "b"] == [True]
    (correction,) = [r for r in rows if r["kind"] == "correction"]
    assert (correction["answer"], correction["correction"], correction["excluded_from_training"]) == (
        "5", "2 + 2 = 4.", False)
    assert correction["prompt"][-1] == {"role": "user", "content": "What is 2+2?"}
    assert all(r["correction"] is None for r in rows if r["kind"] != "correction")


def test_pairs_llamafactory_cannot_hold_are_skipped_and_counted(db, tmp_path):
    with session_scope(db) as s:
        s.add(PreferencePair(
            prompt=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], chosen="x", rejected="y",
            source="import", split="train", content_hash="f" * 64,
        ))
    with Session(db) as s:
        factory = export_dataset(s, "llamafactory", tmp_path / "lf.parquet", "parquet")
        with pytest.raises(NothingToExport, match="cannot hold any of the 1 pairs.*alternating"):
            export_dataset(s, "llamafactory", tmp_path / "lf.jsonl")
        trl = export_dataset(s, "trl", tmp_path / "trl.jsonl")
    assert (factory.rows, factory.skipped, trl.rows) == (0, 1, 1)
    assert "alternating" in factory.skipped_reasons[0]


# --- import -------------------------------------------------------------------


@pytest.mark.parametrize("file_format", ["jsonl", "parquet"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_into_a_fresh_store_then_reimport_adds_nothing(db, source, tmp_path, fmt, file_format):
    path = tmp_path / f"export.{file_format}"
    with Session(source) as s:
        export_dataset(s, fmt, path, file_format)
    with session_scope(db) as s:
        report = import_dataset(s, path, eval_share=0.5)
    assert (report.format, report.rows, report.added, report.duplicates) == (fmt, 2, 2, 0)
    exported = {p[4]: p for p in pairs_of(source)}
    imported = pairs_of(db)
    # same content, same hash, same split: the lineage-neutral identity of a pair
    assert all(exported[p[4]] == p for p in imported) and len(imported) == 2
    with Session(db) as s:
        rows = s.exec(select(PreferencePair)).all()
        batch = s.exec(select(ImportBatch)).one()
        links = s.exec(select(ImportBatchPair)).all()
    assert {r.source for r in rows} == {"import"} and {r.user_id for r in rows} == {None}
    assert (batch.filename, batch.format, batch.rows, batch.added) == (path.name, fmt, 2, 2)
    assert {link.pair_id for link in links} == {r.id for r in rows} and {link.batch_id for link in links} == {batch.id}

    with session_scope(db) as s:
        again = import_dataset(s, path, eval_share=0.5)
    assert (again.added, again.duplicates, again.batch_id) == (0, 2, None)
    with Session(db) as s:
        assert len(s.exec(select(PreferencePair)).all()) == 2 and len(s.exec(select(ImportBatch)).all()) == 1


def test_reimporting_an_export_into_its_own_store_adds_nothing(db, tmp_path):
    seed(db)
    before = pairs_of(db)
    with Session(db) as s:
        export_dataset(s, "axolotl", tmp_path / "own.jsonl")
    with session_scope(db) as s:
        report = import_dataset(s, tmp_path / "own.jsonl", eval_share=0.5)
    assert (report.added, report.duplicates) == (0, 2) and pairs_of(db) == before


def test_close_relatives_import_too(db, tmp_path):
    records = [
        # TRL implicit prompt (trl-lib/ultrafeedback_binarized)
        {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
         "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Bye"}]},
        # TRL with a plain-text prompt and answers
        {"prompt": "Name a colour", "chosen": "Blue", "rejected": "Table"},
    ]
    intel = [{"system": "Be nice.", "question": "2+2?", "chosen": "4", "rejected": "22"}]
    (tmp_path / "trl.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (tmp_path / "intel.json").write_text(json.dumps(intel))
    with session_scope(db) as s:
        assert import_dataset(s, tmp_path / "trl.jsonl", 0.1).added == 2
        assert import_dataset(s, tmp_path / "intel.json", 0.1).format == "axolotl"
    prompts = [p[0] for p in pairs_of(db)]
    assert prompts == [
        [{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Name a colour"}],
        [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "2+2?"}],
    ]


GOOD = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello"}],
        "rejected": [{"role": "assistant", "content": "Go away"}]}

BAD_RECORDS = [
    ({**GOOD, "chosen": []}, 'line 4: "chosen" must be a non-empty list of messages'),
    ({**GOOD, "chosen": [{"role": "assistant", "content": "   "}]}, 'line 4: "chosen" must not be an empty answer'),
    ({**GOOD, "rejected": GOOD["chosen"]}, 'line 4: "rejected" is the same answer as "chosen"'),
    ({**GOOD, "prompt": [{"role": "robot", "content": "x"}]}, 'line 4: "prompt[0].role" must be one of'),
    ({**GOOD, "prompt": [{"role": "user", "content": 5}]}, 'line 4: "prompt[0].content" must be a string'),
    ({**GOOD, "prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     'line 4: "prompt" must end with a user message'),
    ({**GOOD, "prompt": []}, 'line 4: "prompt" must hold at least one message'),
    ({k: v for k, v in GOOD.items() if k != "rejected"}, 'line 4: "rejected" is missing'),
    ({**GOOD, "chosen": [{"role": "user", "content": "me"}]}, 'line 4: "chosen[0]" must be an assistant message'),
    ('{"prompt": "Hi", ', "line 4: not valid JSON"),
    ([1, 2], 'line 4: "record" must be a JSON object'),
]


def test_every_validation_error_names_line_and_field_and_imports_nothing(db, tmp_path):
    seed(db)
    before = pairs_of(db)
    for bad, expected in BAD_RECORDS:
        path = tmp_path / "bad.jsonl"
        other = {**GOOD, "chosen": [{"role": "assistant", "content": "Hey there"}]}
        line = bad if isinstance(bad, str) else json.dumps(bad)  # a string is written as is
        path.write_text(f"{json.dumps(GOOD)}\n\n{json.dumps(other)}\n{line}\n")
        with session_scope(db) as s, pytest.raises(DatasetImportError) as caught:
            import_dataset(s, path, eval_share=0.1)
        assert expected in str(caught.value), (expected, str(caught.value))
        assert str(caught.value).endswith("nothing was imported")
        assert pairs_of(db) == before
        with Session(db) as s:
            assert s.exec(select(ImportBatch)).all() == []


def test_parquet_errors_name_the_row_and_formats_are_detected_or_refused(db, tmp_path):
    import pyarrow as pa

    rows = [{"conversations": [{"from": "human", "value": "Hi"}], "chosen": {"from": "gpt", "value": "Yo"},
             "rejected": {"from": "gpt", "value": "Yo"}}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "lf.parquet")
    (tmp_path / "feedback.jsonl").write_text(json.dumps({"kind": "thumb", "rating": "up", "answer": "x"}) + "\n")
    (tmp_path / "odd.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    (tmp_path / "empty.jsonl").write_text("\n")
    cases = [
        ("lf.parquet", 'row 1: "rejected" is the same answer as "chosen"'),
        ("feedback.jsonl", "raw feedback export"),
        ("odd.jsonl", "cannot tell the format from the columns ['text']"),
        ("empty.jsonl", "holds no records"),
    ]
    for name, expected in cases:
        with session_scope(db) as s, pytest.raises(DatasetImportError, match=re.escape(expected)):
            import_dataset(s, tmp_path / name, eval_share=0.1)
    assert pairs_of(db) == []


def test_imported_pairs_are_selected_and_not_held_back_by_the_user_cap(db, tmp_path):
    seed(db)
    records = [
        {"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": f"No idea about {i}."} for i in range(6)
    ]
    (tmp_path / "seed.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    with session_scope(db) as s:
        report = import_dataset(s, tmp_path / "seed.jsonl", eval_share=0.0)
    assert report.added_by_split == {"train": 6, "eval": 0}
    with Session(db) as s:
        selection = select_for_run(s, max_pairs_per_user=1, replay_fraction=0.0)
    imported = [p for p in selection.new if p.source == "import"]
    assert len(imported) == 6
    assert len([p for p in selection.new if p.user_id is not None]) <= 1  # alice is still capped


# --- CLI ----------------------------------------------------------------------


@pytest.fixture
def cli_env(monkeypatch, tmp_path, db):
    monkeypatch.setenv("TUNELOOP_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TUNELOOP_DATABASE_URL", str(db.url.render_as_string(hide_password=False)))
    return db


def test_cli_export_and_import_exit_codes(cli_env, tmp_path, capsys):
    seed(cli_env)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["export", "--format", "llamafactory", "--output", str(out / "lf.parquet")]) == 0
    assert "exported 2 pairs" in capsys.readouterr().out
    assert pq.read_table(out / "lf.parquet").num_rows == 2 and (out / "dataset_info.json").is_file()
    assert main(["export", "--format", "trl", "--split", "train", "--output", str(out)]) == 0
    written = [p for p in out.iterdir() if p.name.startswith("tuneloop-trl-train-")]
    assert len(written) == 1 and written[0].suffix == ".jsonl"
    assert main(["export", "--format", "feedback"]) == 0
    assert list((tmp_path / "data" / "exports").glob("tuneloop-feedback-*.jsonl"))
    capsys.readouterr()

    assert main(["import", str(out / "lf.parquet")]) == 0
    assert "imported 0 new pairs" in capsys.readouterr().out
    fresh = tmp_path / "fresh.jsonl"
    fresh.write_text(json.dumps({"prompt": "Hi", "chosen": "Hello", "rejected": "Bye"}) + "\n")
    assert main(["import", "--dry-run", str(fresh)]) == 0
    assert "would import 1 new pairs" in capsys.readouterr().out
    assert main(["import", "--format", "trl", str(fresh)]) == 0
    assert "imported 1 new pairs" in capsys.readouterr().out

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Hi", "chosen": [], "rejected": "Bye"}) + "\n")
    failures = [
        (["import", str(bad)], 'bad.jsonl: line 1: "chosen" must be a non-empty list of messages'),
        (["import", str(tmp_path / "missing.jsonl")], "does not exist"),
        (["import", "--format", "axolotl", str(fresh)], '"messages" is missing'),
        (["export", "--format", "trl", "--since", "last week"], "is not an ISO date"),
    ]
    for argv, says in failures:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as usage:
        main(["export"])  # --format is required
    assert usage.value.code == 2


# --- admin HTTP -----------------------------------------------------------------


def test_admin_download_and_upload(tmp_path):
    settings = make_settings(tmp_path)
    app = create_app(settings)
    seed(app.state.db)
    auth = {"Authorization": f"Bearer {settings.admin_token}"}
    with TestClient(app) as client:
        assert client.get("/api/admin/export?format=trl").status_code == 401
        response = client.get("/api/admin/export?format=trl&file_format=jsonl&split=all", headers=auth)
        assert response.status_code == 200 and response.headers["x-tuneloop-rows"] == "2"
        assert 'filename="tuneloop-trl-all-' in response.headers["content-disposition"]
        lines = [json.loads(x) for x in response.text.splitlines()]
        assert [x["chosen"][0]["content"] for x in lines] == ["Paris.", "4"]

        parquet = client.get("/api/admin/export?format=axolotl&file_format=parquet", headers=auth)
        assert pq.read_table(io.BytesIO(parquet.content)).num_rows == 2

        bundle = client.get("/api/admin/export?format=llamafactory", headers=auth)
        assert bundle.headers["content-type"] == "application/zip"
        with zipfile.ZipFile(io.BytesIO(bundle.content)) as z:
            names = z.namelist()
            info = json.loads(z.read("dataset_info.json"))
        data_name = next(n for n in names if n.endswith(".jsonl"))
        assert next(iter(info.values()))["file_name"] == data_name

        assert client.get("/api/admin/export?format=csv", headers=auth).status_code == 422
        assert client.get("/api/admin/export?since=soon", headers=auth).status_code == 400

        files = {"file": ("seed.jsonl", b'{"prompt": "Hi", "chosen": "Hello", "rejected": "Bye"}\n')}
        assert client.post("/api/admin/import", files=files).status_code == 401
        first = client.post("/api/admin/import", files=files, headers=auth)
        assert first.status_code == 200 and first.json()["added"] == 1 and first.json()["batch_id"]
        assert client.post("/api/admin/import", files=files, headers=auth).json()["added"] == 0

        body = b'{"prompt": "Hi", "chosen": "Hello", "rejected": "Bye"}\n{"prompt": "x"}\n'
        broken = {"file": ("broken.jsonl", body)}
        refused = client.post("/api/admin/import", files=broken, headers=auth)
        assert refused.status_code == 400
        assert refused.json()["error"]["errors"] == ['line 2: "chosen" is missing']
    with Session(app.state.db) as s:
        assert len(s.exec(select(PreferencePair).where(PreferencePair.source == "import")).all()) == 1
