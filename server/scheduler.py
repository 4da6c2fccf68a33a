"""Nightly retraining: an APScheduler cron job inside the server process.

APScheduler does not coordinate between processes, so every server runs the
scheduler but only the holder of the ``scheduler`` lease acts on a tick (the
others take the lease over if the holder dies). The retrain lease then makes
sure only one cycle runs at a time anyway.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from sqlalchemy.engine import Engine
from sqlmodel import Session

from server.retraining import start_cycle
from store import leases
from store.db import session_scope
from store.examples import count_new_examples
from store.pairs import build_pairs
from store.run_lease import CycleBusy
from store.selection import count_new_pairs
from store.settings import Settings

log = logging.getLogger("tuneloop.scheduler")

LEADER_TTL_S = 90.0
LEADER_RENEW_S = 30.0


def parse_cron(expression: str) -> CronTrigger:
    """A crontab expression (``"0 3 * * *"``) as a trigger; ValueError if malformed."""
    try:
        return CronTrigger.from_crontab(expression, timezone="UTC")
    except ValueError as exc:
        raise ValueError(f"TUNELOOP_RETRAIN_CRON {expression!r} is not a crontab expression: {exc}") from exc


class RetrainScheduler:
    def __init__(self, settings: Settings, db: Engine) -> None:
        self.settings = settings
        self.db = db
        self.identity = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.trigger = parse_cron(settings.retrain_cron)

    def start(self) -> None:
        self.scheduler.add_job(self.tick, self.trigger, id="retrain", max_instances=1, coalesce=True)
        self.scheduler.add_job(self.is_leader, "interval", seconds=LEADER_RENEW_S, id="leader")
        self.scheduler.start()
        log.info("retraining scheduled at %r (UTC)", self.settings.retrain_cron)

    def shutdown(self) -> None:
        self.scheduler.shutdown(wait=False)
        with session_scope(self.db) as session:
            leases.release(session, leases.SCHEDULER, self.identity)

    def next_run_time(self):
        job = self.scheduler.get_job("retrain")
        return job.next_run_time if job else None

    def is_leader(self) -> bool:
        with session_scope(self.db) as session:
            return leases.acquire(session, leases.SCHEDULER, self.identity, LEADER_TTL_S)

    def tick(self) -> int | None:
        """The cron job: start a cycle if this process leads and enough new
        feedback to learn from exists (new pairs, and single thumbs: one each).
        Returns the started run id, or None."""
        if not self.is_leader():
            return None
        with session_scope(self.db) as session:
            build_pairs(session, self.settings.eval_share)
        with Session(self.db) as session:
            pairs = count_new_pairs(session, self.settings.train_on_anonymous)
            thumbs = count_new_examples(session, self.settings.eval_share, self.settings.train_on_anonymous)
        new = pairs + thumbs
        if new < self.settings.min_new_pairs:
            log.info("scheduled retraining skipped: %d new pairs + %d single thumbs < %d (TUNELOOP_MIN_NEW_PAIRS)",
                     pairs, thumbs, self.settings.min_new_pairs)
            return None
        try:
            return start_cycle(self.settings, self.db, "schedule").run_id
        except CycleBusy as busy:
            log.info("scheduled retraining skipped: %s", busy)
            return None
