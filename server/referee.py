"""Every server looks at the canary and the post-promotion watch every
``TUNELOOP_CANARY_CHECK_SECONDS`` (``store.canary.referee``): decisions must
happen with nobody watching. Each decision locks the active version's row, so
several servers looking at once decide once."""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy.engine import Engine

from store.canary import referee
from store.settings import Settings

log = logging.getLogger("tuneloop.referee")


async def keep_refereeing(db: Engine, settings: Settings) -> None:
    """Until cancelled; the database work runs in a thread, off the event loop."""
    while True:
        for happened in await asyncio.to_thread(referee, db, settings):
            log.info("%s", happened)
        await asyncio.sleep(settings.canary_check_seconds)
