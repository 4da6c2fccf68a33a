"""``GET /healthz``: is the engine serving, which model, which adapter."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    engine = request.app.state.engine
    adapter = request.app.state.adapters.active
    body = {
        "status": "ok" if engine.ready else getattr(engine, "state", "unavailable"),
        "engine": engine.name,
        "model": engine.model,
        "adapter": adapter.name if adapter else None,
    }
    return JSONResponse(body, status_code=200 if engine.ready else 503)
