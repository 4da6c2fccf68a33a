"""The JSON shapes of the admin API: a training run, an adapter version (with
the servers that could not load it), and an adapter's lineage. Plain
functions of store rows, shared by the JSON routes and the dashboard pages
that show the same data."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlmodel import Session

from store.canary import canary_status, watch_status
from store.load_failures import load_failures
from store.presence import live_claims
from store.registry import active_version, lineage_examples, lineage_pairs, version_name
from store.settings import Settings
from store.tables import AdapterVersion, TrainingRun


def run_json(run: TrainingRun) -> dict[str, Any]:
    return {
        "id": run.id, "status": run.status, "trigger": run.trigger, "progress": run.progress,
        "metrics": run.metrics, "error": run.error, "adapter_version": _name(run.adapter_version),
        "parent_version": _name(run.parent_version), "worker": run.worker,
        "created_at": _iso(run.created_at), "started_at": _iso(run.started_at),
        "finished_at": _iso(run.finished_at), "heartbeat_at": _iso(run.heartbeat_at),
    }


def adapter_json(row: AdapterVersion) -> dict[str, Any]:
    return {
        "version": row.name, "status": row.status, "path": row.path,
        "parent_version": _name(row.parent_version), "training_run_id": row.training_run_id,
        "metrics": row.metrics, "error": row.error,
        "created_at": _iso(row.created_at), "activated_at": _iso(row.activated_at),
    }


def adapter_detail_json(session: Session, row: AdapterVersion) -> dict[str, Any]:
    """:func:`adapter_json` plus ``load_failures``: each server (replica) that
    could not load the version since it was last activated, and whether that
    server is live now. While any live server has no failure, the version stays
    active there (``store.load_failures``)."""
    live = live_claims(session)
    return {
        **adapter_json(row),
        "load_failures": [
            {"server": f.replica, "live": f.replica in live, "error": f.error, "failed_at": _iso(f.failed_at)}
            for f in load_failures(session, row.version)
        ],
    }


def lineage_json(session: Session, row: AdapterVersion) -> dict[str, Any]:
    """The version (with its load failures), its parent, its run and evaluation,
    the pairs it trained on with the feedback rows they came from, and the
    single thumbs it trained on (KTO) with the label each had then."""
    run = session.get(TrainingRun, row.training_run_id) if row.training_run_id else None
    return {
        "adapter": adapter_detail_json(session, row),
        "parent": _name(row.parent_version),
        "run": run_json(run) if run else None,
        "evaluation": row.metrics,
        "pairs": [
            {
                "id": pair.id, "role": link.role, "source": pair.source, "split": pair.split,
                "user_id": pair.user_id, "comparison_id": pair.comparison_id,
                "chosen_message_id": pair.chosen_message_id, "rejected_message_id": pair.rejected_message_id,
                "chosen_feedback_id": pair.chosen_feedback_id, "rejected_feedback_id": pair.rejected_feedback_id,
            }
            for link, pair in lineage_pairs(session, row)
        ],
        "single_thumbs": [
            {"feedback_id": feedback.id, "role": link.role, "label": "up" if link.label else "down",
             "rating_now": feedback.rating, "user_id": feedback.user_id, "message_id": feedback.message_id}
            for link, feedback in lineage_examples(session, row)
        ],
    }


def _name(version: int | None) -> str | None:
    return version_name(version) if version is not None else None


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def trials_json(session: Session, settings: Settings) -> dict[str, Any]:
    """The running canary and the watch of the active version, each with the
    test's verdict so far (null when none runs)."""
    canary = canary_status(session, settings)
    watch = watch_status(session, settings, active_version(session))
    return {"canary": canary.to_json() if canary else None, "watch": watch.to_json() if watch else None}
