"""Starting retraining cycles, from the scheduler, the admin API or the CLI.

``start_cycle`` opens a run under the retrain lease (``store.run_lease``: of two
requests at once exactly one gets a run, the other ``CycleBusy``, even across
server processes). Where it trains depends on ``TUNELOOP_TRAINER``:

- ``local`` (the embedded default): this server starts the trainer as a child
  process (``store.run_process``); a crash there never touches serving.
- ``workers``: the run is only queued; a ``tuneloop trainer`` worker on any
  machine that reaches the database and the shared data folder (the GPU box)
  claims it (``trainer.worker``). A run nobody claims within
  ``TUNELOOP_TRAINER_CLAIM_MINUTES`` is failed, saying so.
"""

from __future__ import annotations

from sqlalchemy.engine import Engine

from store.run_lease import open_run
from store.run_process import StartedCycle, spawn_cycle
from store.settings import Settings

__all__ = ["StartedCycle", "start_cycle"]


def start_cycle(settings: Settings, db: Engine, trigger: str) -> StartedCycle:
    """Create a run, take the lease, and start the trainer for it (or queue it
    for the workers). Raises CycleBusy if another cycle holds the lease."""
    if settings.trainer == "workers":
        run_id = open_run(db, trigger, claim_within_s=settings.trainer_claim_minutes * 60)
        return StartedCycle(run_id=run_id, process=None, log_path=None)
    return spawn_cycle(settings, db, open_run(db, trigger))
