"""``GET /healthz``: is the engine serving, which model, which adapter."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from server.deps import AdaptersDep, EngineDep, MetricsDep
from server.metrics import CONTENT_TYPE

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz(engine: EngineDep, adapters: AdaptersDep) -> JSONResponse:
    adapter = adapters.active
    challenger = adapters.challenger()
    body = {
        "status": "ok" if engine.ready else getattr(engine, "state", "unavailable"),
        "engine": engine.name,
        "model": engine.model,
        "adapter": adapter.name if adapter else None,
        # the canary (or a watched promotion's previous version) served beside it, for A/B turns of the two
        "beside": {"adapter": challenger.name, "role": adapters.beside_role} if challenger else None,
    }
    return JSONResponse(body, status_code=200 if engine.ready else 503)


@router.get("/metrics")
def metrics(metrics: MetricsDep) -> Response:
    """Prometheus text format (see server/metrics.py for what each series means).
    Open like /healthz: it holds counts, never content; restrict it at the proxy if needed."""
    return Response(metrics.render(), media_type=CONTENT_TYPE)
