"""What this server's engine serves, and through which replicas.

JSON: ``GET /api/admin/engine``: the engine kind, model, the version served and
the one beside it, and with ``TUNELOOP_ENGINE=openai`` each vLLM replica as
this server sees it (healthy, in rotation, requests outstanding, adapters
loaded, last error) -- what a platform engineer watches while a fleet rolls out
a version or loses a replica. Replica URLs are internal addresses, so they are
shown to admins only, never on the public ``/healthz``.
"""

from __future__ import annotations

from typing import Any

from server.deps import AdaptersDep, AdminDep, EngineDep
from server.routes.admin.dashboard import api_router

api = api_router()


@api.get("/engine")
async def engine_state(_: AdminDep, engine: EngineDep, adapters: AdaptersDep) -> dict[str, Any]:
    active, beside = adapters.active, adapters.challenger()
    replicas = getattr(engine, "replicas", None)
    return {
        "engine": engine.name, "model": engine.model, "ready": engine.ready,
        "adapter": active.name if active else None,
        "beside": beside.name if beside else None,
        "replicas": replicas() if callable(replicas) else None,
    }
