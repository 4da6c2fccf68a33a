"""The admin side, one module per resource, each holding the resource's JSON
API (``/api/admin/...``) and its dashboard pages (``/admin/...``) side by side:

- ``session``: sign in and out of the dashboard;
- ``feedback``: the feedback overview, conversations, preference pairs;
- ``datasets``: export and import of pair files;
- ``runs``: retraining cycles and their runs;
- ``adapters``: adapter versions, activation, rollback, lineage;
- ``keys``: API keys;
- ``users``: accounts, the busiest identities, exclusion from training;
- ``leaderboard``: versions ranked by the A/B votes between them;
- ``canary``: the canary and the post-promotion watch, ending a canary by hand;
- ``engine``: what this server's engine serves, and its vLLM replicas.

``shapes`` holds the JSON shapes they share; ``dashboard`` the routers and the
sign-in redirect every page route uses.
"""

from __future__ import annotations

from fastapi import APIRouter

from server.routes.admin import (
    adapters,
    canary,
    datasets,
    engine,
    feedback,
    keys,
    leaderboard,
    runs,
    session,
    users,
)

ROUTERS: tuple[APIRouter, ...] = (
    runs.api, adapters.api, canary.api, datasets.api, users.api, leaderboard.api, engine.api,
    session.pages, feedback.pages, runs.pages, adapters.pages, keys.pages, users.pages, leaderboard.pages,
    canary.pages,
)
