"""``python -m trainer run --run-id N --settings FILE``: one retraining cycle in
its own process (started by ``store.run_process``, for the server or a worker).

``python -m trainer worker [--once]`` (``tuneloop trainer``): a trainer worker
(``trainer.worker``) with the settings of its ``TUNELOOP_*`` environment."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run one cycle for an existing TrainingRun row")
    run.add_argument("--run-id", type=int, required=True)
    run.add_argument("--settings", type=Path, required=True, help="settings JSON written by the server")
    work = commands.add_parser("worker", help="claim and train queued runs (TUNELOOP_TRAINER=workers)")
    work.add_argument("--once", action="store_true", help="take at most one run, then exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from store.settings import Settings

    if args.command == "worker":
        from trainer.worker import main as work_main

        taken = work_main(Settings(), once=args.once)
        if args.once:
            print(f"{taken} run{'s' if taken != 1 else ''} trained", flush=True)
        return 0

    from trainer.cycle import run_cycle

    settings = Settings.model_validate_json(args.settings.read_text())
    status = run_cycle(settings, args.run_id)
    print(f"run {args.run_id}: {status}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
