"""Keeps this server's engine on the adapter the database calls active.

Promotion, activation and rollback only change the database; each server
process polls it and swaps itself (load + warm first, then switch; answers
already streaming finish on their adapter). If a version will not load, this
server records the failure and keeps serving the adapter it had; once every
live server has failed to load it (one server alone: at once), it is marked
``failed`` and the database falls back to the version before it, so serving
stays on a working adapter without anyone watching (``store.load_failures``).
"""

from __future__ import annotations

import asyncio
import logging

from server.adapters import AdapterRegistry
from server.engine.base import AdapterLoadError, EngineUnavailable

log = logging.getLogger("tuneloop.adapter_watcher")


async def sync_once(registry: AdapterRegistry) -> bool:
    """Swap to the database's active adapter if it differs; True if it swapped."""
    # Database calls run in a thread: a locked database must not stall streaming.
    wanted = await asyncio.to_thread(registry.active_in_db)
    if wanted == registry.active:
        return False
    if wanted is not None and await asyncio.to_thread(registry.already_failed, wanted):
        return False  # not again; the previous adapter keeps serving here
    try:
        await registry.switch_to(wanted)
    except AdapterLoadError as exc:
        if wanted is None:
            raise
        failed = await asyncio.to_thread(registry.record_failure, wanted, str(exc))
        if failed:
            log.error("adapter %s failed to load on every live server, rolled back: %s", wanted.name, exc)
        else:
            log.error("adapter %s failed to load here; serving %s meanwhile: %s", wanted.name,
                      registry.active.name if registry.active else "the base model", exc)
        return False
    return True


async def watch_active_adapter(registry: AdapterRegistry, poll_seconds: float) -> None:
    while True:
        try:
            await sync_once(registry)
        except EngineUnavailable:
            pass  # the engine is (re)starting; try again on the next tick
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("adapter sync failed; retrying")
        await asyncio.sleep(poll_seconds)
