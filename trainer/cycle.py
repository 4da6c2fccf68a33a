"""One retraining cycle, run in its own process (``python -m trainer run``):

    build pairs -> select new + replay + eval pairs, and new + eval single
    thumbs -> set aside what the trainer cannot use -> reserve vN -> ORPO on
    the pairs, then KTO on the single thumbs, continuing the active adapter ->
    candidate ``adapters/vN`` -> evaluate candidate and active -> gate ->
    promote (flip the active version in the database) or reject.

The caller has already created the ``TrainingRun`` row and taken the
``retrain`` lease for it (``store.run_lease.open_run``). While this runs, a
heartbeat renews the lease and the run's ``heartbeat_at``; if the process is
killed, both go stale and the run is marked failed by whoever looks next. If a
renewal finds the lease gone, the run stops at the next training step, and it
promotes only in a transaction that has checked it still holds the lease.
No single pair can fail a run: one the trainer cannot use is recorded as
``skipped`` with its reason and never picked again.
Serving is never touched from here: registering the candidate and promoting
it signal the servers (``store.adapter_signal``), which load and warm the
candidate while the gate decides and swap to it themselves once it is active.
"""

from __future__ import annotations

import json
import logging
import os
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from store.canary import start_canary, start_watch, training_waits_for
from store.db import make_engine, session_scope
from store.examples import Example, record_examples, select_examples_for_run
from store.exchange.pair_format import Pair
from store.pairs import build_pairs
from store.registry import activate, active_version, register_candidate, reserve_version, version_name
from store.run_lease import Heartbeat, LeaseLost, release_reserved_versions, release_run, still_holds
from store.selection import RunSelection, select_for_run
from store.settings import Settings
from store.tables import AdapterVersion, Message, PreferencePair, TrainingRun, TrainingRunPair, utcnow
from trainer.config import TrainConfig
from trainer.kto import MIN_EXAMPLES

log = logging.getLogger("tuneloop.trainer")

SKIPPED_SHOWN = 50  # skipped pairs listed on the run (all are recorded as role "skipped")


def _update_run(db: Engine, run_id: int, **fields: Any) -> None:
    with session_scope(db) as session:
        run = session.get(TrainingRun, run_id)
        for key, value in fields.items():
            setattr(run, key, value)
        session.add(run)


def _as_training_pairs(session: Session, rows: list[PreferencePair]) -> tuple[list[Pair], dict[int, str]]:
    """Pairs for the trainer, and the reason for each row that cannot be one. An
    answer that stopped at its token limit is marked incomplete (trained and
    scored without an end-of-turn token)."""
    message_ids = {i for r in rows for i in (r.chosen_message_id, r.rejected_message_id) if i is not None}
    cut = set(session.exec(
        select(Message.id).where(col(Message.id).in_(message_ids), Message.finish_reason == "length")
    ).all()) if message_ids else set()
    pairs, problems = [], {}
    for r in rows:
        try:
            pairs.append(Pair(
                prompt=r.prompt, chosen=r.chosen, rejected=r.rejected, pair_id=r.id,
                chosen_complete=r.chosen_message_id not in cut, rejected_complete=r.rejected_message_id not in cut,
            ))
        except ValueError as exc:
            problems[r.id] = str(exc)
    return pairs, problems


def _set_aside_unusable(settings: Settings, config: TrainConfig, *groups: list[Pair]) -> dict[int, str]:
    """Pairs the trainer cannot use (a prompt that does not fit the training
    length even after dropping old turns, ...), with the reason, checked with
    the model's own tokenizer; they are removed from ``groups`` in place."""
    from transformers import AutoTokenizer

    from trainer.orpo import unusable_reason

    tokenizer = AutoTokenizer.from_pretrained(settings.model)
    problems = {}
    for group in groups:
        keep = []
        for pair in group:
            reason = unusable_reason(pair, tokenizer, config)
            if reason is None:
                keep.append(pair)
            else:
                problems[pair.pair_id] = reason
        group[:] = keep
    return problems


def _set_aside_unusable_examples(settings: Settings, config: TrainConfig,
                                 *groups: list[Example]) -> dict[int, str]:
    """The same for single thumbs, by feedback row."""
    from transformers import AutoTokenizer

    from trainer.orpo import fitted_prompt

    tokenizer = AutoTokenizer.from_pretrained(settings.model)
    problems = {}
    for group in groups:
        keep = []
        for example in group:
            reason = fitted_prompt(example.prompt, tokenizer, config)[1]
            if reason is None:
                keep.append(example)
            else:
                problems[example.feedback_id] = reason
        group[:] = keep
    return problems


def _record_selection(session: Session, run_id: int, selection: RunSelection, skipped: dict[int, str]) -> None:
    for role, rows in (("new", selection.new), ("replay", selection.replay), ("eval", selection.eval)):
        for pair in rows:
            session.add(TrainingRunPair(run_id=run_id, pair_id=pair.id, role="skipped" if pair.id in skipped else role))


def run_cycle(settings: Settings, run_id: int) -> str:
    """Run cycle ``run_id`` to its end; return the run's final status
    (``promoted``, ``canary``, ``rejected``, ``skipped``). Raises after marking the run
    ``failed`` (and the version it reserved) if anything goes wrong."""
    db = make_engine(settings.resolved_database_url)
    try:
        with Heartbeat(db, run_id) as heartbeat:
            return _run(settings, db, run_id, heartbeat)
    except BaseException as exc:
        with session_scope(db) as session:
            run = session.get(TrainingRun, run_id)
            run.status, run.finished_at = "failed", utcnow()
            run.error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-4000:]}"
            session.add(run)
            release_reserved_versions(session, run_id, f"its training run failed: {type(exc).__name__}: {exc}")
        raise
    finally:
        with session_scope(db) as session:
            release_run(session, run_id)
        db.dispose()


def _run(settings: Settings, db: Engine, run_id: int, heartbeat: Heartbeat) -> str:
    _update_run(
        db, run_id, status="running", pid=os.getpid(), started_at=utcnow(),
        progress={"phase": "building pairs"},
    )
    config = TrainConfig.from_settings(settings)
    with session_scope(db) as session:
        waits_for = training_waits_for(session)
        if waits_for:
            # its pairs stay new; the next run learns from them and whatever the canary's votes add
            run = session.get(TrainingRun, run_id)
            run.status, run.finished_at, run.progress = "skipped", utcnow(), {"phase": "done"}
            run.metrics = {"reason": f"{waits_for}: training waits for its decision"}
            session.add(run)
            return "skipped"
        report = build_pairs(session, config.eval_share)
    with session_scope(db) as session:
        selection = select_for_run(
            session, config.max_pairs_per_user, config.replay_fraction, seed=run_id,
            max_eval_pairs=config.gate_max_eval_pairs, max_train_pairs=config.max_pairs_per_run,
            include_anonymous=config.train_on_anonymous,
        )
        active = active_version(session)
        parent = (active.version, active.path) if active else (None, None)
        new, skipped = _as_training_pairs(session, selection.new)
        replay, problems = _as_training_pairs(session, selection.replay)
        skipped |= problems
        eval_pairs, problems = _as_training_pairs(session, selection.eval)
        skipped |= problems
        thumbs = select_examples_for_run(
            session, config.eval_share, config.max_pairs_per_user, max_train=config.max_pairs_per_run,
            max_eval=config.gate_max_eval_pairs, include_anonymous=config.train_on_anonymous, seed=run_id,
        )
    if new or replay or eval_pairs:
        skipped |= _set_aside_unusable(settings, config, new, replay, eval_pairs)
    by_feedback = {e.feedback_id: e for e in thumbs.new + thumbs.eval}
    skipped_thumbs = _set_aside_unusable_examples(settings, config, thumbs.new, thumbs.eval) if by_feedback else {}
    trains_thumbs = len(thumbs.new) >= MIN_EXAMPLES
    heartbeat.check()
    with session_scope(db) as session:
        pairs_info = {
            "built": report.to_json(), "new": len(new), "replay": len(replay),
            "eval": len(eval_pairs), "capped_by_user_limit": selection.capped,
            "deferred_by_step_budget": selection.deferred, "skipped": len(skipped),
        }
        examples_info = {
            "new": len(thumbs.new) if trains_thumbs else 0, "waiting": 0 if trains_thumbs else len(thumbs.new),
            "eval": len(thumbs.eval), "capped_by_user_limit": thumbs.capped,
            "deferred_by_step_budget": thumbs.deferred, "skipped": len(skipped_thumbs),
        }
        skipped_info = [{"pair_id": i, "reason": why} for i, why in sorted(skipped.items())[:SKIPPED_SHOWN]]
        run = session.get(TrainingRun, run_id)
        record_examples(session, run_id, "skipped", (by_feedback[i] for i in skipped_thumbs))
        if not new and not trains_thumbs:
            session.add_all(TrainingRunPair(run_id=run_id, pair_id=i, role="skipped") for i in skipped)
            run.status, run.finished_at = "skipped", utcnow()
            run.metrics = {"pairs": pairs_info, "examples": examples_info, "skipped_pairs": skipped_info,
                           "reason": "no new pairs (nor two new single thumbs) since the last promoted run"
                           + (" that the trainer can use" if skipped or skipped_thumbs else "")}
            run.progress = {"phase": "done"}
            session.add(run)
            return "skipped"
        _record_selection(session, run_id, selection, skipped)
        if trains_thumbs:
            record_examples(session, run_id, "new", thumbs.new)
        record_examples(session, run_id, "eval", thumbs.eval)
        row = reserve_version(session, settings.adapters_dir, run_id, parent[0])
        version, out_dir = row.version, Path(row.path)
        run.parent_version = parent[0]
        run.adapter_version = version
        run.metrics = {"pairs": pairs_info, "examples": examples_info, "skipped_pairs": skipped_info, "steps": []}
        session.add(run)

    trained = (["pairs"] if new else []) + (["examples"] if trains_thumbs else [])
    result = _train(settings, db, run_id, parent[1], new + replay, out_dir, config, heartbeat,
                    thumbs.new if trains_thumbs else [])

    _update_run(db, run_id, progress={"phase": "fitting the sanity budget"})
    interpolation = _interpolate(settings, out_dir, config)
    heartbeat.check()
    with session_scope(db) as session:
        register_candidate(session, version)
        run = session.get(TrainingRun, run_id)
        run.progress = {"phase": "evaluating"}
        run.metrics = {**(run.metrics or {}), "interpolation": interpolation}
        session.add(run)

    decision, candidate_metrics, active_metrics = _evaluate(
        settings, parent[1], out_dir, eval_pairs, config, thumbs.eval, trained)
    heartbeat.check()
    # side by side (trainer/side_by_side.py): a display for the run's page; never raises
    from trainer.side_by_side import side_by_side_metrics

    if settings.side_by_side_prompts:
        _update_run(db, run_id, progress={"phase": "answering held-out prompts side by side"})
    shown = side_by_side_metrics(settings.model, parent[1], out_dir, eval_pairs, thumbs.eval,
                                 limit=settings.side_by_side_prompts, seed=run_id)
    heartbeat.check()
    with session_scope(db) as session:
        run = session.get(TrainingRun, run_id)
        run.metrics = {**(run.metrics or {}), **shown}
        session.add(run)

    with session_scope(db) as session:
        if not still_holds(session, run_id):
            raise LeaseLost(f"run {run_id} no longer holds the retrain lease (or was marked failed); no promotion")
        row = session.exec(select(AdapterVersion).where(AdapterVersion.version == version)).one()
        row.metrics = {
            "candidate": candidate_metrics, "active": active_metrics,
            "compared_with": version_name(parent[0]),
            "decision": decision,
        }
        run = session.get(TrainingRun, run_id)
        serving_now = active_version(session, lock=True)
        if decision["promote"] and (serving_now.version if serving_now else None) != parent[0]:
            # someone activated or rolled back meanwhile: their decision stands
            decision["promote"] = False
            decision["reasons"].append("the active adapter changed during the run; not overriding it")
        unchanged = (serving_now.version if serving_now else None) == parent[0]
        users_decide = decision.get("thin_evidence") and unchanged and settings.canary \
            and settings.gate_thin_evidence == "canary"
        if users_decide:
            decision["reasons"].append("too few held-out items to decide offline: users decide on a canary "
                                       "(TUNELOOP_GATE_THIN_EVIDENCE=canary)")
        if (decision["promote"] and settings.canary) or users_decide:
            start_canary(session, row, version_name(parent[0]))  # users decide (store.canary)
            run.status = "canary"
        elif decision["promote"]:
            activate(session, version)
            start_watch(row, version_name(parent[0]), settings)
            run.status = "promoted"
        else:
            row.status = "rejected"
            run.status = "rejected"
        session.add(row)
        run.finished_at = utcnow()
        run.progress = {"phase": "done"}
        run.metrics = {
            **(run.metrics or {}), "train": result, "decision": decision,
            "candidate": candidate_metrics, "active": active_metrics,
        }
        session.add(run)
        return run.status


def _train(settings, db, run_id, parent_path, pairs, out_dir: Path, config, heartbeat: Heartbeat,
           examples: list[Example]) -> dict[str, Any]:
    from trainer.orpo import train_adapter

    steps: list[dict[str, Any]] = []

    def on_step(metrics: dict[str, Any]) -> None:
        heartbeat.check()  # a run that lost its lease stops here
        steps.append(metrics)
        with session_scope(db) as session:
            run = session.get(TrainingRun, run_id)
            run.progress = {
                "phase": "training", "step": metrics.get("step"), "total": metrics.get("total_steps"),
            }
            run.metrics = {**(run.metrics or {}), "steps": list(steps)}
            session.add(run)

    _update_run(db, run_id, progress={"phase": "training", "step": 0})
    result = train_adapter(settings.model, parent_path, pairs, out_dir, config, on_step=on_step, examples=examples)
    summary = asdict(result)
    summary.pop("step_metrics", None)
    return summary


def _interpolate(settings: Settings, out_dir: Path, config: TrainConfig) -> dict[str, Any]:
    """Scale the fresh candidate toward the base model by the largest of
    ``config.interpolation_scales`` that keeps its sanity NLL within the gate's
    budget (``trainer.interpolate``), before anyone can load it."""
    from trainer.evaluate import evaluate_model, load_sanity_set
    from trainer.interpolate import choose_scale, parse_scales, scale_adapter

    scales = parse_scales(config.interpolation_scales)
    if scales == (1.0,):
        return {"scale": 1.0, "trials": []}
    sanity = load_sanity_set()

    def sanity_nll_at(scale: float) -> float:
        return evaluate_model(settings.model, str(out_dir), [], sanity, batch_size=config.eval_batch_size,
                              scale=scale).sanity_nll

    base = evaluate_model(settings.model, None, [], sanity, batch_size=config.eval_batch_size).sanity_nll
    budget = base * (1 + config.gate_sanity_nll_tolerance)
    scale, trials = choose_scale(sanity_nll_at, budget, scales)
    if scale != 1.0:
        scale_adapter(out_dir, scale)
        record_path = out_dir / "training.json"
        record = json.loads(record_path.read_text())
        record["interpolation"] = {"scale": scale, "trials": trials}
        staging = record_path.with_name(".training.json.scaled")
        staging.write_text(json.dumps(record, indent=2, default=str))
        os.replace(staging, record_path)
        log.info("candidate %s scaled to %.2f of its update to fit the sanity budget", out_dir.name, scale)
    return {"scale": scale, "trials": trials, "base_sanity_nll": base, "max_sanity_nll": budget}


def _evaluate(settings, active_path, candidate_path, eval_pairs, config, eval_examples, trained):
    from trainer.evaluate import evaluate_model, gate, load_sanity_set

    sanity = load_sanity_set()
    scored = {"batch_size": config.eval_batch_size, "eval_examples": eval_examples}
    candidate = evaluate_model(settings.model, str(candidate_path), eval_pairs, sanity, **scored)
    active = evaluate_model(settings.model, active_path, eval_pairs, sanity, **scored)
    # The sanity budget is measured from the base model, so drift cannot compound
    # over promotions; single thumbs are scored against it too (the base needs
    # only the sanity set and the held-out thumbs: a few seconds).
    base = active if active_path is None else evaluate_model(settings.model, None, [], sanity, **scored)
    labels = [e.label for e in eval_examples]
    for metrics in (candidate, active):
        metrics.relative_to_base(base.example_logps, labels)
    decision = gate(candidate, active, config, base_sanity_nll=base.sanity_nll, trained=trained)
    return (
        {"promote": decision.promote, "reasons": list(decision.reasons), "numbers": decision.numbers,
         "thin_evidence": decision.thin_evidence},
        candidate.to_dict(),
        active.to_dict(),
    )
