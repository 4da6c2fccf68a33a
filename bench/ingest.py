"""Feedback ingestion: thumbs and A/B choices under concurrency, SQLite and PostgreSQL.

No generation is involved, so the server runs the *fake* engine
(``TUNELOOP_ENGINE=fake``), served as ``tuneloop serve`` serves it (uvicorn,
h11, the same limits; ``--http httptools`` for the faster parser). Databases
(``--database``, both by default): the default SQLite file in a temporary
data dir (WAL, ``synchronous=FULL``: an acknowledged write survives a power
loss) and a fresh PostgreSQL database on ``--postgres`` (dropped afterwards).
Rate limits are off: they cap one identity at 2 writes/s and one address at
10/s, and every client here is 127.0.0.1 -- this measures the store path.

Before the run, ``--messages`` finished assistant answers (regenerations of
one question, ``--answers-per-context`` at a time: 25 by default, so every
changed thumb withdraws and rebuilds pairs with a dozen others) and
``--comparisons`` undecided A/B comparisons are written straight into the
database, owned by ``--users`` API users. Then ``--concurrency`` clients (in
a separate process; a lean keep-alive HTTP/1.1 client by default, since
httpx's ~0.5 ms of CPU per request would be taken from the server on 2 cores:
``--client httpx`` for it) post, for ``--duration`` seconds after a short
warm-up,

- ``POST /api/messages/{id}/feedback`` (3 of 4 writes): up/down alternating,
  with a comment unique to each write, and
- ``POST /api/comparisons/{id}/choice`` (1 of 4): a, b, tie, both_bad in turn.

Each answer and comparison belongs to one client, which writes to it
sequentially, so "the last acknowledged write" is well defined. Reported per
database: sustained acknowledged writes/s, p50/p99 latency (overall and per
kind), errors by status, the durability setting, transactions the
group-commit writer used (writes per commit), server CPU per write, and the
count check: the feedback table holds exactly one row per answer with an
acknowledged write, carrying that last write's rating and comment (and no
other rows); every comparison's winner is its last acknowledged choice
(untouched ones stay undecided). ``lost`` counts acknowledged writes the
database does not show. A write without a reply (timeout) may or may not have
landed; it is counted as ``unknown`` and either outcome is accepted.

Before/after on one machine: ``--code DIR`` serves the ``server`` and
``store`` packages of another tree, e.g. the commit before group commit::

    git archive <commit> server store alembic web | (mkdir -p /tmp/before && tar -x -C /tmp/before)
    .venv/bin/python bench/ingest.py --quick --code /tmp/before

    .venv/bin/python bench/ingest.py --quick   # 16 clients, 20 s per database
    .venv/bin/python bench/ingest.py           # 32 clients, 60 s per database

Prints one JSON line last on stdout; progress and logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (  # noqa: E402
    BenchServer,
    ClientProcess,
    bench_settings,
    claim_stdout,
    cpu_seconds,
    free_port,
    log,
    machine,
    r,
    start_loop_thread,
    summary_ms,
    temp_data_dir,
)

ANSWERS_PER_CONVERSATION = 25
WINNERS = ["a", "b", "tie", "both_bad"]
POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
SQLITE_SYNCHRONOUS = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}


def seed_database(db, users: int, messages: int, comparisons: int,
                  per_context: int = ANSWERS_PER_CONVERSATION) -> dict[str, Any]:
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
                    for i in range(min(per_context, count - made))
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


class RawHttp:
    """One keep-alive HTTP/1.1 connection posting JSON: status line, headers,
    ``Content-Length`` body, nothing else -- a load generator's client, far
    cheaper per request than httpx. Reconnects after an error."""

    def __init__(self, base_url: str, timeout_s: float) -> None:
        host, _, port = base_url.removeprefix("http://").partition(":")
        self.host, self.port, self.timeout_s = host, int(port), timeout_s
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: dict[str, Any], authorization: str) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        data = json.dumps(body).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nAuthorization: {authorization}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n")
        self.writer.write(head.encode() + data)
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._response()
        except BaseException:
            self.close()
            raise

    async def _response(self) -> int:
        assert self.reader is not None
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection")
        status = int(status_line.split()[1])
        length, close = 0, False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
            elif name == b"transfer-encoding":
                raise ConnectionError("chunked answers are not expected here")
        await self.reader.readexactly(length)
        if close:
            self.close()
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def client_job(job: dict[str, Any], conn) -> dict[str, Any]:
    """Runs in the client process: ``concurrency`` tasks, each owning a slice of
    the answers and comparisons, writing for warm-up + duration seconds."""
    import httpx

    keys = [f"Bearer {key}" for key in job["keys"]]
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
            raw = RawHttp(job["base_url"], job["timeout_s"]) if job.get("client", "raw") == "raw" else None
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
                    if raw is not None:
                        status = await raw.post(path, body, keys[user])
                    else:
                        resp = await client.post(path, json=body, headers={"Authorization": keys[user]})
                        status = resp.status_code
                except Exception:  # noqa: BLE001 - no reply: outcome unknown
                    status = None
                t1 = time.perf_counter()
                records.append((t, kind, target, value, status, t1 - t0, t0 - started, warm_end <= t0 < end))
            if raw is not None:
                raw.close()

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
    result["lost"] = fb["missing"] + fb["wrong_value"] + cp["wrong_winner"]
    result["ok"] = (result["lost"] == 0 and fb["unexpected_rows"] == 0 and fb["wrong_user"] == 0)
    result["problems"] = problems[:10]
    return result


def cpu_calibration_ms() -> float:
    """Milliseconds a fixed piece of pure-Python work (JSON and hashing, as in
    a feedback write) takes now, best of three: on a shared VM the CPU's speed
    moves by tens of percent between runs, so compare runs by this too."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for i in range(20_000):
            hashlib.sha256(json.dumps([[{"role": "user", "content": f"q{i}"}], "a", "b"]).encode()).hexdigest()
        best = min(best, time.perf_counter() - started)
    return round(best * 1000, 1)


def use_code(code: Path) -> None:
    """Serve the ``server`` and ``store`` packages of the tree ``code`` (links
    to them in a folder put first on ``sys.path``; the benchmark itself stays
    this one). Must run before either package is imported."""
    code = code.resolve()
    for name in ("server", "store", "alembic", "web"):
        if not (code / name).is_dir():
            raise SystemExit(f"--code {code}: it has no {name}/ folder")
    shim = Path(tempfile.mkdtemp(prefix="tuneloop-bench-code-"))
    for name in ("server", "store"):
        (shim / name).symlink_to(code / name, target_is_directory=True)
    sys.path.insert(0, str(shim))


def start_serving(settings, loop_thread, http: str) -> BenchServer:
    """The app as ``tuneloop serve`` runs it (uvicorn with its HTTP parser and
    limits), on ``loop_thread``'s loop; returns once it is listening."""
    import uvicorn

    from server.app import create_app
    from server.timeouts import KEEP_ALIVE_SECONDS, MAX_HEADER_BYTES

    app = create_app(settings)
    port = free_port()
    options: dict[str, Any] = {"http": http, "timeout_keep_alive": KEEP_ALIVE_SECONDS}
    if http == "h11":
        options["h11_max_incomplete_event_size"] = MAX_HEADER_BYTES
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=5, access_log=False, **options)
    server = uvicorn.Server(config)
    serving = loop_thread.submit(server.serve())
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the bench server did not start within 60 s")
        if serving.done():
            serving.result()
        time.sleep(0.02)
    return BenchServer(app=app, base_url=f"http://127.0.0.1:{port}", server=server, loop_thread=loop_thread,
                       serving=serving)


def durability(db) -> dict[str, Any]:
    """The setting deciding what an acknowledged write survives, read from a server connection."""
    with db.connect() as conn:
        if conn.dialect.name == "sqlite":
            mode = conn.exec_driver_sql("PRAGMA synchronous").scalar()
            journal = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
            return {"journal_mode": journal, "synchronous": SQLITE_SYNCHRONOUS.get(mode, mode)}
        return {"synchronous_commit": conn.exec_driver_sql("SHOW synchronous_commit").scalar(),
                "fsync": conn.exec_driver_sql("SHOW fsync").scalar()}


def create_postgres_database(admin_url: str) -> tuple[str, Any]:
    """A fresh database on the server of ``admin_url``; returns its URL and a function dropping it."""
    from sqlalchemy import create_engine, text

    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"tuneloop_bench_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return admin_url.rsplit("/", 1)[0] + f"/{name}", drop


def writer_process_cpu_s(writer: Any) -> float:
    """CPU seconds of the server's feedback writer process (store.writer_process), 0 for a writer thread."""
    child = getattr(writer, "_child", None)
    if child is None:
        return 0.0
    try:
        fields = Path(f"/proc/{child.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def run_one(database: str, args: argparse.Namespace, sizes: dict[str, Any], client: ClientProcess,
            loop_thread) -> dict[str, Any]:
    """One database: serve, seed, load, check. Returns its summary."""
    from store.db import make_engine

    data_dir = temp_data_dir(f"ingest-{database}")
    drop = None
    server = None
    try:
        overrides: dict[str, Any] = {"engine": "fake", "rate_limits": False}
        if args.writer != "auto":  # (a tree given with --code may predate the setting)
            overrides["feedback_writer"] = args.writer
        if database == "postgresql":
            overrides["database_url"], drop = create_postgres_database(args.postgres)
        settings = bench_settings(data_dir, **overrides)
        server = start_serving(settings, loop_thread, args.http)
        t0 = time.monotonic()
        seed = seed_database(server.db, sizes["users"], sizes["messages"], sizes["comparisons"],
                             sizes["answers_per_context"])
        log("%s: seeded %d users, %d answers, %d comparisons in %.1f s", database, sizes["users"],
            sizes["messages"], sizes["comparisons"], time.monotonic() - t0)
        durable = durability(server.db)
        calibration_start = cpu_calibration_ms()
        writer = getattr(getattr(server.app.state, "feedback", None), "writer", None)
        batches0 = writer.batches if writer is not None else None
        busy0 = writer.busy_s if writer is not None else None
        cpu0 = cpu_seconds() + writer_process_cpu_s(writer)
        log("%s: %d clients for %.0f s (+%.0f s warm-up)", database, sizes["concurrency"], sizes["duration"],
            args.warmup)
        run = client.call("bench.ingest:client_job", timeout=sizes["duration"] + args.warmup + 600,
                          base_url=server.base_url, keys=seed["keys"], answers=seed["answers"],
                          comparisons=seed["comparisons"], concurrency=sizes["concurrency"],
                          warmup_s=args.warmup, duration_s=sizes["duration"], timeout_s=args.timeout,
                          client=args.client)
        server_cpu = cpu_seconds() + writer_process_cpu_s(writer) - cpu0  # the writer's child process included
        calibration_end = cpu_calibration_ms()
        batches = writer.batches - batches0 if writer is not None else None
        writer_busy = writer.busy_s - busy0 if writer is not None else None
        wall = run["wall_s"]
        server.stop()
        server = None
        records = run["records"]
        reader = make_engine(settings.resolved_database_url)  # not the server's pool: read what is stored
        try:
            check = verify(reader, seed, records)
        finally:
            reader.dispose()
    finally:
        if server is not None:
            server.stop()
        if drop is not None:
            drop()
        if not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)

    duration = sizes["duration"]
    measured = [rec for rec in records if rec[7]]
    acked = [rec for rec in measured if rec[4] is not None and 200 <= rec[4] < 300]
    acked_total = sum(1 for rec in records if rec[4] is not None and 200 <= rec[4] < 300)
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
    log("%s: %d acknowledged writes in %.0f s (%.0f/s); lost %d; check ok: %s", database, len(acked), duration,
        len(acked) / duration, check["lost"], check["ok"])
    return {
        "database": database,
        "durability": durable,
        "writes_per_s": r(len(acked) / duration, 1),
        "latency_ms": summary_ms([rec[5] for rec in measured]),
        "lost": check["lost"],
        "by_kind": by_kind,
        "requests_total": len(records),
        "acknowledged_total": acked_total,
        "errors": errors,
        "transactions": batches,
        "writes_per_transaction": r(acked_total / batches, 1) if batches else None,
        "writer_busy_share": r(writer_busy / wall, 2) if writer_busy is not None else None,
        "server_cpu_s": r(server_cpu, 1),
        "server_cpu_ms_per_write": r(1000 * server_cpu / acked_total, 3) if acked_total else None,
        "client_cpu_s": run.get("client_cpu_s"),
        "cpu_calibration_ms": {"before": calibration_start, "after": calibration_end},
        "count_check": check,
        "ok": check["ok"] and not errors,
    }


def main() -> int:
    emit = claim_stdout()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run (~1 min per database)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data dirs")
    parser.add_argument("--database", default="sqlite,postgresql",
                        help="comma-separated: sqlite, postgresql (default both)")
    parser.add_argument("--postgres", default=POSTGRES_ADMIN_URL,
                        help=f"PostgreSQL server to create a scratch database on (default {POSTGRES_ADMIN_URL})")
    parser.add_argument("--code", type=Path, help="serve the server/ and store/ packages of this tree instead")
    parser.add_argument("--http", default="h11", choices=["h11", "httptools"],
                        help="uvicorn's HTTP parser (default h11, as `tuneloop serve`)")
    parser.add_argument("--writer", default="auto", choices=["auto", "process", "thread"],
                        help="TUNELOOP_FEEDBACK_WRITER: the group-commit writer in a child process (auto) or a "
                        "thread of the server (the layout before)")
    parser.add_argument("--client", default="raw", choices=["raw", "httpx"],
                        help="load generator: lean keep-alive client (default) or httpx")
    parser.add_argument("--users", type=int, help="API users owning the data (default 8 quick, 32 full)")
    parser.add_argument("--messages", type=int, help="pre-created answers (default 2000 quick, 20000 full)")
    parser.add_argument("--comparisons", type=int, help="pre-created comparisons (default 500 quick, 5000 full)")
    parser.add_argument("--answers-per-context", type=int, default=ANSWERS_PER_CONVERSATION,
                        help=f"answers to one question (default {ANSWERS_PER_CONVERSATION}): each changed thumb "
                        "re-pairs with the user's opposite thumbs among them, so this sets the pair work per write")
    parser.add_argument("--concurrency", type=int, help="concurrent clients (default 16 quick, 32 full)")
    parser.add_argument("--duration", type=float, help="measured seconds (default 20 quick, 60 full)")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before (default 3)")
    parser.add_argument("--timeout", type=float, default=60.0, help="client timeout per request, s (default 60)")
    args = parser.parse_args()
    databases = [name.strip() for name in args.database.split(",") if name.strip()]
    unknown = set(databases) - {"sqlite", "postgresql"}
    if unknown or not databases:
        parser.error(f"--database: sqlite and/or postgresql, not {args.database!r}")
    if args.code is not None:
        use_code(args.code)
    quick = args.quick
    sizes = {
        "users": args.users or (8 if quick else 32),
        "messages": args.messages or (2000 if quick else 20000),
        "comparisons": args.comparisons if args.comparisons is not None else (500 if quick else 5000),
        "concurrency": args.concurrency or (16 if quick else 32),
        "duration": args.duration or (20.0 if quick else 60.0),
        "answers_per_context": args.answers_per_context,
    }
    client = ClientProcess()
    loop_thread = start_loop_thread()
    try:
        results = {database: run_one(database, args, sizes, client, loop_thread) for database in databases}
    finally:
        client.close()
        loop_thread.stop()
    import server

    ok = all(result["ok"] for result in results.values())
    emit({
        "bench": "ingest",
        "mode": "quick" if quick else "full",
        "code": str(Path(server.__file__).resolve().parent.parent),
        "engine": "fake (no generation involved)",
        "http": args.http,
        "writer": args.writer,
        "client": args.client,
        "rate_limits": "off",
        **sizes,
        "results": results,
        "machine_at_end": machine(),
        "ok": ok,
    })
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
