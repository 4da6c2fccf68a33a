"""The application factory: ``create_app(settings)`` wires settings, database,
engine, adapter registry and routes. Nothing is built at import time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import OperationalError

from server.adapter_watcher import watch_active_adapter
from server.adapters import AdapterRegistry
from server.answers import AnswerService
from server.api_key_cache import ApiKeyCache
from server.engine.base import ChatEngine
from server.engine.factory import build_engine
from server.errors import install_error_handlers
from server.feedback_ingest import FeedbackIngest
from server.login_throttle import LoginThrottle
from server.metrics import Metrics, RequestMetrics
from server.middleware import BodySizeLimit, BrowserIdentity
from server.proxies import trusted_networks
from server.rate_limit import GenerationSlots, RateLimiter
from server.referee import keep_refereeing
from server.rendering import STATIC_DIR, make_templates
from server.routes import accounts, admin, comparisons, feedback, health, openai_api, pages
from server.scheduler import RetrainScheduler
from server.security_headers import SecurityHeaders
from server.timeouts import BodyReadTimeout
from server.upload_gate import AdminBeforeUpload
from store.db import make_engine, session_scope, upgrade
from store.presence import RENEW_S as PRESENCE_RENEW_S
from store.run_lease import reap_stale_runs
from store.settings import Settings
from store.writer_process import make_feedback_writer

log = logging.getLogger("tuneloop.app")


def create_app(
    settings: Settings | None = None, engine: ChatEngine | None = None, migrate: bool = True
) -> FastAPI:
    """Build the app. Pass ``engine`` to share one already-started engine (tests);
    otherwise the app starts and stops its own in the background on start-up."""
    settings = settings or Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = make_engine(settings.resolved_database_url, settings.db_busy_timeout_seconds)
    if migrate:
        upgrade(settings.resolved_database_url)
    owns_engine = engine is None
    chat_engine = engine or build_engine(settings)
    adapters = AdapterRegistry(chat_engine, db, settings.max_lora_rank, keep_loaded=settings.max_loras)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        answers: AnswerService = app.state.answers
        try:
            recovered = await asyncio.to_thread(answers.announce)
            if recovered:
                log.info("%d answers abandoned by a stopped server will be regenerated", recovered)
            await asyncio.to_thread(_reap_stale_runs, db)
            first_presence = PRESENCE_RENEW_S
        except OperationalError as exc:  # a locked or unreachable database must not stop the server starting
            log.warning("start-up bookkeeping postponed, the database is busy: %s", exc.orig)
            first_presence = 1.0
        presence = asyncio.create_task(answers.keep_presence(first_presence))
        app.state.feedback.start()  # the writer process spawns now, not on the first thumb
        startup = asyncio.create_task(
            _start_serving(chat_engine, adapters, owns_engine, settings.adapter_poll_seconds, db.url)
        )
        refereeing = asyncio.create_task(keep_refereeing(db, settings))
        scheduler = RetrainScheduler(settings, db) if settings.scheduler else None
        if scheduler:
            scheduler.start()
        app.state.scheduler = scheduler
        try:
            yield
        finally:
            startup.cancel()
            presence.cancel()
            refereeing.cancel()
            await app.state.feedback.close()  # what was accepted is committed before the database goes
            try:
                await asyncio.to_thread(answers.withdraw)
            except OperationalError:  # the presence lease expires by itself within store.presence.TTL_S
                log.warning("could not withdraw this server's presence; it expires by itself")
            if scheduler:
                scheduler.shutdown()
            if owns_engine:
                await chat_engine.shutdown()
            db.dispose()

    app = FastAPI(
        title="tuneloop", version="0.1.0", lifespan=lifespan, openapi_url="/openapi.json" if settings.api_docs else None
    )
    app.state.settings = settings
    app.state.db = db
    app.state.engine = chat_engine
    app.state.adapters = adapters
    metrics = Metrics(
        db, active_adapter=lambda: adapters.active, engine_ready=lambda: chat_engine.ready,
        adapter_switches=lambda: adapters.switches,
    )
    app.state.metrics = metrics
    trusted_networks(settings)  # a bad TUNELOOP_TRUSTED_PROXIES fails here, not on the first request
    app.state.rate_limiter = RateLimiter(settings)
    app.state.generation_slots = GenerationSlots(settings.max_concurrent_generations)
    app.state.answers = AnswerService(
        settings, chat_engine, db, adapters, metrics, slots=app.state.generation_slots
    )
    app.state.api_key_cache = ApiKeyCache(settings.api_key_cache_seconds)
    app.state.feedback = FeedbackIngest(make_feedback_writer(db, settings.eval_share, settings.feedback_writer))
    app.state.templates = make_templates()
    app.state.login_throttle = LoginThrottle(settings.rate_limit_storage)
    app.state.started_at = time.time()

    install_error_handlers(app)
    for router in (
        health.router, openai_api.router, feedback.router, comparisons.router, *admin.ROUTERS, accounts.router,
        pages.router,
    ):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    app.add_middleware(BrowserIdentity, secret_key=settings.secret_key, secure=settings.env == "production")
    app.add_middleware(
        BodySizeLimit, max_bytes=settings.max_request_bytes,
        larger={"/api/admin/import": (settings.max_import_bytes, "TUNELOOP_MAX_IMPORT_BYTES")},
    )
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.add_middleware(AdminBeforeUpload, settings=settings, db=db)
    app.add_middleware(BodyReadTimeout, seconds=settings.body_timeout_seconds)
    app.add_middleware(SecurityHeaders)
    return app


def _reap_stale_runs(db: Engine) -> None:
    with session_scope(db) as session:
        reap_stale_runs(session)


async def _start_serving(
    engine: ChatEngine, adapters: AdapterRegistry, owns_engine: bool, poll_seconds: float, database_url: URL
) -> None:
    """Start the engine (vLLM takes ~40 s on CPU: the port is open meanwhile and
    /healthz says "starting"), then keep it on the adapter the database calls
    active for as long as the server runs (told of every change at once,
    re-reading every ``poll_seconds`` regardless)."""
    if owns_engine:
        try:
            await engine.start()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("engine start-up failed; /healthz reports it and requests get 503")
            return
    await watch_active_adapter(adapters, poll_seconds, database_url)
