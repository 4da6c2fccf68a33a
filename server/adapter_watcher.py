"""Keeps this server's engine on the adapter the database calls active.

Promotion, activation and rollback only change the database; each server
process polls it and swaps itself (load + warm first, then switch; answers
already streaming finish on their adapter). If a version will not load, it is
marked ``failed`` and the database falls back to the version before it, so
serving stays on a working adapter without anyone watching.
"""

from __future__ import annotations

import asyncio
import logging

from server.adapters import AdapterRegistry
from server.engine.base import AdapterLoadError, EngineUnavailable
from store.db import session_scope
from store.registry import mark_failed

log = logging.getLogger("tuneloop.adapter_watcher")


async def sync_once(registry: AdapterRegistry) -> bool:
    """Swap to the database's active adapter if it differs; True if it swapped."""
    wanted = await asyncio.to_thread(registry.active_in_db)  # a locked database must not stall streaming
    if wanted == registry.active:
        return False
    try:
        await registry.switch_to(wanted)
    except AdapterLoadError as exc:
        log.error("adapter %s failed to load, falling back: %s", wanted.name if wanted else None, exc)
        if wanted is not None:
            with session_scope(registry.db) as session:
                mark_failed(session, wanted.lora_id, str(exc))
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
