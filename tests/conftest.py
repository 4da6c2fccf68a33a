"""Shared fixtures.

Each test gets its own database (a fresh SQLite file, or a fresh PostgreSQL
database for tests parametrised over both). The real vLLM engine is started
once per test session (``tests/support/fixtures.py``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from store.settings import Settings

pytest_plugins = ["tests.support.fixtures"]

POSTGRES_ADMIN_URL = os.environ.get(
    "TUNELOOP_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REPO = Path(__file__).resolve().parent.parent


def make_settings(tmp_path: Path, **overrides) -> Settings:
    values = {
        "data_dir": tmp_path / "data",
        "engine": "fake",
        "ab_rate": 0.0,
        # promotion by the offline gate alone; the canary tests switch it on
        "canary": False,
        "watch_answers": 0,
        # ~20-40 s of generation per real run; tests/trainer/test_side_by_side.py and one real cycle cover it
        "side_by_side_prompts": 0,
        "default_max_tokens": 8,
        "scheduler": False,
        # Tests send many requests per identity, some at once: the limits are off
        # here and switched on by the tests about them (tests/server/test_rate_limits.py).
        "rate_limits": False,
        "max_concurrent_generations": 0,
        "model": os.environ.get("TUNELOOP_MODEL", str(REPO / "models/smollm2-135m-instruct")),
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


def _postgres_database() -> Iterator[str]:
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"tuneloop_test_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # pragma: no cover - environment problem, not a test result
        pytest.fail(f"PostgreSQL at {POSTGRES_ADMIN_URL} is needed for this test: {exc}")
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: SQLite file, then PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
    else:
        yield from _postgres_database()
