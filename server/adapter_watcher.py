"""Keeps this server's engine on the adapter the database calls active.

Promotion, activation and rollback only change the database, and the change
signals every server when it commits (``store.adapter_signal``: PostgreSQL
``LISTEN/NOTIFY``, or the SQLite signal file). On a signal -- or, should one
be lost, every ``TUNELOOP_ADAPTER_POLL_SECONDS`` -- this server re-reads the
registry and swaps itself: a flip when the version is already loaded
(candidates and rollback targets are preloaded, ``server.adapters``), else
load + warm first, then switch; answers already streaming finish on their
adapter. If a version will not load, this server records the failure and
keeps serving the adapter it had; once every live server has failed to load
it (one server alone: at once), it is marked ``failed`` and the database falls
back to the version before it, so serving stays on a working adapter without
anyone watching (``store.load_failures``).
"""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy.engine import URL

from server.adapters import AdapterRegistry
from server.engine.base import AdapterLoadError, AdapterRef, EngineUnavailable
from store.adapter_signal import listen_for_changes

log = logging.getLogger("tuneloop.adapter_watcher")

RETRY_S = 1.0  # after a failed sync (engine restarting, database busy), at the latest


async def sync_once(registry: AdapterRegistry) -> bool:
    """Swap to the database's active adapter if it differs, and start preloading
    the versions to keep loaded beside it; True if it swapped."""
    # Database calls run in a thread: a locked database must not stall streaming.
    wanted, keep, beside = await asyncio.to_thread(registry.plan_in_db)
    swapped = await _follow(registry, wanted)
    registry.preload(keep)
    _serve_beside(registry, beside)
    return swapped


def _serve_beside(registry: AdapterRegistry, beside: tuple[AdapterRef, str] | None) -> None:
    """Serve the canary (or the watched promotion's previous version) beside
    the active one, in the background (``AdapterRegistry.follow_beside``); one
    that won't load here only means no A/B turns of the two from this server:
    the canary is judged on the other servers' votes, or ends at its limit."""
    ref, role = beside if beside is not None and beside[0] != registry.active else (None, None)
    registry.follow_beside(ref, role)


async def _follow(registry: AdapterRegistry, wanted: AdapterRef | None) -> bool:
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


async def watch_active_adapter(registry: AdapterRegistry, poll_seconds: float, database_url: str | URL) -> None:
    """Sync on every change signal from the database at ``database_url``, and
    every ``poll_seconds`` without one; until cancelled."""
    async with listen_for_changes(database_url) as changes:
        try:
            while True:
                wait = poll_seconds
                try:
                    await sync_once(registry)
                except EngineUnavailable:
                    wait = min(poll_seconds, RETRY_S)  # the engine is (re)starting
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("adapter sync failed; retrying")
                    wait = min(poll_seconds, RETRY_S)
                await changes.wait(wait)
        finally:
            registry.cancel_preloads()
