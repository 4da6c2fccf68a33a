"""Feedback ingestion into SQLite: thumbs and A/B choices under concurrency.

No generation is involved, so the server runs the *fake* engine
(``TUNELOOP_ENGINE=fake``); the database is the default SQLite file in a
temporary data dir (WAL). Before the run, ``--messages`` finished assistant
answers and ``--comparisons`` undecided A/B comparisons are written straight
into the database, owned by ``--users`` API users. Then ``--concurrency``
clients (asyncio + httpx, in a separate process) post, for ``--duration``
seconds after a short warm-up,

- ``POST /api/messages/{id}/feedback`` (3 of 4 writes): up/down alternating,
  with a comment unique to each write, and
- ``POST /api/comparisons/{id}/choice`` (1 of 4): a, b, tie, both_bad in turn.

Each answer and comparison belongs to one client, which writes to it
sequentially, so "the last acknowledged write" is well defined. Reported:
sustained acknowledged writes/s, p50/p99 latency (overall and per kind),
errors by status, and the count check: the feedback table holds exactly one
row per answer with an acknowledged write, carrying that last write's rating
and comment (and no other rows); every comparison's winner is its last
acknowledged choice (untouched ones stay undecided). A write without a reply
(timeout) may or may not have landed; it is counted as ``unknown`` and either
outcome is accepted.

    .venv/bin/python bench/ingest.py --quick   # 16 clients, 20 s
    .venv/bin/python bench/ingest.py           # 32 clients, 60 s

Prints one JSON line last on stdout; progress and logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (  # noqa: E402
    ClientProcess,
    bench_settings,
    claim_stdout,
    cpu_seconds,
    log,
    machine,
    r,
    start_loop_thread,
    start_server,
    summary_ms,
    temp_data_dir,
)

ANSWERS_PER_CONVERSATION = 25
WINNERS = ["a", "b", "tie", "both_bad"]


def seed_database(db, users: int, messages: int, comparisons: int) -> dict[str, Any]:
    """API users with keys, finished answers and undecided comparisons, written
    directly. Returns keys, and (id, user index) of every answer and comparison."""
    from server.identity import create_api_key
    from store.db import session_scope
    from store.tables import Comparison, Conversation, Message, utcnow

    keys: list[str] = []
    user_ids: list[int] = []
    answers: list[tuple[int, int]] = []
    pairs: list[tuple[int, int]] = []
    with session_scope(db) as session:
        for u in range(users):
            row, key = create_api_key(session, f"bench-ingest-{u}")
            keys.append(key)
            user_ids.append(row.user_id)
    per_user = [messages // users + (1 if u < messages % users else 0) for u in range(users)]
    for u, count in enumerate(per_user):
        with session_scope(db) as session:
            made = 0
            while made < count:
                conversation = Conversation(user_id=user_ids[u], source="api", title="bench")
                session.add(conversation)
                session.flush()
                question = Message(conversation_id=conversation.id, role="user", content="Say something.",
                                   status="complete", completed_at=utcnow())
                session.add(question)
                session.flush()
                batch = [
                    Message(conversation_id=conversation.id, parent_id=question.id, role="assistant",
                            content=f"answer {made + i} of user {u}", status="complete", completed_at=utcnow(),
                            sampling={"temperature": 0.7, "max_tokens": 16})
                    for i in range(min(ANSWERS_PER_CONVERSATION, count - made))
                ]
                session.add_all(batch)
                session.flush()
                conversation.current_leaf_id = batch[-1].id
                answers.extend((m.id, u) for m in batch)
                made += len(batch)
    with session_scope(db) as session:
        for i in range(comparisons):
            u = i % users
            conversation = Conversation(user_id=user_ids[u], source="api", title="bench A/B")
            session.add(conversation)
            session.flush()
            question = Message(conversation_id=conversation.id, role="user", content="Pick one.",
                               status="complete", completed_at=utcnow())
            session.add(question)
            session.flush()
            a, b = (Message(conversation_id=conversation.id, parent_id=question.id, role="assistant",
                            content=f"{side} {i}", status="complete", completed_at=utcnow()) for side in "ab")
            session.add_all([a, b])
            session.flush()
            conversation.current_leaf_id = a.id
            comparison = Comparison(user_id=user_ids[u], conversation_id=conversation.id,
                                    message_a_id=a.id, message_b_id=b.id)
            session.add(comparison)
            session.flush()
            pairs.append((comparison.id, u))
    return {"keys": keys, "user_ids": user_ids, "answers": answers, "comparisons": pairs}


async def client_job(job: dict[str, Any], conn) -> dict[str, Any]:
    """Runs in the client process: ``concurrency`` tasks, each owning a slice of
    the answers and comparisons, writing for warm-up + duration seconds."""
    import httpx

    headers = [{"Authorization": f"Bearer {key}"} for key in job["keys"]]
    concurrency = job["concurrency"]
    answers = job["answers"]
    comparisons = job["comparisons"]
    started = time.perf_counter()
    warm_end = started + job["warmup_s"]
    end = warm_end + job["duration_s"]
    # (task, kind, target, value, status, latency_s, t_start_rel, measured)
    records: list[tuple] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=job["base_url"], limits=limits, timeout=job["timeout_s"]) as client:

        async def task(t: int) -> None:
            mine_a = answers[t::concurrency]
            mine_c = comparisons[t::concurrency]
            visits: dict[tuple[str, int], int] = {}
            ia = ic = op = 0
            while time.perf_counter() < end:
                choice = mine_c and (op % 4 == 3 or not mine_a)
                op += 1
                if choice:
                    target, user = mine_c[ic % len(mine_c)]
                    ic += 1
                    n = visits.get(("c", target), 0)
                    visits[("c", target)] = n + 1
                    value = WINNERS[n % len(WINNERS)]
                    path, body, kind = f"/api/comparisons/{target}/choice", {"winner": value}, "c"
                else:
                    target, user = mine_a[ia % len(mine_a)]
                    ia += 1
                    n = visits.get(("f", target), 0)
                    visits[("f", target)] = n + 1
                    rating = "up" if n % 2 == 0 else "down"
                    value = f"{rating}|t{t}-{op}"
                    path = f"/api/messages/{target}/feedback"
                    body, kind = {"rating": rating, "comment": f"t{t}-{op}", "tags": ["bench"]}, "f"
                t0 = time.perf_counter()
                status = None
                try:
                    resp = await client.post(path, json=body, headers=headers[user])
                    status = resp.status_code
                except Exception:  # noqa: BLE001 - no reply: outcome unknown
                    status = None
                t1 = time.perf_counter()
                records.append((t, kind, target, value, status, t1 - t0, t0 - started, warm_end <= t0 < end))

        await asyncio.gather(*(task(t) for t in range(concurrency)))
    return {"records": records, "wall_s": time.perf_counter() - started}


def verify(db, seed: dict[str, Any], records: list[tuple]) -> dict[str, Any]:
    """Compare the database with the acknowledged writes."""
    from sqlmodel import Session, select

    from store.tables import Comparison, Feedback

    owner = {mid: seed["user_ids"][u] for mid, u in seed["answers"]}
    expect: dict[tuple[str, int], dict[str, Any]] = {}
    for _, kind, target, value, status, *_ in records:  # per target, in write order
        state = expect.setdefault((kind, target), {"acked": None, "unknown": []})
        if status is not None and 200 <= status < 300:
            state["acked"], state["unknown"] = value, []
        elif status is None or status >= 500:
            state["unknown"].append(value)

    def acceptable(state: dict[str, Any] | None) -> set:
        if state is None:
            return {None}
        return {state["acked"], *state["unknown"]}

    result = {"feedback": {"rows": 0, "acked_targets": 0, "match": 0, "missing": 0, "wrong_value": 0,
                           "unexpected_rows": 0, "wrong_user": 0, "unknown_outcome": 0},
              "comparisons": {"acked_targets": 0, "match": 0, "wrong_winner": 0, "unknown_outcome": 0}}
    problems: list[str] = []
    with Session(db) as session:
        rows = session.exec(select(Feedback)).all()
        comparisons = {c.id: c for c in session.exec(select(Comparison)).all()}
    fb = result["feedback"]
    fb["rows"] = len(rows)
    seen: set[int] = set()
    for row in rows:
        seen.add(row.message_id)
        state = expect.get(("f", row.message_id))
        if row.user_id != owner.get(row.message_id):
            fb["wrong_user"] += 1
        value = f"{row.rating}|{row.comment}"
        if state is None or (state["acked"] is None and value not in state["unknown"]):
            fb["unexpected_rows"] += 1
            problems.append(f"feedback row for message {row.message_id} with no acknowledged write")
        elif value in acceptable(state):
            fb["match"] += 1
        else:
            fb["wrong_value"] += 1
            problems.append(f"message {row.message_id}: db {value}, acked {state['acked']}")
    for (kind, target), state in expect.items():
        if state["unknown"]:
            result["feedback" if kind == "f" else "comparisons"]["unknown_outcome"] += 1
        if kind == "f" and state["acked"] is not None:
            fb["acked_targets"] += 1
            if target not in seen:
                fb["missing"] += 1
                problems.append(f"acknowledged feedback on message {target} is not in the database")
    cp = result["comparisons"]
    for cid, comparison in comparisons.items():
        state = expect.get(("c", cid))
        if state is not None and state["acked"] is not None:
            cp["acked_targets"] += 1
        if comparison.winner in acceptable(state) and (comparison.winner is None or comparison.decided_at):
            if state is not None and state["acked"] is not None:
                cp["match"] += 1
        else:
            cp["wrong_winner"] += 1
            problems.append(f"comparison {cid}: db {comparison.winner}, acked {state and state['acked']}")
    result["ok"] = (fb["missing"] == 0 and fb["wrong_value"] == 0 and fb["unexpected_rows"] == 0
                    and fb["wrong_user"] == 0 and cp["wrong_winner"] == 0)
    result["problems"] = problems[:10]
    return result


def main() -> int:
    emit = claim_stdout()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run (~1 min)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data dir")
    parser.add_argument("--users", type=int, help="API users owning the data (default 8 quick, 32 full)")
    parser.add_argument("--messages", type=int, help="pre-created answers (default 2000 quick, 20000 full)")
    parser.add_argument("--comparisons", type=int, help="pre-created comparisons (default 500 quick, 5000 full)")
    parser.add_argument("--concurrency", type=int, help="concurrent clients (default 16 quick, 32 full)")
    parser.add_argument("--duration", type=float, help="measured seconds (default 20 quick, 60 full)")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before (default 3)")
    parser.add_argument("--timeout", type=float, default=60.0, help="client timeout per request, s (default 60)")
    args = parser.parse_args()
    quick = args.quick
    users = args.users or (8 if quick else 32)
    messages = args.messages or (2000 if quick else 20000)
    comparisons = args.comparisons if args.comparisons is not None else (500 if quick else 5000)
    concurrency = args.concurrency or (16 if quick else 32)
    duration = args.duration or (20.0 if quick else 60.0)

    data_dir = temp_data_dir("ingest")
    settings = bench_settings(data_dir, engine="fake")
    client = ClientProcess()
    loop_thread = start_loop_thread()
    server = None
    try:
        server = start_server(settings, loop_thread)
        t0 = time.monotonic()
        seed = seed_database(server.db, users, messages, comparisons)
        log("seeded %d users, %d answers, %d comparisons in %.1f s (%s)", users, messages, comparisons,
            time.monotonic() - t0, settings.resolved_database_url)
        cpu0 = cpu_seconds()
        log("%d clients for %.0f s (+%.0f s warm-up)", concurrency, duration, args.warmup)
        run = client.call("bench.ingest:client_job", timeout=duration + args.warmup + 600,
                          base_url=server.base_url, keys=seed["keys"], answers=seed["answers"],
                          comparisons=seed["comparisons"], concurrency=concurrency,
                          warmup_s=args.warmup, duration_s=duration, timeout_s=args.timeout)
        server_cpu = cpu_seconds() - cpu0
        records = run["records"]
        from store.db import make_engine

        reader = make_engine(settings.resolved_database_url)  # not the server's pool: read what is on disk
        try:
            check = verify(reader, seed, records)
        finally:
            reader.dispose()

        measured = [rec for rec in records if rec[7]]
        acked = [rec for rec in measured if rec[4] is not None and 200 <= rec[4] < 300]
        errors: dict[str, int] = {}
        for rec in records:
            if rec[4] is None or not 200 <= rec[4] < 300:
                key = "no_reply" if rec[4] is None else str(rec[4])
                errors[key] = errors.get(key, 0) + 1
        by_kind = {}
        for kind, name in (("f", "feedback"), ("c", "choice")):
            ok = [rec for rec in acked if rec[1] == kind]
            by_kind[name] = {"writes_per_s": r(len(ok) / duration, 1),
                             "latency_ms": summary_ms([rec[5] for rec in measured if rec[1] == kind])}
        log("%d acknowledged writes in %.0f s; check ok: %s", len(acked), duration, check["ok"])
        emit({
            "bench": "ingest",
            "mode": "quick" if quick else "full",
            "engine": "fake (no generation involved)",
            "database": "sqlite (WAL, default settings)",
            "users": users,
            "answers": messages,
            "comparisons": comparisons,
            "concurrency": concurrency,
            "duration_s": duration,
            "writes_per_s": r(len(acked) / duration, 1),
            "latency_ms": summary_ms([rec[5] for rec in measured]),
            "by_kind": by_kind,
            "requests_total": len(records),
            "acknowledged_total": sum(1 for rec in records if rec[4] is not None and 200 <= rec[4] < 300),
            "errors": errors,
            "count_check": check,
            "server_cpu_s": r(server_cpu, 1),
            "client_cpu_s": run.get("client_cpu_s"),
            "machine_at_end": machine(),
            "ok": check["ok"] and not errors,
        })
        return 0 if check["ok"] and not errors else 1
    finally:
        if server is not None:
            server.stop()
        client.close()
        loop_thread.stop()
        if not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
