"""The adapter in service, switching it, and the adapters kept loaded beside it.

Every adapter version ``vN`` has its own immutable directory, engine name and
LoRA id (= N), because vLLM never re-reads an id it has already loaded.
Switching loads and warms the new version first and only then points new
requests at it; answers already streaming finish on the adapter they started
with (``AnswerService`` pins it when it claims a message).

Preloading makes a switch a pointer flip: the versions worth having ready --
the candidate the gate is deciding on, the version a rollback returns to
(``store.registry.versions_to_keep_loaded``) -- are loaded and warmed in the
background (``ChatEngine.preload_adapter``) without changing what serves. At
most ``TUNELOOP_MAX_LORAS`` adapters, the active one included, are counted as
loaded, least recently used forgotten first, as the engine's own LoRA cache
evicts; switching to one counted as loaded calls nothing in the engine. A
version that failed to preload fails its switch the same way, without a
second try, and the failure is recorded as for any load (``store.load_failures``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

from sqlalchemy.engine import Engine
from sqlmodel import Session

from server.engine.base import AdapterLoadError, AdapterRef, ChatEngine, EngineUnavailable
from store.adapter_files import AdapterFilesError, check_servable
from store.canary import beside_version
from store.db import session_scope
from store.load_failures import failed_here, record_load_failure, settle
from store.presence import new_claim_id
from store.registry import active_version, versions_to_keep_loaded
from store.tables import AdapterVersion

log = logging.getLogger("tuneloop.adapters")


def adapter_ref(row: AdapterVersion) -> AdapterRef:
    return AdapterRef(name=row.name, lora_id=row.version, path=row.path)


class AdapterRegistry:
    """Holds the active adapter of this server process (None = base model) and
    the adapters loaded beside it. ``keep_loaded``: how many adapters the
    engine keeps loaded at once (``TUNELOOP_MAX_LORAS``)."""

    def __init__(
        self, engine: ChatEngine, db: Engine, max_rank: int = 16, replica: str | None = None, keep_loaded: int = 3
    ) -> None:
        self.engine = engine
        self.db = db
        self.max_rank = max_rank
        # this process's presence claim id: the name its load failures are recorded under
        self.replica = replica or new_claim_id()
        self.active: AdapterRef | None = None
        self.switches = 0  # times this server changed the adapter it serves (a metric)
        self.keep_loaded = max(1, keep_loaded)
        self._switch_lock = asyncio.Lock()
        self._preload_lock = asyncio.Lock()
        # loaded and warmed in the engine, least recently used first
        self._loaded: OrderedDict[int, AdapterRef] = OrderedDict()
        self._preloads: dict[int, asyncio.Task[None]] = {}
        self._preload_errors: dict[AdapterRef, str] = {}
        self.beside: AdapterRef | None = None  # served beside the active one (store.canary)
        self.beside_role: str | None = None  # "canary" | "watch"
        self._beside_lock = asyncio.Lock()
        self._beside_errors: dict[AdapterRef, str] = {}
        self._beside_task: asyncio.Task[None] | None = None

    def plan_in_db(self) -> tuple[AdapterRef | None, list[AdapterRef], tuple[AdapterRef, str] | None]:
        """The version the database calls active, those to keep loaded beside it,
        and the one to serve beside it for A/B turns of the two with its role
        (``"canary"``, or ``"watch"``: the version a watched promotion replaced;
        ``store.canary``)."""
        with Session(self.db) as session:
            row = active_version(session)
            keep = versions_to_keep_loaded(session, row)
            beside = beside_version(session, row)
            return ((adapter_ref(row) if row else None), [adapter_ref(r) for r in keep],
                    (adapter_ref(beside[0]), beside[1]) if beside else None)

    async def serve_beside(self, ref: AdapterRef | None, role: str | None = None) -> None:
        """Serve ``ref`` beside the active adapter (None: nothing), so A/B turns
        can pit the two (``ChatEngine.serve_beside``). Raises AdapterLoadError
        (nothing is served beside then) or EngineUnavailable."""
        async with self._beside_lock:
            if ref == self.beside and self.engine.serving_beside() == ref:
                self.beside_role = role
                return
            if ref is not None and ref in self._beside_errors:
                return  # failed here before: not again every sync (the error was logged)
            self.beside = None  # no turn is routed to it while it changes
            try:
                if ref is not None:
                    await self._check(ref)
                await self.engine.serve_beside(ref)
            except AdapterLoadError as exc:
                if ref is not None:
                    self._beside_errors[ref] = str(exc)
                raise
            self.beside, self.beside_role = ref, role
            log.info("serving %s beside the active adapter (%s)", ref.name if ref else "nothing", role)

    def follow_beside(self, ref: AdapterRef | None, role: str | None = None) -> None:
        """:meth:`serve_beside` in the background: starting a second engine can
        take a minute, and a promotion or rollback must not wait behind it. One
        at a time; a change asked for meanwhile is taken up by the next sync."""
        task = self._beside_task
        if task is not None and not task.done():
            return
        if ref == self.beside and self.engine.serving_beside() == ref:
            self.beside_role = role
            return
        self._beside_task = asyncio.create_task(self._serve_beside_logged(ref, role), name="serve-beside")

    async def _serve_beside_logged(self, ref: AdapterRef | None, role: str | None) -> None:
        try:
            await self.serve_beside(ref, role)
        except AdapterLoadError as exc:
            log.error("cannot serve %s beside the active adapter here: %s", ref.name if ref else None, exc)
        except EngineUnavailable:
            pass  # the engine is (re)starting; the next sync tries again
        except Exception:
            log.exception("serving %s beside the active adapter failed", ref.name if ref else None)

    def challenger(self) -> AdapterRef | None:
        """The version A/B turns may pit against the active one now: served
        beside and ready (None: ordinary turns only)."""
        ref = self.beside
        return ref if ref is not None and ref != self.active and self.engine.serving_beside() == ref else None

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

    def is_loaded(self, ref: AdapterRef) -> bool:
        """Whether ``ref`` is loaded and warm here: switching to it is a pointer flip."""
        return self._loaded.get(ref.lora_id) == ref

    async def switch_to(self, ref: AdapterRef | None) -> None:
        """Serve new requests with ``ref``, loading and warming it first unless it
        is loaded already. Raises AdapterLoadError (and keeps the current
        adapter) if it won't load."""
        async with self._switch_lock:
            if ref is not None and ref != self.active and not self.is_loaded(ref):
                await self._load(ref)
            # New requests pin ``ref`` from here on; an engine serving merged
            # weights swaps them now (answers in flight finish first).
            previous, self.active = self.active, ref
            try:
                await self.engine.serve(ref)
            except BaseException:
                self.active = previous
                raise
            if ref is not None:
                self._remember(ref)
            if previous != ref:
                self.switches += 1
                log.info("serving adapter %s (was %s)", ref.name if ref else "base", previous)

    def preload(self, refs: list[AdapterRef]) -> None:
        """Load and warm ``refs`` (most wanted first) in the background, one at a
        time, as far as there is room beside the active adapter; what serves
        does not change. Errors are kept for :meth:`switch_to`, never raised."""
        room = self.keep_loaded - (self.active is not None)
        for ref in refs[:max(room, 0)]:
            if ref == self.active or self.is_loaded(ref) or ref.lora_id in self._preloads \
                    or ref in self._preload_errors:
                continue
            self._preloads[ref.lora_id] = asyncio.create_task(self._preload(ref), name=f"preload-{ref.name}")

    def cancel_preloads(self) -> None:
        for task in (*self._preloads.values(), self._beside_task):
            if task is not None:
                task.cancel()

    async def _load(self, ref: AdapterRef) -> None:
        pending = self._preloads.get(ref.lora_id)
        if pending is not None:
            await asyncio.shield(pending)  # it records its own errors
            if self.is_loaded(ref):
                return
        error = self._preload_errors.pop(ref, None)
        if error is not None:
            raise AdapterLoadError(error)
        await self._check(ref)
        await self.engine.load_adapter(ref)
        self._remember(ref)

    async def _preload(self, ref: AdapterRef) -> None:
        try:
            async with self._preload_lock:
                await self._check(ref)
                if await self.engine.preload_adapter(ref):
                    self._remember(ref)
                    log.info("adapter %s loaded and warm, ready to serve", ref.name)
        except AdapterLoadError as exc:
            self._preload_errors[ref] = str(exc)
            log.warning("adapter %s could not be preloaded (a switch to it will fail here): %s", ref.name, exc)
        except EngineUnavailable:
            pass  # the engine is (re)starting; the next sync tries again
        except Exception:
            log.exception("preloading adapter %s failed", ref.name)
        finally:
            self._preloads.pop(ref.lora_id, None)

    async def _check(self, ref: AdapterRef) -> None:
        try:
            await asyncio.to_thread(check_servable, ref.path, self.max_rank)
        except AdapterFilesError as exc:
            raise AdapterLoadError(str(exc)) from exc

    def _remember(self, ref: AdapterRef) -> None:
        """Count ``ref`` as loaded and most recently used (the active adapter
        stays most recent: every request uses it); forget the least recently
        used beyond ``keep_loaded``, as the engine's LoRA cache evicts them."""
        self._loaded[ref.lora_id] = ref
        self._loaded.move_to_end(ref.lora_id)
        if self.active is not None and self._loaded.get(self.active.lora_id) == self.active:
            self._loaded.move_to_end(self.active.lora_id)
        while len(self._loaded) > self.keep_loaded:
            self._loaded.popitem(last=False)
