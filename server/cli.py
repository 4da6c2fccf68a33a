"""The ``tuneloop`` command line.

Every command reads the same ``TUNELOOP_*`` settings as the server, exits
non-zero with a one-line message on failure, and has ``--help``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable

from sqlmodel import Session, col, select

from store.settings import Settings


class CliError(Exception):
    """A failure to report in one line, exit status 1."""


def _db(settings: Settings):
    from store.db import make_engine, upgrade

    upgrade(settings.resolved_database_url)
    return make_engine(settings.resolved_database_url)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> None:
    import uvicorn

    from server.app import create_app
    from server.timeouts import KEEP_ALIVE_SECONDS, MAX_HEADER_BYTES

    host = args.host or settings.host
    port = args.port or settings.port
    if problems := settings.unsafe_secrets(host):
        raise CliError(
            f"refusing to serve on {host}, which is not loopback: {'; '.join(problems)} (or serve on 127.0.0.1)"
        )
    app = create_app(settings)
    print(f"tuneloop: serving http://{host}:{port} (engine {settings.engine}, model {settings.model})", flush=True)
    uvicorn.run(
        app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5,
        http="h11", h11_max_incomplete_event_size=MAX_HEADER_BYTES, timeout_keep_alive=KEEP_ALIVE_SECONDS,
    )


def cmd_db_upgrade(args: argparse.Namespace, settings: Settings) -> None:
    from store.db import upgrade

    upgrade(settings.resolved_database_url)
    print(f"database at head: {_redacted(settings.resolved_database_url)}")


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def cmd_keys_create(args: argparse.Namespace, settings: Settings) -> None:
    from server.identity import create_api_key
    from store.accounts import find_account
    from store.db import session_scope
    from store.errors import StoreError

    with session_scope(_db(settings)) as session:
        try:
            account = find_account(session, args.user) if args.user else None
            row, key = create_api_key(session, args.name, account)
        except (ValueError, StoreError) as exc:
            raise CliError(str(exc)) from exc
        key_id = row.id
    owner = f" acting as account {args.user!r}" if args.user else ""
    print(f"created key {key_id} for {args.name!r}{owner}. It is shown only once:")
    print(key)


def cmd_keys_list(args: argparse.Namespace, settings: Settings) -> None:
    from store.tables import ApiKey

    with Session(_db(settings)) as session:
        rows = session.exec(select(ApiKey).order_by(col(ApiKey.id))).all()
    if not rows:
        print("no API keys yet; create one with `tuneloop keys create NAME`")
        return
    print(f"{'id':>4}  {'name':<24} {'prefix':<12} {'created':<20} status")
    for row in rows:
        status = f"revoked {row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else "active"
        print(f"{row.id:>4}  {row.name:<24} {row.prefix:<12} {row.created_at:%Y-%m-%d %H:%M}     {status}")


def cmd_keys_revoke(args: argparse.Namespace, settings: Settings) -> None:
    from server.identity import revoke_api_key
    from store.db import session_scope

    with session_scope(_db(settings)) as session:
        row = revoke_api_key(session, args.key)
        if row is None:
            raise CliError(f"no active key with id or prefix {args.key!r}; see `tuneloop keys list`")
        print(f"revoked key {row.id} ({row.name})")


def _read_password(confirm: bool = True) -> str:
    """From a prompt (twice) on a terminal, else the first line of standard input."""
    import getpass

    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    password = getpass.getpass("password: ")
    if confirm and getpass.getpass("again: ") != password:
        raise CliError("the two passwords differ; nothing was changed")
    return password


def _store_call(settings: Settings, change):
    """Run ``change(session)`` in one transaction; a store error is a one-line failure."""
    from store.db import session_scope
    from store.errors import StoreError

    try:
        with session_scope(_db(settings)) as session:
            return change(session)
    except StoreError as exc:
        raise CliError(exc.message) from exc


def cmd_users_create(args: argparse.Namespace, settings: Settings) -> None:
    from store.accounts import create_account

    password = _read_password()
    user = _store_call(settings, lambda s: create_account(s, args.name, password, admin=args.admin))
    print(f"created {'admin' if args.admin else 'user'} account {user.username} (id {user.id})")


def cmd_users_list(args: argparse.Namespace, settings: Settings) -> None:
    from store.accounts import list_accounts

    rows = _store_call(settings, list_accounts)
    if not rows:
        print("no accounts yet; the first sign-up becomes admin, or `tuneloop users create NAME --admin`")
        return
    print(f"{'id':>4}  {'username':<24} {'role':<6} {'status':<9} {'training':<9} created")
    for row in rows:
        training = "excluded" if row.excluded_from_training else "included"
        print(f"{row.id:>4}  {row.username:<24} {row.role:<6} {row.status:<9} {training:<9} "
              f"{row.created_at:%Y-%m-%d %H:%M}")


def _set_status(settings: Settings, name: str, status: str) -> None:
    from store.accounts import find_account, set_status

    user = _store_call(settings, lambda s: set_status(s, find_account(s, name), status))
    print(f"{user.username}: {user.status}" + (" (signed out everywhere)" if status == "disabled" else ""))


def cmd_users_disable(args: argparse.Namespace, settings: Settings) -> None:
    _set_status(settings, args.name, "disabled")


def cmd_users_approve(args: argparse.Namespace, settings: Settings) -> None:
    _set_status(settings, args.name, "active")


def cmd_exclude(args: argparse.Namespace, settings: Settings) -> None:
    from store.exclusions import adapters_reached, set_excluded

    def change(session):
        row = set_excluded(session, args.kind, args.id, excluded=not args.undo)
        return adapters_reached(session, row.id) if args.kind == "user" else []

    reached = _store_call(settings, change)
    print(f"{args.kind} {args.id} {'included in' if args.undo else 'excluded from'} training from the next run")
    if reached and not args.undo:
        print(f"its feedback already reached {', '.join(reached)}; roll back to undo that "
              "(`tuneloop adapters rollback`)")


def cmd_retrain(args: argparse.Namespace, settings: Settings) -> None:
    """One full cycle now, in the foreground; prints progress and the decision."""
    import time

    from server.retraining import start_cycle
    from store.run_lease import CycleBusy
    from store.tables import TrainingRun

    db = _db(settings)
    try:
        started = start_cycle(settings, db, "manual")
    except CycleBusy as busy:
        raise CliError(f"{busy}; try again when it has finished") from busy
    if started.process is None:
        print(f"run {started.run_id} queued for a trainer worker (TUNELOOP_TRAINER=workers)", flush=True)
    else:
        print(f"run {started.run_id} started (log: {started.log_path})", flush=True)
    shown = None
    while True:
        with Session(db) as session:
            run = session.get(TrainingRun, started.run_id)
        line = _progress_line(run)
        if line != shown and sys.stdout.isatty():
            print("\r" + line.ljust(60), end="", flush=True)
        elif line != shown:
            print(line, flush=True)
        shown = line
        if run.status not in ("queued", "running") and (started.process is None or started.process.poll() is not None):
            break
        time.sleep(1)
    if started.watcher:
        started.watcher.join(timeout=30)  # it removes the run's settings file (with the database URL)
    print()
    print(_decision_text(run))
    if run.status == "failed":
        raise CliError(f"run {run.id} failed: {(run.error or '').splitlines()[0] if run.error else ''}")


def cmd_trainer(args: argparse.Namespace, settings: Settings) -> None:
    """Become a trainer worker (``python -m trainer worker``) until SIGTERM/SIGINT:
    the web server and the trainer share only the store, so this replaces the
    process rather than importing the trainer."""
    import os

    argv = [sys.executable, "-m", "trainer", "worker"] + (["--once"] if args.once else [])
    sys.stdout.flush()
    os.execv(sys.executable, argv)


def _progress_line(run) -> str:
    progress = run.progress or {}
    phase = progress.get("phase", run.status)
    step, total = progress.get("step"), progress.get("total")
    if step is not None and total:
        filled = int(20 * step / total)
        return f"{phase} [{'#' * filled}{'.' * (20 - filled)}] {step}/{total}"
    return phase


def _decision_text(run) -> str:
    metrics = run.metrics or {}
    pairs = metrics.get("pairs", {})
    lines = [f"run {run.id}: {run.status.upper()}"]
    if pairs:
        lines.append(
            f"  pairs: {pairs.get('new', 0)} new, {pairs.get('replay', 0)} replayed, {pairs.get('eval', 0)} held out"
        )
    decision = metrics.get("decision")
    if decision:
        for name, value in decision.get("numbers", {}).items():
            lines.append(f"  {name}: {value}")
        for reason in decision.get("reasons", []):
            lines.append(f"  - {reason}")
    if run.adapter_version:
        lines.append(f"  candidate: v{run.adapter_version}")
    if metrics.get("reason"):
        lines.append(f"  {metrics['reason']}")
    return "\n".join(lines)


def cmd_adapters_list(args: argparse.Namespace, settings: Settings) -> None:
    from store.registry import list_versions

    with Session(_db(settings)) as session:
        rows = list_versions(session)
    if not rows:
        print("no adapter versions yet: the base model serves. Run `tuneloop retrain`.")
        return
    print(f"{'version':<8} {'status':<12} {'parent':<7} {'run':>4}  {'accuracy':>8} {'margin':>8}  created")
    for row in rows:
        candidate = (row.metrics or {}).get("candidate", {})
        accuracy = candidate.get("preference_accuracy")
        margin = candidate.get("mean_margin")
        print(
            f"{row.name:<8} {row.status:<12} {f'v{row.parent_version}' if row.parent_version else '-':<7} "
            f"{row.training_run_id or '-':>4}  {_num(accuracy):>8} {_num(margin):>8}  {row.created_at:%Y-%m-%d %H:%M}"
        )


def _num(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


def _change_active(settings: Settings, change) -> None:
    from store.db import session_scope
    from store.errors import StoreError

    try:
        with session_scope(_db(settings)) as session:
            row = change(session)
            name = row.name if row else "the base model"
    except StoreError as exc:
        raise CliError(str(exc)) from exc
    print(f"active: {name} (running servers swap to it at once)")


def cmd_adapters_activate(args: argparse.Namespace, settings: Settings) -> None:
    from store.errors import StoreError
    from store.registry import activate, parse_version

    try:
        version = parse_version(args.version)
    except StoreError as exc:
        raise CliError(str(exc)) from exc
    _change_active(settings, lambda session: activate(session, version))


def cmd_adapters_rollback(args: argparse.Namespace, settings: Settings) -> None:
    from store.registry import rollback

    _change_active(settings, rollback)


def cmd_canary(args: argparse.Namespace, settings: Settings) -> None:
    """``status``: where the canary and the post-promotion watch stand;
    ``promote`` / ``reject``: end the canary now (as the dashboard's buttons)."""
    from store.canary import canary_status, end_canary, watch_status
    from store.db import session_scope
    from store.errors import StoreError
    from store.registry import active_version

    with session_scope(_db(settings)) as session:
        if args.action == "status":
            canary = canary_status(session, settings)
            watch = watch_status(session, settings, active_version(session))
            print(json.dumps({"canary": canary.to_json() if canary else None,
                              "watch": watch.to_json() if watch else None}, indent=2))
            return
        try:
            outcome = end_canary(session, settings, args.action == "promote", args.note)
        except StoreError as exc:
            raise CliError(str(exc)) from exc
    print(f"canary {outcome} (running servers follow at once)")


def _progress(iterable, total: int | None = None, desc: str = ""):
    """A progress bar on stderr (tqdm when installed, else one line at the end)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _LineProgress(iterable, total, desc)
    return tqdm(iterable, total=total, desc=desc, unit="rec", leave=False, disable=None, file=sys.stderr)


class _LineProgress:
    def __init__(self, iterable, total: int | None, desc: str) -> None:
        self.iterable, self.total, self.desc = iterable, total, desc

    def __iter__(self):
        count = 0
        for count, item in enumerate(self.iterable, start=1):  # noqa: B007
            yield item
        print(f"{self.desc}: {count}/{self.total if self.total is not None else count}", file=sys.stderr, flush=True)


def cmd_export(args: argparse.Namespace, settings: Settings) -> None:
    from pathlib import Path

    from store.db import session_scope
    from store.exchange.export import NothingToExport, default_filename, export_dataset, parse_since

    try:
        since = parse_since(args.since)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    file_format = args.file_format
    output = Path(args.output) if args.output else None
    if file_format is None:
        file_format = "parquet" if output is not None and output.suffix == ".parquet" else "jsonl"
    name = default_filename(args.format, file_format, args.split)
    if output is None:
        output = settings.data_dir / "exports" / name
    elif output.is_dir():
        output = output / name
    try:
        with session_scope(_db(settings)) as session:
            report = export_dataset(
                session, args.format, output, file_format, args.split, since, progress=_progress,
                eval_share=settings.eval_share,
            )
    except NothingToExport as exc:
        raise CliError(exc.message) from exc
    except (ValueError, OSError) as exc:
        raise CliError(f"export failed: {exc}") from exc
    what = {"feedback": "feedback records", "trl-unpaired": f"single thumbs (split {args.split})"}.get(
        args.format, f"pairs (split {args.split})")
    print(f"exported {report.rows} {what} as {args.format} {file_format} to {report.path}")
    for extra in report.extra_files:
        print(f"wrote {extra}")
    if report.skipped:
        print(f"skipped {report.skipped} pairs the {args.format} format cannot hold, e.g. {report.skipped_reasons[0]}")


def cmd_import(args: argparse.Namespace, settings: Settings) -> None:
    from pathlib import Path

    from sqlalchemy.exc import IntegrityError

    from store.db import session_scope
    from store.exchange.importing import DatasetImportError, import_dataset

    path = Path(args.file)
    if not path.is_file():
        raise CliError(f"{path} does not exist or is not a file")
    try:
        with session_scope(_db(settings)) as session:
            report = import_dataset(
                session, path, settings.eval_share, args.format, dry_run=args.dry_run, progress=_progress
            )
    except (DatasetImportError, OSError) as exc:
        raise CliError(str(exc)) from exc
    except IntegrityError as exc:
        raise CliError(
            "some of these pairs were added by another process while importing; nothing was imported, run it again"
        ) from exc
    verb = "would import" if report.dry_run else "imported"
    splits = report.added_by_split
    print(
        f"{verb} {report.added} new pairs from {path.name} ({report.format}, {report.rows} records): "
        f"{splits['train']} train, {splits['eval']} eval; {report.duplicates} already in the store"
        + (f" (import batch {report.batch_id})" if report.batch_id else "")
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuneloop", description="A chat app that learns from its users' feedback."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="serve the web app and API (TUNELOOP_HOST/PORT)")
    serve.add_argument("--host", help="override TUNELOOP_HOST")
    serve.add_argument("--port", type=int, help="override TUNELOOP_PORT")
    serve.set_defaults(handler=cmd_serve)

    db = commands.add_parser("db", help="database maintenance")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_commands.add_parser("upgrade", help="apply Alembic migrations up to head").set_defaults(
        handler=cmd_db_upgrade
    )

    commands.add_parser(
        "retrain", help="run one retraining cycle now and print the decision"
    ).set_defaults(handler=cmd_retrain)

    trainer = commands.add_parser(
        "trainer", help="a trainer worker: claim and train queued runs (TUNELOOP_TRAINER=workers on the servers)"
    )
    trainer.add_argument("--once", action="store_true", help="take at most one run, then exit")
    trainer.set_defaults(handler=cmd_trainer)

    adapters = commands.add_parser("adapters", help="adapter versions: list, activate, rollback")
    adapter_commands = adapters.add_subparsers(dest="adapters_command", required=True, metavar="ACTION")
    adapter_commands.add_parser("list", help="every version with its status and numbers").set_defaults(
        handler=cmd_adapters_list
    )
    activate_cmd = adapter_commands.add_parser("activate", help="serve version V (e.g. v3, or base)")
    activate_cmd.add_argument("version", help="v3, 3, or base")
    activate_cmd.set_defaults(handler=cmd_adapters_activate)
    adapter_commands.add_parser(
        "rollback", help="go back to the version active before the current one"
    ).set_defaults(handler=cmd_adapters_rollback)

    canary = commands.add_parser("canary", help="the canary users are judging: status, promote or reject now")
    canary.add_argument("action", choices=("status", "promote", "reject"))
    canary.add_argument("--note", default="", help="why (kept with the decision)")
    canary.set_defaults(handler=cmd_canary)

    keys = commands.add_parser("keys", help="API keys for the OpenAI-compatible and feedback APIs")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = key_commands.add_parser("create", help="create a key (printed once)")
    create.add_argument("name", help="who or what the key is for")
    create.add_argument(
        "--user", metavar="USERNAME",
        help="the account the key acts as (its chats and feedback are the account's); "
        "without, the key is an identity of its own (automation)",
    )
    create.set_defaults(handler=cmd_keys_create)
    key_commands.add_parser("list", help="list keys (never the keys themselves)").set_defaults(
        handler=cmd_keys_list
    )
    revoke = key_commands.add_parser("revoke", help="revoke a key by id or prefix")
    revoke.add_argument("key", help="key id (from `keys list`) or its prefix")
    revoke.set_defaults(handler=cmd_keys_revoke)

    users = commands.add_parser("users", help="accounts: create, list, approve, disable")
    user_commands = users.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    create_user = user_commands.add_parser(
        "create", help="create an active account (password from a prompt, or stdin when not a terminal)"
    )
    create_user.add_argument("name", help="the username")
    create_user.add_argument("--admin", action="store_true", help="make it an admin")
    create_user.set_defaults(handler=cmd_users_create)
    user_commands.add_parser("list", help="every account with role, status and training").set_defaults(
        handler=cmd_users_list
    )
    for action, handler, text in (
        ("approve", cmd_users_approve, "activate a pending (or disabled) account"),
        ("disable", cmd_users_disable, "disable an account and sign it out everywhere"),
    ):
        command = user_commands.add_parser(action, help=text)
        command.add_argument("name", help="username or id")
        command.set_defaults(handler=handler)

    exclude = commands.add_parser(
        "exclude", help="keep a user, conversation, message or pair out of training",
        description="Exclude a source from every later training run (or include it again with --undo). "
        "For a user, says which adapters their feedback already reached.",
    )
    exclude.add_argument("kind", choices=("user", "conversation", "message", "pair"))
    exclude.add_argument("id", type=int, help="its id (shown on the dashboard)")
    exclude.add_argument("--undo", action="store_true", help="include it again")
    exclude.set_defaults(handler=cmd_exclude)

    from store.exchange.export import EXPORT_FORMATS

    export = commands.add_parser(
        "export", help="write the preference pairs (or raw feedback) as a dataset file",
        description="Write the preference pairs in the shape TRL, Axolotl or LLaMA-Factory reads "
        "(or the raw feedback), as JSONL or Parquet. Pairs an admin excluded are left out.",
    )
    export.add_argument(
        "--format", required=True, choices=EXPORT_FORMATS,
        help="trl: prompt/chosen/rejected messages; axolotl: chat_template.default; "
        "llamafactory: sharegpt + dataset_info.json; trl-unpaired: single thumbs (answers rated with no "
        "sibling to pair with) as prompt/completion/label for TRL's KTOTrainer; feedback: raw thumbs and A/B choices",
    )
    export.add_argument(
        "--file-format", choices=("jsonl", "parquet"),
        help="default: parquet if --output ends in .parquet, else jsonl",
    )
    export.add_argument("--split", choices=("train", "eval", "all"), default="all", help="which pairs (default: all)")
    export.add_argument(
        "--output", "-o", help="file or folder to write (default: $TUNELOOP_DATA_DIR/exports/tuneloop-FORMAT-...)"
    )
    export.add_argument("--since", help="only records created at or after this ISO date/time, e.g. 2026-11-01")
    export.set_defaults(handler=cmd_export)

    import_cmd = commands.add_parser(
        "import", help="add the pairs of a dataset file (trl, axolotl or llamafactory export)",
        description="Validate a preference dataset (JSONL, JSON or Parquet) and add its pairs to the store, "
        "deduplicated by content; nothing is imported if any record is bad.",
    )
    import_cmd.add_argument("file", help="the dataset file")
    import_cmd.add_argument(
        "--format", choices=("auto", "trl", "axolotl", "llamafactory"), default="auto",
        help="default: detect it from the columns",
    )
    import_cmd.add_argument("--dry-run", action="store_true", help="validate and count, write nothing")
    import_cmd.set_defaults(handler=cmd_import)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        settings = Settings()
    except Exception as exc:  # pydantic's message names the bad variable
        print(f"tuneloop: bad settings: {exc}", file=sys.stderr)
        return 2
    handler: Callable[[argparse.Namespace, Settings], None] = args.handler
    try:
        handler(args, settings)
    except CliError as exc:
        print(f"tuneloop: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
