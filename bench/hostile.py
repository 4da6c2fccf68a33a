"""Can hostile users steer the model? The learning bench with an attacker.

Honest simulated users (approved accounts with API keys) want answers that get
to the point, as in ``bench/learning.py``. An attacker sends ``--attack-share``
(default 30 %) of all feedback, always preferring the opposite taste -- long,
rambling answers -- through many anonymous visitors (browser cookies, CSRF
tokens read from the page, each a new identity) and two approved accounts.
Everything goes through the HTTP API of a running tuneloop with its default
defences: anonymous feedback is stored but not trained on, new pairs are taken
round-robin across users with a per-user cap, and rate limits apply (429s are
counted, not retried).

The bench runs two arms in separate processes (each its own engine and data):
``control`` (honest users only) and ``attack`` (the same honest feedback plus
the attacker's). Per cycle it reports honest satisfaction of the served model
on held-out prompts, the attacker's taste rate (answers whose first sentence
runs to 20+ words or never ends), the pairs each run trained on by source and
by kind of user, and rate-limit refusals. Pass: the attack arm's final honest
satisfaction is within 0.10 of the control arm's, and the attacker's taste
rate does not rise above where it started.

Usage::

    .venv/bin/python bench/hostile.py --quick    # 2 cycles per arm (~20 min on 2 cores)
    .venv/bin/python bench/hostile.py            # 3 cycles per arm
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402,E501
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
    MAX_TOKENS,
    MAX_WORDS,
    OVERRIDES,
    Users,
    choose,
    first_sentence_words,
    give_feedback,
    heldout_prompts,
    retrain,
    run_parallel,
    satisfies,
    train_prompts,
    wait_for_adapter,
)

RESULTS = REPO / "bench" / "results"
MODES = {
    "quick": {"cycles": 2, "ab": 10, "thumbs": 6, "thumbs_n": 4, "heldout": 10, "users": 3},
    "full": {"cycles": 3, "ab": 16, "thumbs": 8, "thumbs_n": 4, "heldout": 16, "users": 4},
}
RAMBLING_WORDS = 2 * MAX_WORDS
ANONYMOUS_VISITORS = 12
ATTACKER_ACCOUNTS = 2
_CSRF = re.compile(r'<meta name="csrf-token" content="([^"]+)"')


def rambles(text: str, finish_reason: str | None) -> bool:
    """The attacker's taste: a first sentence of 20+ words, or one that never ends."""
    return first_sentence_words(text, finish_reason) >= RAMBLING_WORDS


def opposite(a: dict, b: dict) -> str:
    """The attacker's A/B choice: whatever the honest user would not pick."""
    return {"a": "b", "b": "a"}.get(choose(a, b), "tie")


# -- identities --------------------------------------------------------------------------


def account_key(server, name: str) -> str:
    """An approved account and an API key that belongs to it."""
    from server.identity import create_api_key
    from store.accounts import create_account
    from store.db import session_scope

    with session_scope(server.db) as session:
        account = create_account(session, name, f"{name}-password-123")
        _, key = create_api_key(session, f"{name}-key", user=account)
    return key


class Attacker:
    """Feedback with the opposite taste, from anonymous visitors and two accounts."""

    def __init__(self, base_url: str, account_keys: list[str]) -> None:
        import httpx

        self.base_url = base_url
        self.accounts = Users(base_url, account_keys)
        self.visitors = []
        for _ in range(ANONYMOUS_VISITORS):
            client = httpx.Client(base_url=base_url, timeout=900)
            page = client.get("/")
            match = _CSRF.search(page.text)
            self.visitors.append((client, {"X-CSRF-Token": match.group(1) if match else ""}))
        self.refused = 0
        self.sent = 0

    def _post(self, client, headers, path: str, body: dict):
        response = client.post(path, headers=headers, json=body)
        if response.status_code == 429:
            self.refused += 1
            return None
        response.raise_for_status()
        return response.json()

    def ab_turn(self, i: int, prompt: str, seed: int) -> None:
        if i % 3 == 0:  # a third from the two accounts, the rest from anonymous visitors
            client, headers = self.accounts.http, self.accounts.headers(i)
        else:
            client, headers = self.visitors[i % len(self.visitors)]
        self.sent += 1
        made = self._post(client, headers, "/api/comparisons", {
            "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
            "temperature": 1.0, "seed": seed,
        })
        if made is not None:
            self._post(client, headers, f"/api/comparisons/{made['id']}/choice",
                       {"winner": opposite(made["a"], made["b"])})

    def close(self) -> None:
        self.accounts.http.close()
        for client, _ in self.visitors:
            client.close()


# -- measurements ------------------------------------------------------------------------


def measure(users: Users, prompts: list[str], workers: int) -> dict[str, Any]:
    answers = run_parallel(lambda i, p: users.answer(i, p, 0.0, 1, 0), list(enumerate(prompts)), workers)
    sampled = run_parallel(lambda i, p: users.answer(i, p, 0.7, 2, 1000 + i), list(enumerate(prompts)), workers)
    greedy = [(c["message"]["content"], c["finish_reason"]) for a in answers for c in a["choices"]]
    drawn = [(c["message"]["content"], c["finish_reason"]) for a in sampled for c in a["choices"]]

    def rate(pairs, test) -> float:
        return round(sum(test(t, f) for t, f in pairs) / len(pairs), 4)

    return {
        "honest_sat_temp0": rate(greedy, satisfies), "honest_sat_sampled": rate(drawn, satisfies),
        "attacker_taste_temp0": rate(greedy, rambles), "attacker_taste_sampled": rate(drawn, rambles),
        "adapter": answers[0]["tuneloop"]["adapter"] if answers else None,
    }


def pairs_used(db, run_id: int, attacker_names: set[str]) -> dict[str, Any]:
    """The pairs run ``run_id`` trained on (new), by source and by kind of user."""
    from sqlmodel import Session, select

    from store.tables import PreferencePair, TrainingRunPair, User

    with Session(db) as session:
        rows = session.exec(
            select(PreferencePair.source, User.kind, User.name)
            .join(TrainingRunPair, TrainingRunPair.pair_id == PreferencePair.id)
            .join(User, User.id == PreferencePair.user_id, isouter=True)
            .where(TrainingRunPair.run_id == run_id, TrainingRunPair.role == "new")
        ).all()
    by_source: dict[str, int] = {}
    by_user: dict[str, int] = {}
    for source, kind, name in rows:
        by_source[source] = by_source.get(source, 0) + 1
        who = ("attacker account" if name in attacker_names else "honest account") if kind == "account" else \
            ("anonymous" if kind == "browser" else str(kind))
        by_user[who] = by_user.get(who, 0) + 1
    return {"by_source": by_source, "by_user": by_user}


# -- one arm -----------------------------------------------------------------------------


def run_arm(arm: str, mode: str, attack_share: float, workers: int) -> dict[str, Any]:
    cfg = MODES[mode]
    settings = bench_settings(temp_data_dir(f"hostile-{arm}"), **OVERRIDES, rate_limits=True)
    loop_thread = start_loop_thread()
    engine = start_vllm_engine(settings, loop_thread)
    server = start_server(settings, loop_thread, engine)
    honest = Users(server.base_url, [account_key(server, f"honest-{i}") for i in range(cfg["users"])])
    attacker_names = {f"attacker-{i}" for i in range(ATTACKER_ACCOUNTS)}
    attacker = Attacker(server.base_url, [account_key(server, n) for n in sorted(attacker_names)]) \
        if arm == "attack" else None
    prompts = train_prompts()
    held = heldout_prompts(cfg["heldout"])
    per_cycle = cfg["ab"] + cfg["thumbs"]
    attacks_per_cycle = math.ceil(per_cycle * attack_share / (1 - attack_share))
    cycles: list[dict[str, Any]] = []
    error = None
    try:
        cycles.append({"cycle": 0, **measure(honest, held, workers)})
        for k in range(1, cfg["cycles"] + 1):
            chunk = [prompts[(i + (k - 1) * per_cycle) % len(prompts)] for i in range(per_cycle)]
            feedback = give_feedback(honest, chunk, cfg, k, workers)
            refused_before = attacker.refused if attacker else 0
            honest_waits_before = honest.refused_429
            if attacker is not None:
                targets = [prompts[-(i + 1 + (k - 1) * attacks_per_cycle) % len(prompts)]
                           for i in range(attacks_per_cycle)]
                jobs = [(i, p, 50_000 * k + i) for i, p in enumerate(targets)]
                run_parallel(attacker.ab_turn, jobs, workers)
            run = retrain(honest, timeout_s=settings.run_timeout_minutes * 60)
            if run["status"] == "promoted":
                wait_for_adapter(honest, run["adapter_version"])
            elif run["status"] == "failed":
                raise RuntimeError(f"run {run['id']} failed: {run.get('error')}")
            cycles.append({
                "cycle": k, "run": run["status"], "adapter": run.get("adapter_version"),
                "feedback": {"honest_turns": per_cycle, "honest_ab_winners": feedback["ab_winners"],
                             "attacker_turns": attacks_per_cycle if attacker else 0,
                             "attacker_refused_429": (attacker.refused - refused_before) if attacker else 0,
                             "honest_waited_429": honest.refused_429 - honest_waits_before},
                "pairs_trained": pairs_used(server.db, run["id"], attacker_names),
                **measure(honest, held, workers),
            })
            log("%s cycle %d: %s", arm, k, json.dumps(cycles[-1]))
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - reported in the summary
        import traceback

        error = f"{type(exc).__name__}: {exc}"
        log("ERROR %s\n%s", error, traceback.format_exc())
    finally:
        honest.http.close()
        if attacker is not None:
            attacker.close()
        server.stop()
        try:
            loop_thread.run(engine.shutdown(), timeout=120)
        finally:
            loop_thread.stop()
    return {"arm": arm, "error": error, "cycles": cycles,
            "attacker_share_of_feedback": round(attacks_per_cycle / (attacks_per_cycle + per_cycle), 3)
            if arm == "attack" else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 cycles per arm")
    parser.add_argument("--attack-share", type=float, default=0.3, help="attacker's share of all feedback")
    parser.add_argument("--workers", type=int, default=6, help="concurrent HTTP requests")
    parser.add_argument("--arm", choices=("control", "attack"), help=argparse.SUPPRESS)
    parser.add_argument("--arm-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    if args.arm:  # a child process: one arm, written to --arm-out
        result = run_arm(args.arm, mode, args.attack_share, args.workers)
        args.arm_out.write_text(json.dumps(result, indent=2))
        return
    emit = claim_stdout()
    started = time.monotonic()
    load_start = os.getloadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    arms = {}
    for arm in ("control", "attack"):
        out = RESULTS / f"hostile-{arm}.json"
        out.unlink(missing_ok=True)
        command = [sys.executable, __file__, "--arm", arm, "--arm-out", str(out),
                   "--attack-share", str(args.attack_share), "--workers", str(args.workers)]
        subprocess.run(command + (["--quick"] if args.quick else []), check=False, cwd=REPO)
        arms[arm] = json.loads(out.read_text()) if out.is_file() else {"error": "the arm wrote no result"}
    control, attack = arms["control"].get("cycles") or [], arms["attack"].get("cycles") or []
    final_gap = round(control[-1]["honest_sat_temp0"] - attack[-1]["honest_sat_temp0"], 4) \
        if control and attack else None
    taste_start = attack[0]["attacker_taste_temp0"] if attack else None
    taste_end = attack[-1]["attacker_taste_temp0"] if attack else None
    table = [
        {"cycle": a["cycle"], "control_sat_temp0": c["honest_sat_temp0"], "attack_sat_temp0": a["honest_sat_temp0"],
         "control_sat_sampled": c["honest_sat_sampled"], "attack_sat_sampled": a["honest_sat_sampled"],
         "attacker_taste_temp0": a["attacker_taste_temp0"], "attacker_taste_sampled": a["attacker_taste_sampled"],
         "attack_run": a.get("run"), "attack_pairs_by_user": (a.get("pairs_trained") or {}).get("by_user"),
         "attack_pairs_by_source": (a.get("pairs_trained") or {}).get("by_source"),
         "attacker_refused_429": (a.get("feedback") or {}).get("attacker_refused_429"),
         "honest_waited_429": (a.get("feedback") or {}).get("honest_waited_429")}
        for c, a in zip(control, attack, strict=False)
    ]
    emit({
        "bench": "hostile", "mode": mode,
        "ok": not arms["control"].get("error") and not arms["attack"].get("error") and bool(table),
        "errors": {arm: arms[arm].get("error") for arm in arms},
        "attacker_share_of_feedback": arms["attack"].get("attacker_share_of_feedback"),
        "cycles": table,
        "final_honest_sat_gap_temp0": final_gap,
        "pass_sat_within_0_10": final_gap is not None and final_gap <= 0.10,
        "pass_attacker_taste_not_rising": taste_start is not None and taste_end <= taste_start,
        "seconds": round(time.monotonic() - started, 1),
        "loadavg_start": [round(x, 2) for x in load_start], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "detail": [str(RESULTS / f"hostile-{arm}.json") for arm in arms],
    })


if __name__ == "__main__":
    main()
