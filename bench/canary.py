"""Do users decide? The canary and the post-promotion watch, through the real loop.

A real tuneloop (vLLM engine, trainer processes, the referee) on a fresh data
directory, driven only through its HTTP API by simulated users with the hidden
taste of ``bench/learning.py`` (``--taste``, default to-the-point: the first
sentence has at most 10 words). Every candidate that passes the offline gate
becomes a canary (``TUNELOOP_CANARY=true``), served beside the active version;
the referee looks every second (``TUNELOOP_CANARY_CHECK_SECONDS=1``). Three
scenarios, in order, each on the version the previous one left active:

a. **A good candidate is promoted.** Feedback from users with the taste
   (``learning.mixed_feedback``: A/B turns and thumbs on sibling answers),
   ``POST /api/admin/retrain`` (the ordinary offline gate) -> the run ends
   ``canary``. Then voters with the same taste answer explicit canary A/B turns
   (``POST /api/comparisons {"canary": true}`` on held-out prompts, then
   ``/choice`` by their taste; both answers sampled as the web chat samples,
   temperature 0.7, 24 tokens), round-robin so that each voter's first
   ``TUNELOOP_CANARY_VOTES_PER_USER`` (10) votes are spread over the trial,
   until the referee decides (a trial that spends its vote budget undecided
   is rejected by hand and reported ``undecided``). Expected: ``promoted``.
b. **A bad candidate is rejected and never serves.** Feedback with the
   *reversed* taste, and the offline gate opened by a bench-only override
   (``BAD_CANDIDATE_GATE``: any margin, accuracy and sanity NLL pass) -> canary.
   Voters with the true taste judge it against the active version. Expected:
   ``rejected``, and never active (no ``activated_at``; ``/healthz`` never named it).
c. **A promotion that gets worse is rolled back.** Raters give honest thumbs on
   the active version's answers (one answer each, sampled as above: the
   watch's baseline), users with the taste give A/B feedback (no thumbs, so
   the baseline holds only the raters'), retrain -> canary, which an admin
   promotes at once (``POST /api/admin/canary/promote``): the watch starts
   (``TUNELOOP_WATCH_ANSWERS`` rated answers). Then the bench makes it worse:
   the raters rate its answers by their taste, but a share ``--spoil`` of the
   answers they would have liked they now thumb down (its up-rate falls to
   about ``1 - spoil`` of what it was). Expected: ``rolled_back``
   automatically, the previous version serving again. (Simulated with
   ``store.sequential``: at spoil 0.75 a baseline up-rate of 0.3 is shown to
   have dropped within 100 thumbs in 99 % of runs, median 35.)

Each scenario's users are fresh API identities; when a scenario ends its
identities are excluded from training (``POST /api/admin/exclusions``), so
the next candidate learns only from its own scenario's feedback (the good
canary's votes would otherwise be most of the bad candidate's training pairs)
and the next watch's baseline holds only honest thumbs. The gate override of
(b) is set on the running server's settings (the bench serves the app in its
own process, as ``bench/learning.py`` does, so the trainer of every later run
gets it) and stays on for (c), which is about the watch, not the gate. With
``--quick`` it is on from the start and the runs take 4 steps: a smoke run of
the machinery (about 3 held-out pairs: the gate would refuse every candidate,
and the candidates hardly differ, so trials end undecided), not of the outcomes.

Reported per scenario: outcome against expected, votes the sequential test
counted to its decision (wins / losses / ties, the estimate and the final
always-valid interval), votes cast, wall seconds by phase, the run and its gate
numbers; for (c) the baseline up-rate, rated answers to the rollback and the
reason. Then the leaderboard's top rows (``GET /api/admin/leaderboard``).
Progress goes to stderr; one JSON summary line is printed last on stdout and
written, with the votes' trace, to ``bench/results/canary.json`` (``--out``).

Usage (alone on the machine)::

    .venv/bin/python bench/canary.py             # full: ~25-40 min on 2 cores (3 runs, 2 trials of <= 400 votes)
    .venv/bin/python bench/canary.py --quick     # smoke: ~6-8 min, small runs and trials (outcomes not conclusive)
    .venv/bin/python bench/canary.py --scenarios ab --voters 60   # only (a) and (b), up to 600 votes each

The time is mostly the three training runs (~2-3 min each at 32 steps), the
engine start (~60 s), the second engine starting for each canary (~55 s; a
promotion right after a run waits for it too) and the votes (~0.6 s each with 8
in flight: 400 votes ~4-5 min); a trial stops at the referee's decision, so a
clearer difference takes fewer.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    REPO,
    bench_settings,
    claim_stdout,
    log,
    start_loop_thread,
    start_server,
    start_vllm_engine,
    temp_data_dir,
)
from learning import (  # noqa: E402
    ADMIN,
    DEFAULT_TASTE,
    HELDOUT_TOPICS,
    MAX_TOKENS,
    OVERRIDES,
    TASTES,
    TEMPLATES,
    Taste,
    Users,
    logged_error,
    mixed_feedback,
    retrain,
    run_summary,
    tear_down,
    train_prompts,
    wait_for_adapter,
)

RESULTS = REPO / "bench" / "results"

MODES = {
    # per scenario: feedback users and turns (as bench/learning.py's mixed population: A/B turns, thumbs turns
    # of thumbs_n sibling answers), voters and the most votes a trial may take, raters, the watch's baseline
    # thumbs and length, and the share of liked answers the bench spoils in (c)
    "quick": {"users": 3, "ab": 8, "thumbs": 4, "thumbs_n": 4, "voters": 6, "max_votes": 60,
              "raters": 6, "baseline": 20, "watch_answers": 40, "spoil": 1.0},
    "full": {"users": 5, "ab": 48, "thumbs": 24, "thumbs_n": 4, "voters": 40, "max_votes": 400,
             "raters": 14, "baseline": 60, "watch_answers": 100, "spoil": 0.75},
}

# Settings the bench runs with: bench/learning.py's (eval share 0.25, the training defaults), the canary on,
# the referee looking every second.
CANARY_OVERRIDES = {
    "canary": True,
    "canary_check_seconds": 1.0,
}
QUICK_OVERRIDES = {
    "train_max_steps": 4,            # a smoke run: the runs only have to finish (the gate is opened, see below)
    "canary_min_votes": 10,          # trials of at most 60 votes
}
# Bench-only: lets the reversed-taste candidate of (b) past the offline gate (any accuracy, any margin, any
# sanity NLL), so that users have to catch it. On from (b) on; with --quick from (a) on (its runs are too small
# for the gate: a smoke run checks the machinery, not the outcomes).
BAD_CANDIDATE_GATE = {
    "gate_min_margin_gain": -1e9,
    "gate_min_accuracy_gain": -1.0,
    "gate_sanity_tolerance": 10.0,
    "gate_min_held_out_pairs": 1,
    "gate_min_held_out_thumbs": 1,
}
EXPECTED = {"a": "promoted", "b": "rejected", "c": "rolled_back"}
TITLES = {
    "a": "a normally trained candidate: canary -> promoted",
    "b": "a candidate trained on the reversed taste, past the gate by override: canary -> rejected, never active",
    "c": "a promoted version made worse by the bench: watch -> automatic rollback",
}
POLL_S = 1.0            # how often the bench looks at the canary, the watch and /healthz
BESIDE_TIMEOUT_S = 900  # the second engine starting for a canary (or a swap waiting for it), on a busy machine
LEADERBOARD_ROWS = 6


# -- tastes ---------------------------------------------------------------------------------


def reversed_taste(taste: Taste) -> Taste:
    """The opposite of ``taste``: satisfied by what does not satisfy it; the
    other answer wins an A/B turn (a tie or both bad stays one)."""
    flip = {"a": "b", "b": "a"}

    def choose(a: dict, b: dict) -> str:
        verdict = taste.choose(a, b)
        return flip.get(verdict, verdict)

    def correct(text: str, finish_reason: str | None) -> str:
        raise NotImplementedError("the reversed taste gives no corrections (bench/canary.py uses mixed feedback)")

    return Taste(f"reversed {taste.name}", f"the opposite of: {taste.description}",
                 lambda text, finish_reason: not taste.satisfies(text, finish_reason), choose, correct)


def spoiled_taste(taste: Taste, spoil: float) -> Taste:
    """``taste``, but a share ``spoil`` of the answers it likes are disliked
    (decided by the answer's text, so a rerun judges alike): the bench making a
    version worse in its users' eyes."""

    def satisfies(text: str, finish_reason: str | None) -> bool:
        return taste.satisfies(text, finish_reason) and random.Random(f"spoil|{text}").random() >= spoil

    return Taste(f"{taste.name}, {spoil:.0%} of its liked answers spoiled", taste.description, satisfies,
                 taste.choose, taste.correct)


def vote_prompts(seed: int = 14) -> list[str]:
    """Questions about the held-out topics (never used for feedback), every template: what voters and raters ask."""
    prompts = [template.format(t=topic) for topic in HELDOUT_TOPICS for template in TEMPLATES]
    random.Random(seed).shuffle(prompts)
    return prompts


# -- the bench's users and its admin -------------------------------------------------------


@dataclass
class Group:
    """Simulated users with API keys of their own (fresh identities of kind ``api``)."""

    name: str
    user_ids: list[int]
    users: Users


def make_group(server: Any, name: str, size: int) -> Group:
    from server.identity import create_api_key
    from store.db import session_scope

    with session_scope(server.db) as session:
        made = [create_api_key(session, f"{name}-{i}") for i in range(size)]
        ids, keys = [row.user_id for row, _ in made], [key for _, key in made]
    return Group(name, ids, Users(server.base_url, keys))


@dataclass
class Bench:
    server: Any
    admin: Any  # httpx.Client with the admin token
    settings: Any  # the running server's Settings (the same object: changes apply at once)
    cfg: dict[str, Any]
    taste: Taste
    workers: int
    prompts: list[str]  # feedback prompts, taken in chunks
    questions: list[str]  # held-out prompts for votes and ratings

    def get(self, path: str) -> Any:
        response = self.admin.get(path)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: dict | None = None) -> Any:
        response = self.admin.post(path, json=body)
        if response.status_code >= 400:
            raise RuntimeError(f"POST {path}: {response.status_code} {response.text[:300]}")
        return response.json()

    def serving(self) -> dict[str, Any]:
        return self.admin.get("/healthz").json()

    def version(self, name: str) -> dict[str, Any]:
        return self.get(f"/api/admin/adapters/{name}")

    def chunk(self, index: int) -> list[str]:
        """Scenario ``index``'s feedback prompts (each scenario its own)."""
        size = self.cfg["ab"] + self.cfg["thumbs"]
        return [self.prompts[(i + index * size) % len(self.prompts)] for i in range(size)]

    def exclude_from_training(self, *groups: Group) -> None:
        """A scenario is over: its users' feedback trains nothing later (nor counts in a later trial)."""
        for group in groups:
            for user_id in group.user_ids:
                self.post("/api/admin/exclusions", {"kind": "user", "id": user_id})
        log("excluded from training: %s", ", ".join(f"{g.name} ({len(g.user_ids)})" for g in groups))

    def override(self, values: dict[str, Any]) -> None:
        """Change the running server's settings (read by the referee, and by
        every training run started from now on)."""
        for key, value in values.items():
            if key not in type(self.settings).model_fields:
                raise ValueError(f"no setting {key!r}")
            setattr(self.settings, key, value)
        log("settings changed: %s", values)


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str) -> float:
    """Seconds until ``predicate()`` is truthy; RuntimeError after ``timeout_s``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            raise RuntimeError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(0.5)
    return time.monotonic() - started


def drive(bench: Bench, budget: int, work: Callable[[int], dict | None],
          finished: Callable[[], bool], settle_s: float) -> tuple[list[dict], bool, float]:
    """Call ``work(k)`` for k = 0, 1, ... with ``bench.workers`` in flight until
    ``finished()`` (looked at every POLL_S) says the server decided, ``work``
    returns None (nothing to do any more) or ``budget`` calls were made; then
    wait up to ``settle_s`` for ``finished()``. Returns the records, whether it
    finished, and the seconds from the first call to the decision seen."""
    halt, done, stop_looking = threading.Event(), threading.Event(), threading.Event()
    lock = threading.Lock()
    records: list[dict] = []
    counter = iter(range(budget))
    started = time.monotonic()
    seen_at: list[float] = []

    def worker() -> None:
        try:
            while not halt.is_set():
                with lock:
                    k = next(counter, None)
                if k is None:
                    return
                record = work(k)
                if record is None:
                    halt.set()
                    return
                with lock:
                    records.append(record)
        except BaseException:
            halt.set()
            raise

    def look() -> None:
        while not stop_looking.is_set():
            try:
                if finished():
                    seen_at.append(time.monotonic())
                    done.set()
                    halt.set()
                    return
            except Exception as exc:  # noqa: BLE001 - one failed look is retried
                log("look failed: %s", exc)
            stop_looking.wait(POLL_S)

    looker = threading.Thread(target=look, name="bench-look", daemon=True)
    looker.start()
    try:
        with ThreadPoolExecutor(bench.workers) as pool:
            for future in [pool.submit(worker) for _ in range(bench.workers)]:
                future.result()
        done.wait(settle_s)
    finally:
        stop_looking.set()
        looker.join(30)
    return records, done.is_set(), round((seen_at[0] if seen_at else time.monotonic()) - started, 1)


# -- the canary: feedback, a run, a trial ------------------------------------------------------


def post_patiently(users: Users, path: str, headers: dict[str, str], body: dict, tries: int = 10):
    """POST as ``Users.post`` does, also waiting out a 503 (an engine restarting) a few times."""
    for _ in range(tries - 1):
        response = users.post(path, headers, body)
        if response.status_code != 503:
            return response
        time.sleep(3)
    return users.post(path, headers, body)


def canary_vote(voters: Users, k: int, prompt: str, seed: int, taste: Taste, temperature: float) -> dict | None:
    """Voter ``k % len(voters)`` asks for a canary A/B turn and chooses by ``taste``.
    None when no canary (nor watched previous version) is served any more."""
    headers = voters.headers(k)
    made = post_patiently(voters, "/api/comparisons", headers, {
        "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
        "temperature": temperature, "seed": seed, "canary": True,
    })
    if made.status_code == 409:
        return None
    made.raise_for_status()
    body = made.json()
    winner = taste.choose(body["a"], body["b"])
    chosen = post_patiently(voters, f"/api/comparisons/{body['id']}/choice", headers, {"winner": winner})
    chosen.raise_for_status()
    return {"k": k, "voter": k % len(voters.keys), "comparison": body["id"],
            "a": body["a"]["adapter"] or "base", "b": body["b"]["adapter"] or "base", "winner": winner,
            "satisfied": [taste.satisfies(body[s]["content"], body[s]["finish_reason"]) for s in ("a", "b")]}


def score_for(vote: dict, candidate: str) -> float:
    """The vote scored for ``candidate`` as the referee scores it: 1 win, 0 loss, 0.5 tie or both bad."""
    if vote["winner"] not in ("a", "b"):
        return 0.5
    return 1.0 if vote[vote["winner"]] == candidate else 0.0


def trial(bench: Bench, voters: Group, candidate: str, compared_with: str, seed_base: int) -> dict[str, Any]:
    """Voters judge ``candidate`` against ``compared_with`` until the referee
    decides; a trial the vote budget leaves undecided is rejected by hand."""
    seen: set[str | None] = set()
    last_log = [0.0]

    def decided() -> bool:
        seen.add(bench.serving().get("adapter"))
        canary = bench.get("/api/admin/canary")["canary"]
        if canary is None or canary["version"] != candidate:
            return True
        if time.monotonic() - last_log[0] >= 15:
            last_log[0] = time.monotonic()
            log("  %s vs %s: %d votes counted (%d W / %d L / %d T), estimate %s, interval [%.3f, %.3f]: %s",
                candidate, compared_with, canary["votes"], canary["wins"], canary["losses"], canary["ties"],
                None if canary["estimate"] is None else round(canary["estimate"], 3), canary["low"],
                canary["high"], canary["outcome"])
        return False

    def vote(k: int) -> dict | None:
        prompt = bench.questions[k % len(bench.questions)]
        return canary_vote(voters.users, k, prompt, seed_base + 2 * k, bench.taste, bench.settings.default_temperature)

    budget = bench.cfg["max_votes"]
    votes, done, seconds = drive(bench, budget, vote, decided, settle_s=5 + 3 * bench.settings.canary_check_seconds)
    ended_by_bench = None
    if not done:
        why = "vote budget spent" if len(votes) >= budget else "canary turns refused (409) but no decision"
        note = f"bench/canary.py: undecided after {len(votes)} votes ({why})"
        log("  %s: %s; rejecting it by hand", candidate, note)
        bench.post("/api/admin/canary/reject", {"note": note})
        ended_by_bench = why
    duel = [v for v in votes if {v["a"], v["b"]} == {candidate, compared_with}]
    return {
        "votes_cast": len(votes), "budget": budget, "ended_by_bench": ended_by_bench,
        "bench_score": round(sum(score_for(v, candidate) for v in duel) / len(duel), 4) if duel else None,
        "served_seen": sorted(s or "base" for s in seen), "seconds": seconds,
        "trace": [[v["voter"], v["a"], v["b"], v["winner"]] for v in sorted(votes, key=lambda v: v["k"])],
    }


def compact_run(run: dict) -> dict[str, Any]:
    """The run and its offline gate, from bench/learning.py's run_summary."""
    s = run_summary(run)
    gate = s["gate"]
    return {
        "run_id": s["run_id"], "status": s["status"], "adapter": s["adapter"], "parent": s["parent"],
        "pairs": {k: s["pairs"][k] for k in ("new", "replay", "eval")},
        "single_thumbs": {k: s["examples"][k] for k in ("new", "eval")},
        "train_steps": s["train"]["steps"], "train_seconds": s["train"]["seconds"],
        "gate": {k: gate[k] for k in ("promote", "candidate_accuracy", "active_accuracy", "candidate_margin",
                                      "active_margin", "eval_pairs", "candidate_sanity_nll", "max_sanity_nll")}
        | ({"reasons": gate["reasons"]} if not gate["promote"] else {}),
        "error": s["error"],
    }


def compact_feedback(feedback: dict) -> dict[str, Any]:
    return {k: feedback.get(k) for k in ("ab_turns", "ab_winners", "thumbs_up", "thumbs_down",
                                         "on_policy_satisfaction", "served_adapter")}


def trained_candidate(bench: Bench, feedback: Group, taste: Taste, index: int, times: dict[str, float],
                      ab_only: bool = False) -> tuple[dict, dict]:
    """Feedback by ``taste`` on scenario ``index``'s prompts (``ab_only``: all of
    them A/B turns, no thumbs), then a run: (feedback, run)."""
    cfg = {**bench.cfg, "ab": bench.cfg["ab"] + bench.cfg["thumbs"], "thumbs": 0} if ab_only else bench.cfg
    t0 = time.monotonic()
    given = mixed_feedback(feedback.users, bench.chunk(index), cfg, index + 1, bench.workers, taste)
    times["feedback"] = round(time.monotonic() - t0, 1)
    log("  feedback (%s): %s", taste.name, json.dumps(compact_feedback(given)))
    t0 = time.monotonic()
    run = retrain(feedback.users, timeout_s=bench.settings.run_timeout_minutes * 60)
    times["train"] = round(time.monotonic() - t0, 1)
    if run["status"] == "failed":
        raise RuntimeError(f"run {run['id']} failed: {run.get('error')}")
    log("  run %d: %s (%s), gate %s", run["id"], run["status"], run.get("adapter_version"),
        json.dumps(compact_run(run)["gate"]))
    return given, run


def canary_scenario(bench: Bench, key: str, feedback: Group, feedback_taste: Taste, voters: Group) -> dict[str, Any]:
    """(a) or (b): feedback by ``feedback_taste``, a run, and if it ends ``canary``
    a trial by ``voters`` with the true taste."""
    started = time.monotonic()
    index = "abc".index(key)
    log("scenario %s: %s", key, TITLES[key])
    compared_with = bench.serving().get("adapter") or "base"
    times: dict[str, float] = {}
    given, run = trained_candidate(bench, feedback, feedback_taste, index, times)
    result: dict[str, Any] = {
        "expected": EXPECTED[key], "feedback_taste": feedback_taste.name, "voters": len(voters.user_ids),
        "compared_with": compared_with, "feedback": compact_feedback(given), "run": compact_run(run),
    }
    if run["status"] != "canary":
        result.update(outcome=f"no canary: the run ended {run['status']}", seconds=times,
                      wall_s=round(time.monotonic() - started, 1))
        return result
    candidate = run["adapter_version"]
    times["serve_beside"] = round(wait_until(
        lambda: (bench.serving().get("beside") or {}).get("adapter") == candidate, BESIDE_TIMEOUT_S,
        f"{candidate} served beside {compared_with}"), 1)
    log("  %s is served beside %s after %.0f s; voting", candidate, compared_with, times["serve_beside"])
    judged = trial(bench, voters, candidate, compared_with, seed_base=1_000_000 * (index + 1))
    times["votes"] = judged.pop("seconds")
    row = bench.version(candidate)
    state = (row.get("metrics") or {}).get("canary") or {}
    verdict = state.get("verdict") or {}
    outcome = "undecided" if judged["ended_by_bench"] else state.get("status")
    if outcome == "promoted":
        times["swap"] = round(wait_for_adapter(feedback.users, candidate, BESIDE_TIMEOUT_S), 1)
    result.update({
        "candidate": candidate, "outcome": outcome, "decided_by": state.get("decided_by"),
        "reason": state.get("reason"),
        "votes": verdict.get("votes"), "wins": verdict.get("wins"), "losses": verdict.get("losses"),
        "ties": verdict.get("ties"), "estimate": rounded(verdict.get("estimate")),
        "interval": [rounded(verdict.get("low")), rounded(verdict.get("high"))] if verdict else None,
        "status_after": row["status"], "activated_at": row.get("activated_at"),
        "seconds": times, "wall_s": round(time.monotonic() - started, 1), **judged,
    })
    if key == "b":
        result["never_active"] = row.get("activated_at") is None and candidate not in judged["served_seen"] \
            and row["status"] != "active"
    log("scenario %s: %s (expected %s) after %s votes, %s; interval %s; %.0f s", key, outcome, EXPECTED[key],
        result["votes"], result["decided_by"], result["interval"], result["wall_s"])
    return result


# -- the watch ---------------------------------------------------------------------------------


def rate_answers(bench: Bench, raters: Group, count: int, judge: Taste, seed_base: int,
                 finished: Callable[[], bool] | None = None) -> tuple[list[dict], bool, float]:
    """Raters ask held-out questions (one answer each, sampled as the web chat
    and the canary turns are) and thumb each answer by ``judge``: ``count`` of
    them, or fewer when ``finished()`` says the server decided (see :func:`drive`)."""
    users = raters.users

    def rate(k: int) -> dict:
        body = users.answer(k, bench.questions[k % len(bench.questions)], bench.settings.default_temperature, 1,
                            seed_base + k)
        choice = body["choices"][0]
        text, finish = choice["message"]["content"], choice["finish_reason"]
        rating = "up" if judge.satisfies(text, finish) else "down"
        post_patiently(users, f"/api/messages/{body['tuneloop']['message_id']}/feedback", users.headers(k),
                       {"rating": rating}).raise_for_status()
        return {"k": k, "adapter": body["tuneloop"]["adapter"] or "base", "rating": rating,
                "honest": "up" if bench.taste.satisfies(text, finish) else "down"}

    settle_s = 0.0 if finished is None else 5 + 3 * bench.settings.canary_check_seconds
    return drive(bench, count, rate, finished or (lambda: False), settle_s)


def rounded(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


def up_rate(records: list[dict], key: str = "rating") -> float | None:
    return round(sum(r[key] == "up" for r in records) / len(records), 4) if records else None


def watch_scenario(bench: Bench, feedback: Group, raters: Group) -> dict[str, Any]:
    """(c): baseline thumbs on the active version, a run -> canary promoted by
    hand (the watch starts), then spoiled thumbs until the watch decides."""
    started = time.monotonic()
    log("scenario c: %s", TITLES["c"])
    cfg, times = bench.cfg, {}
    previous = bench.serving().get("adapter") or "base"
    t0 = time.monotonic()
    baseline, _, _ = rate_answers(bench, raters, cfg["baseline"], bench.taste, seed_base=3_000_000)
    times["baseline"] = round(time.monotonic() - t0, 1)
    log("  baseline: %d honest thumbs on %s, up-rate %s", len(baseline), previous, up_rate(baseline))
    given, run = trained_candidate(bench, feedback, bench.taste, 2, times, ab_only=True)
    result: dict[str, Any] = {
        "expected": EXPECTED["c"], "previous": previous, "spoil": cfg["spoil"],
        "watch_answers": bench.settings.watch_answers, "raters": len(raters.user_ids),
        "baseline_by_bench": {"thumbs": len(baseline), "up_rate": up_rate(baseline)},
        "feedback": compact_feedback(given), "run": compact_run(run),
    }
    if run["status"] != "canary":
        result.update(outcome=f"no canary: the run ended {run['status']}", seconds=times,
                      wall_s=round(time.monotonic() - started, 1))
        return result
    candidate = run["adapter_version"]
    bench.post("/api/admin/canary/promote", {"note": "bench/canary.py scenario c: promoted by hand to start the watch"})
    times["swap"] = round(wait_for_adapter(feedback.users, candidate, BESIDE_TIMEOUT_S), 1)
    watch = bench.get("/api/admin/canary")["watch"]
    if watch is None or watch["version"] != candidate:
        raise RuntimeError(f"no watch of {candidate} after its promotion (TUNELOOP_WATCH_ANSWERS="
                           f"{bench.settings.watch_answers}): {watch}")
    log("  %s promoted by hand, watched against %s (baseline up-rate %s); the bench spoils %.0f%% of its liked "
        "answers", candidate, watch["previous"], watch["baseline_up_rate"], 100 * cfg["spoil"])
    last_log = [0.0]

    def watch_over() -> bool:
        row = bench.version(candidate)
        state = (row.get("metrics") or {}).get("watch") or {}
        if row["status"] != "active" or state.get("status") != "watching":
            return True
        if time.monotonic() - last_log[0] >= 15:
            last_log[0] = time.monotonic()
            thumbs = (bench.get("/api/admin/canary")["watch"] or {}).get("thumbs") or {}
            log("  watch of %s: %s thumbs counted, up-rate %s, interval [%s, %s]: %s", candidate,
                thumbs.get("votes"), thumbs.get("estimate"), thumbs.get("low"), thumbs.get("high"),
                thumbs.get("outcome"))
        return False

    spoiled = spoiled_taste(bench.taste, cfg["spoil"])
    rated, done, times["rated"] = rate_answers(bench, raters, bench.settings.watch_answers + bench.workers, spoiled,
                                               seed_base=4_000_000, finished=watch_over)
    row = bench.version(candidate)
    state = (row.get("metrics") or {}).get("watch") or {}
    numbers = state.get("numbers") or {}
    thumbs = numbers.get("thumbs") or {}
    mine = [r for r in rated if r["adapter"] == candidate]
    serving_after = bench.serving().get("adapter") or "base"
    result.update({
        "version": candidate, "outcome": state.get("status"), "reason": state.get("reason"),
        "baseline_up_rate": numbers.get("baseline_up_rate"),
        "answers_to_rollback": thumbs.get("votes") if state.get("status") == "rolled_back" else None,
        "thumbs": {k: rounded(thumbs.get(k)) for k in ("votes", "ups", "downs", "estimate", "low", "high")}
        if thumbs else None,
        "ab": {k: rounded((numbers.get("ab") or {}).get(k)) for k in ("outcome", "votes", "estimate", "low", "high")},
        "rated_by_bench": len(mine), "up_rate_given": up_rate(mine), "honest_up_rate": up_rate(mine, "honest"),
        "status_after": row["status"], "serving_after": serving_after,
        "rolled_back_to_previous": serving_after == previous,
        "seconds": times, "wall_s": round(time.monotonic() - started, 1),
    })
    log("scenario c: %s (expected rolled_back) after %s rated answers; serving %s; %.0f s", result["outcome"],
        thumbs.get("votes"), serving_after, result["wall_s"])
    return result


# -- summary -----------------------------------------------------------------------------------


def leaderboard_rows(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [{**{k: v[k] for k in ("rank", "version", "active", "score", "interval", "votes", "wins", "losses",
                                  "ties")},
             "thumbs": v["thumbs"]["total"], "up_rate": v["thumbs"]["up_rate"]}
            for v in board["versions"][:LEADERBOARD_ROWS]]


def scenario_ok(key: str, result: dict[str, Any]) -> bool:
    if result.get("outcome") != EXPECTED[key]:
        return False
    if key == "b":
        return bool(result.get("never_active"))
    if key == "c":
        return bool(result.get("rolled_back_to_previous"))
    return True


def compact(result: dict[str, Any]) -> dict[str, Any]:
    """A scenario for the summary line: all but the votes' trace."""
    return {k: v for k, v in result.items() if k != "trace"}


def stop_trainers(server: Any) -> None:
    """A run still going when the bench ends (an error, ^C) would train on
    beside the next benchmark: end its process group (the trainer runs in a
    session of its own, ``server.retraining``)."""
    from sqlmodel import Session, col, select

    from store.tables import TrainingRun

    try:
        with Session(server.db) as session:
            pids = session.exec(select(TrainingRun.pid).where(
                col(TrainingRun.status).in_(("queued", "running")), col(TrainingRun.pid).is_not(None))).all()
    except Exception as exc:  # noqa: BLE001 - tearing down anyway
        log("could not look for running trainers: %s", exc)
        return
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGTERM)
            log("stopped the trainer process group %d", pid)
        except (ProcessLookupError, PermissionError):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small runs and trials: a smoke run (~6-8 min)")
    parser.add_argument("--scenarios", default="abc", help="which of a, b, c to run, in order (default abc)")
    parser.add_argument("--taste", choices=sorted(TASTES), default=DEFAULT_TASTE,
                        help=f"the users' hidden taste (default {DEFAULT_TASTE})")
    parser.add_argument("--voters", type=int, help="voters per canary trial (each counts for at most "
                                                   "TUNELOOP_CANARY_VOTES_PER_USER votes)")
    parser.add_argument("--max-votes", type=int, help="votes a trial may take before the bench gives up on it "
                                                      "(default: 10 per voter)")
    parser.add_argument("--watch-answers", type=int, help="TUNELOOP_WATCH_ANSWERS (default 100; quick 40)")
    parser.add_argument("--spoil", type=float, help="(c): share of liked answers the bench turns into thumbs "
                                                    "down (default 0.75; quick 1.0)")
    parser.add_argument("--workers", type=int, default=8, help="concurrent HTTP requests")
    parser.add_argument("--out", help="results file (default bench/results/canary.json)")
    args = parser.parse_args()
    emit = claim_stdout()
    scenarios = [s for s in "abc" if s in args.scenarios.lower()]
    if not scenarios or set(args.scenarios.lower()) - set("abc"):
        raise SystemExit("--scenarios takes letters from a, b and c (e.g. abc, ab, c)")

    mode = "quick" if args.quick else "full"
    cfg = dict(MODES[mode])
    if args.voters is not None:
        cfg["voters"] = args.voters
        cfg["max_votes"] = 10 * args.voters
    for arg, key in (("max_votes", "max_votes"), ("watch_answers", "watch_answers"), ("spoil", "spoil")):
        if getattr(args, arg) is not None:
            cfg[key] = getattr(args, arg)
    if not 0.0 <= cfg["spoil"] <= 1.0:
        raise SystemExit("--spoil must be between 0 and 1")
    cfg["raters"] = max(cfg["raters"], -(-cfg["watch_answers"] // 10) + 2)  # every rated answer can count
    overrides = {**OVERRIDES, **CANARY_OVERRIDES, "watch_answers": cfg["watch_answers"],
                 **(QUICK_OVERRIDES if args.quick else {})}
    taste = TASTES[args.taste]

    t_start = time.monotonic()
    load_start = os.getloadavg()
    settings = bench_settings(temp_data_dir("canary"), **overrides)
    log("mode %s, scenarios %s, taste %s, %s, overrides %s, data %s", mode, "".join(scenarios), taste.name, cfg,
        overrides, settings.data_dir)
    loop_thread = start_loop_thread()
    engine = start_vllm_engine(settings, loop_thread)
    server = start_server(settings, loop_thread, engine)
    import httpx

    bench = Bench(server=server, admin=httpx.Client(base_url=server.base_url, headers=ADMIN, timeout=120),
                  settings=server.app.state.settings, cfg=cfg, taste=taste, workers=args.workers,
                  prompts=train_prompts(), questions=vote_prompts())
    groups = {name: make_group(server, name, size) for name, size in (
        ("feedback-a", cfg["users"]), ("voter-a", cfg["voters"]), ("feedback-b-reversed", cfg["users"]),
        ("voter-b", cfg["voters"]), ("feedback-c", cfg["users"]), ("rater-c", cfg["raters"]))}
    results: dict[str, dict[str, Any]] = {}
    gate_override: dict[str, Any] | None = None
    board = None
    error = None

    def open_gate(scenario: str) -> None:
        nonlocal gate_override
        if gate_override is None:
            gate_override = {"from_scenario": scenario, "values": BAD_CANDIDATE_GATE}
            bench.override(BAD_CANDIDATE_GATE)

    try:
        try:
            if args.quick:
                open_gate(scenarios[0])
            if "a" in scenarios:
                results["a"] = canary_scenario(bench, "a", groups["feedback-a"], taste, groups["voter-a"])
                bench.exclude_from_training(groups["feedback-a"], groups["voter-a"])
            if "b" in scenarios:
                open_gate("b")
                results["b"] = canary_scenario(bench, "b", groups["feedback-b-reversed"], reversed_taste(taste),
                                               groups["voter-b"])
                bench.exclude_from_training(groups["feedback-b-reversed"], groups["voter-b"])
            if "c" in scenarios:
                open_gate("c")
                results["c"] = watch_scenario(bench, groups["feedback-c"], groups["rater-c"])
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - reported in the summary line
            error = logged_error(exc)
        try:
            board = bench.get("/api/admin/leaderboard")
        except Exception as exc:  # noqa: BLE001
            log("leaderboard: %s", exc)
    finally:
        stop_trainers(server)
        bench.admin.close()
        first, *others = groups.values()
        for group in others:
            group.users.http.close()
        tear_down(first.users, server, loop_thread, engine)

    for key, result in results.items():
        result["ok"] = scenario_ok(key, result)
    summary = {
        "bench": "canary", "mode": mode,
        "ok": error is None and len(results) == len(scenarios) and all(r["ok"] for r in results.values()),
        "error": error,
        "taste": {"name": taste.name, "satisfied_when": taste.description, "max_tokens": MAX_TOKENS},
        "scenarios": {key: {"title": TITLES[key], **compact(result)} for key, result in results.items()},
        "leaderboard": {"votes": board["votes"], "top": leaderboard_rows(board)} if board else None,
        "settings_overrides": overrides, "bench_gate_override": gate_override, "config": cfg,
        "seconds": round(time.monotonic() - t_start, 1),
        "loadavg_start": [round(x, 2) for x in load_start], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "note": "votes: counted by the sequential test up to its decision (each voter's first "
                "TUNELOOP_CANARY_VOTES_PER_USER); votes_cast: canary A/B turns the bench's voters chose, including "
                "those after the decision; interval: the always-valid interval of the canary's win score at the "
                "decision. 2-core CPU; see loadavg for other load",
    }
    path = Path(args.out) if args.out else RESULTS / "canary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    detail = {**summary, "scenarios": {key: {"title": TITLES[key], **result} for key, result in results.items()},
              "leaderboard": board}
    path.write_text(json.dumps(detail, indent=2, default=str))
    emit(summary)


if __name__ == "__main__":
    main()
