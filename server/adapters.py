"""The adapter in service, and switching it.

Every adapter version ``vN`` has its own immutable directory, engine name and
LoRA id (= N), because vLLM never re-reads an id it has already loaded.
Switching loads and warms the new version first and only then points new
requests at it; answers already streaming finish on the adapter they started
with (``AnswerService`` pins it when it claims a message).
"""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy.engine import Engine
from sqlmodel import Session

from server.engine.base import AdapterLoadError, AdapterRef, ChatEngine
from store.adapter_files import AdapterFilesError, check_servable
from store.db import session_scope
from store.load_failures import failed_here, record_load_failure, settle
from store.presence import new_claim_id
from store.registry import active_version
from store.tables import AdapterVersion

log = logging.getLogger("tuneloop.adapters")


def adapter_ref(row: AdapterVersion) -> AdapterRef:
    return AdapterRef(name=row.name, lora_id=row.version, path=row.path)


class AdapterRegistry:
    """Holds the active adapter of this server process (None = base model)."""

    def __init__(self, engine: ChatEngine, db: Engine, max_rank: int = 16, replica: str | None = None) -> None:
        self.engine = engine
        self.db = db
        self.max_rank = max_rank
        # this process's presence claim id: the name its load failures are recorded under
        self.replica = replica or new_claim_id()
        self.active: AdapterRef | None = None
        self.switches = 0  # times this server changed the adapter it serves (a metric)
        self._switch_lock = asyncio.Lock()

    def active_in_db(self) -> AdapterRef | None:
        with Session(self.db) as session:
            row = active_version(session)
            return adapter_ref(row) if row else None

    def already_failed(self, ref: AdapterRef) -> bool:
        """Whether this replica already failed to load ``ref`` since it was
        activated; if so, fail the version once every live replica has too
        (``store.load_failures``) instead of loading it again."""
        with session_scope(self.db) as session:
            if not failed_here(session, ref.lora_id, self.replica):
                return False
            settle(session, ref.lora_id, self.replica)
            return True

    def record_failure(self, ref: AdapterRef, error: str) -> bool:
        """Record that this replica could not load ``ref``; True when the version
        is now failed (every live replica failed it) and the database rolled back."""
        with session_scope(self.db) as session:
            return record_load_failure(session, ref.lora_id, self.replica, error)

    async def switch_to(self, ref: AdapterRef | None) -> None:
        """Load and warm ``ref`` in the engine, then serve new requests with it.
        Raises AdapterLoadError (and keeps the current adapter) if it won't load."""
        async with self._switch_lock:
            if ref is not None and ref != self.active:
                try:
                    await asyncio.to_thread(check_servable, ref.path, self.max_rank)
                except AdapterFilesError as exc:
                    raise AdapterLoadError(str(exc)) from exc
                await self.engine.load_adapter(ref)
            previous, self.active = self.active, ref
            if previous != ref:
                self.switches += 1
                log.info("serving adapter %s (was %s)", ref.name if ref else "base", previous)
