"""Does tuneloop learn what its users want? Simulated users, real loop.

Simulated users talk to a running tuneloop (real vLLM engine, real trainer)
only through its HTTP API. They judge every answer by a hidden **taste** the
model is never told (``--taste``):

- ``to-the-point`` (the default): an answer satisfies when its first sentence
  has at most ``MAX_WORDS`` words (SmolLM2-135M opens with a short sentence
  about 40 % of the time, so there is room to learn and feedback to learn from);
- ``casual``: an answer satisfies when it talks casually -- a contraction
  (it's, they're, I'm, don't, ...) within its first ``CASUAL_WITHIN_WORDS``
  words -- which is not about length (SmolLM2-135M does so in about 17 % of its
  greedy and 35 % of its sampled answers).

Each taste is judged on the opening of an answer, so every measured request
asks for ``MAX_TOKENS`` tokens, which keeps generation affordable on a CPU.
How the users express their taste is the **population** (``--population``),
one per run, each on a fresh data directory:

- ``mixed`` (the default): A/B turns (``POST /api/comparisons`` then
  ``/choice``: the satisfying answer wins; otherwise the taste's graded rule
  decides, or tie / both_bad) and thumbs on ``n`` sibling answers
  (``/v1/chat/completions`` with ``n``, then ``POST /api/messages/{id}/feedback``:
  up if the answer satisfies, down if not);
- ``thumbs``: only single thumbs -- one answer per question (n=1, no A/B, no
  "try again"), up if it satisfies, down if not, asked with ``MAX_TOKENS``
  like the others (``--thumbs-max-tokens``): the trainer learns from these
  thumbs with KTO (``store.examples``), a cut answer without its end-of-turn
  token;
- ``corrections``: only corrections -- every answer that does not satisfy is
  edited by its user into one that does (``POST /api/messages/{id}/correction``),
  a deterministic edit of the model's own answer (``Taste.correct``), which
  makes a pair with source ``correction``. No thumbs, no A/B.

Then ``K`` cycles of the real path: ``POST /api/admin/retrain`` (pairs and
single thumbs -> selection with replay -> ORPO, then KTO, on the active adapter
in its own process -> gate -> promotion), wait for the running server to
hot-swap the new adapter, and measure. Per cycle:

- satisfaction of the *served* model on held-out prompts (topics never used
  for feedback), at temperature 0 and sampled (temperature 0.7, fixed seeds),
  by the trained taste and, on the same answers, by the **other** taste
  (``unseen_taste``: a model that just drifts one way would move it too);
- what the feedback was (A/B verdicts and the share of A/B turns whose two
  answers differ in the judged trait, thumbs, corrections and the pairs they made);
- what the run trained on: pairs (new / replay / eval, by source) and single
  thumbs (``run.metrics["examples"]``, the KTO stage);
- the gate's decision and numbers, and its sanity NLL against its budget;
- sanity-set NLL of the served model, against the base model's and the budget;
- forgetting: preference accuracy of the served model on every earlier cycle's
  held-out pairs (those that first appeared in that cycle's run, read from
  ``TrainingRunPair``), scored with trainer.evaluate's own functions, and the
  same for held-out single thumbs (``TrainingRunExample``: accuracy = the
  answer moved the way its thumb asked, against the base model).

The summary states each target as a boolean (``targets``):
``rises_30_points_within_3_cycles`` (T=0 and sampled), ``never_falls``,
``reaches_0_95_at_T0``, ``sanity_within_budget_at_every_promotion``, with the
numbers behind them (``target_numbers``).

Writes ``bench/results/learning-<population>[-<taste>].png`` (plot) and
``.json`` (every number; ``learning.png``/``learning.json`` for the default
mixed population and taste), and prints one JSON summary line last on stdout.

Settings overrides (``Settings`` fields, all reported in the summary) are the
bench's defaults below; each can be changed from the command line to try
another configuration (``--lr``, ``--epochs``, ``--eval-share``, ...).

Usage::

    .venv/bin/python bench/learning.py --quick        # ~6-9 min on 2 cores: 2 cycles, little feedback
    .venv/bin/python bench/learning.py                # full: 5 cycles, mixed population, to-the-point
    .venv/bin/python bench/learning.py --population thumbs --cycles 3
    .venv/bin/python bench/learning.py --population corrections --taste casual
    .venv/bin/python bench/learning.py --cycles 6     # the plateau check
    .venv/bin/python bench/learning.py --quick --population thumbs --cycles 1 --turns 12 --heldout 8  # smoke
    .venv/bin/python bench/learning.py --selection-only   # A/B selection only, no training (12-17 min, 2 busy cores)
    .venv/bin/python bench/learning.py --quick --ab-selection uncertainty   # the server picks the A/B turns

``--selection-only`` asks whether choosing A/B turns by the model's
uncertainty (``TUNELOOP_AB_SELECTION=uncertainty``) makes more of them
informative than choosing at random at the same budget: a pool of prompts
(``--pool``) each gets ``--pairs-per-prompt`` comparisons and its uncertainty
probed at several lengths; both selectors are replayed over that one
measured pool at ``--ab-rate``. Writes
``bench/results/learning-ab-selection-<taste>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import json
import math
import os
import random
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
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

MAX_TOKENS = 24            # answer budget of measured, A/B and corrected answers: enough to see the opening

# -- the hidden tastes ----------------------------------------------------------------

MAX_WORDS = 10      # to-the-point: the answer's first sentence has at most this many words
SHORTER_BY = 0.8    # graded: a first sentence with <= 80% of the other's words is clearly shorter
MIN_OPENING_WORDS = 3  # a corrected first sentence keeps at least this many words where it can
CASUAL_WITHIN_WORDS = 15  # casual: a contraction within the answer's first words (~20 tokens: in view)
_SENTENCE_END = re.compile(r"[.!?](\s|$)")
_CONTRACTION = re.compile(
    r"\b(?:(?:it|that|there|here|what|let|he|she|who|where|how)'s|\w+'(?:re|m|ve|ll|d)|\w+n't)\b", re.IGNORECASE)
_CONTRACTIONS = {
    "it is": "it's", "that is": "that's", "there is": "there's", "here is": "here's", "what is": "what's",
    "they are": "they're", "we are": "we're", "you are": "you're", "i am": "I'm", "let us": "let's",
    "is not": "isn't", "are not": "aren't", "do not": "don't", "does not": "doesn't", "cannot": "can't",
    "they have": "they've", "we have": "we've", "i have": "I've", "it will": "it'll", "they will": "they'll",
}
_CONTRACTIBLE = re.compile(r"\b(?:" + "|".join(_CONTRACTIONS) + r")\b", re.IGNORECASE)
# where a user shortening a sentence cuts it: before a word that opens a clause or a phrase ("and", "of"
# and "to" join inside a phrase as often: "a versatile and useful plant", "a type of animal")
_CLAUSE_STARTS = {"but", "because", "which", "that", "with", "where", "who", "whose", "while", "when", "as",
                  "since", "so", "in", "for", "from", "by", "on", "at", "than", "like", "such"}
# and what it never leaves at the end of one
_DANGLING = _CLAUSE_STARTS | {"and", "or", "of", "to", "a", "an", "the", "its", "their", "his", "her", "our", "my",
                              "your", "this", "these", "those", "is", "are", "was", "were", "be", "very", "not",
                              "also", "it", "they"}


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
    """The to-the-point taste as an A/B choice: a satisfying answer beats one
    that is not; otherwise the clearly shorter first sentence wins (tie if
    neither is clearly shorter; both_bad if neither first sentence ends at all)."""
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


def split_opening(text: str, finish_reason: str | None) -> tuple[str, str]:
    """(first sentence, the complete sentences after it). A sentence the token
    limit cut off is not kept: a user editing the answer would not keep half a
    sentence either. With no sentence end at all, the first "sentence" is the text."""
    text = " ".join(text.split())
    match = _SENTENCE_END.search(text)
    if not match:
        return text, ""
    first, rest = text[: match.start() + 1], text[match.end():]
    if finish_reason == "length":
        ends = list(_SENTENCE_END.finditer(rest))
        rest = rest[: ends[-1].start() + 1] if ends else ""
    return first, rest.strip()


def end_sentence(tokens: list[str]) -> str:
    """``tokens`` (words) as a sentence: no dangling word or punctuation at its end, a full stop."""
    kept = list(tokens)
    while len(kept) > 1 and kept[-1].lower().strip(",;:-") in _DANGLING:
        kept.pop()
    return " ".join(kept).rstrip(",;:-—–.!? ") + "."


def shorten_opening(text: str, finish_reason: str | None) -> str:
    """The to-the-point correction: the answer with its first sentence cut to
    at most MAX_WORDS words -- at its earliest clause boundary that leaves
    MIN_OPENING_WORDS words, else after MAX_WORDS words -- and the rest of the
    answer kept (but a sentence the token limit cut off)."""
    first, rest = split_opening(text, finish_reason)
    tokens = first.split()
    ended = bool(_SENTENCE_END.search(first))
    if len(tokens) > MAX_WORDS:
        cut = next((i for i in range(MIN_OPENING_WORDS, MAX_WORDS + 1)
                    if tokens[i].lower().strip("\"'(),;:") in _CLAUSE_STARTS
                    or tokens[i - 1].endswith((",", ";", ":"))), MAX_WORDS)
        first = end_sentence(tokens[:cut])
    elif not ended:
        first = end_sentence(tokens)
    return f"{first} {rest}".strip()


def is_casual(text: str, finish_reason: str | None) -> bool:
    """Talks casually: a contraction (it's, they're, I'm, don't, ...) within the
    answer's first CASUAL_WITHIN_WORDS words."""
    return bool(_CONTRACTION.search(" ".join(text.replace("\u2019", "'").split()[:CASUAL_WITHIN_WORDS])))


def choose_casual(a: dict, b: dict) -> str:
    """The casual taste as an A/B choice: the casual answer wins; tie if both
    are, both_bad if neither is."""
    ok_a, ok_b = is_casual(a["content"], a["finish_reason"]), is_casual(b["content"], b["finish_reason"])
    if ok_a != ok_b:
        return "a" if ok_a else "b"
    return "tie" if ok_a else "both_bad"


def make_casual(text: str, finish_reason: str | None) -> str:
    """The casual correction: the first phrase that contracts (it is -> it's,
    they are -> they're, ...) contracted, if it lies within the first
    CASUAL_WITHIN_WORDS words; else the answer opened with "Here's the thing:".
    A sentence the token limit cut off is dropped, an unfinished only sentence ended."""
    first, rest = split_opening(text, finish_reason)
    if not _SENTENCE_END.search(first):
        first = end_sentence(first.split())
    body = f"{first} {rest}".strip().replace("\u2019", "'")
    for match in _CONTRACTIBLE.finditer(body):
        if len(body[: match.start()].split()) + 1 >= CASUAL_WITHIN_WORDS:
            break
        short = _CONTRACTIONS[match.group(0).lower()]
        if match.group(0)[0].isupper():
            short = short[0].upper() + short[1:]
        return body[: match.start()] + short + body[match.end():]
    head = body.split(" ", 1)[0]
    if head[:1].isupper() and head[1:2].islower() and not head.startswith("I'"):
        body = body[0].lower() + body[1:]
    return f"Here's the thing: {body}"


@dataclass(frozen=True)
class Taste:
    """A hidden preference of the simulated users: whether an answer (its text
    and finish reason) ``satisfies`` it, the A/B verdict it gives two answers
    (``choose``: a, b, tie, both_bad), and the user's ``correct``-ion of an
    answer that does not satisfy it (an edit that does)."""

    name: str
    description: str
    satisfies: Callable[[str, str | None], bool]
    choose: Callable[[dict, dict], str]
    correct: Callable[[str, str | None], str]


TASTES = {taste.name: taste for taste in (
    Taste("to-the-point", f"first sentence has at most {MAX_WORDS} words", satisfies, choose, shorten_opening),
    Taste("casual", f"uses a contraction (it's, they're, don't, ...) within its first {CASUAL_WITHIN_WORDS} words",
          is_casual, choose_casual, make_casual),
)}
DEFAULT_TASTE = "to-the-point"


def other_taste(taste: Taste) -> Taste:
    """The taste the users do not have: measured as the unseen-taste check."""
    return next(t for t in TASTES.values() if t.name != taste.name)


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
    # per cycle: A/B prompts, thumbs prompts (n answers each) of the mixed population;
    # prompts of the thumbs and corrections populations (one answer each); held-out prompts
    "quick": {"cycles": 2, "ab": 10, "thumbs": 6, "thumbs_n": 4, "single": 16, "heldout": 10, "users": 3},
    "full": {"cycles": 5, "ab": 24, "thumbs": 12, "thumbs_n": 4, "single": 48, "heldout": 24, "users": 5},
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
    "canary": False,              # this measures learning by the offline gate; bench/canary.py measures the canary
    "watch_answers": 0,
    "side_by_side_prompts": 0,    # a display for the run page: not part of what is measured
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

    def ab_turn(self, i: int, prompt: str, seed: int, taste: Taste = TASTES[DEFAULT_TASTE],
                only_if_selected: bool = False) -> dict:
        """An A/B turn, chosen by ``taste``. ``only_if_selected``: the server's
        A/B selection (TUNELOOP_AB_SELECTION) decides first; a context it passes
        over gets one answer (kind ``passed_over``), which this user leaves unrated."""
        h = self.headers(i)
        made = self.post("/api/comparisons", h, {
            "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
            "temperature": 1.0, "seed": seed, **({"only_if_selected": True} if only_if_selected else {}),
        })
        made.raise_for_status()
        body = made.json()
        if body["b"] is None:
            a = body["a"]
            return {"kind": "passed_over", "adapter": a["adapter"], "answers": [(a["content"], a["finish_reason"])],
                    "selection": body["selection"]}
        winner = taste.choose(body["a"], body["b"])
        chosen = self.post(f"/api/comparisons/{body['id']}/choice", h, {"winner": winner})
        chosen.raise_for_status()
        answers = [(body[s]["content"], body[s]["finish_reason"]) for s in ("a", "b")]
        return {"kind": "ab", "winner": winner, "adapter": body["a"]["adapter"], "answers": answers,
                "satisfied": [taste.satisfies(t, f) for t, f in answers], "selection": body.get("selection")}

    def thumbs_turn(self, i: int, prompt: str, n: int, seed: int, taste: Taste = TASTES[DEFAULT_TASTE],
                    max_tokens: int = MAX_TOKENS) -> dict:
        h = self.headers(i)
        resp = self.post("/v1/chat/completions", h, {
            "messages": [{"role": "user", "content": prompt}], "n": n, "max_tokens": max_tokens,
            "temperature": 1.0, "seed": seed,
        })
        resp.raise_for_status()
        body = resp.json()
        ratings = []
        for message_id, choice in zip(body["tuneloop"]["message_ids"], body["choices"], strict=True):
            rating = "up" if taste.satisfies(choice["message"]["content"], choice["finish_reason"]) else "down"
            self.post(f"/api/messages/{message_id}/feedback", h, {"rating": rating}).raise_for_status()
            ratings.append(rating)
        return {"kind": "thumbs", "ratings": ratings, "adapter": body["tuneloop"]["adapter"],
                "answers": [(c["message"]["content"], c["finish_reason"]) for c in body["choices"]]}

    def correction(self, i: int, message_id: int, text: str):
        """POST the answer user ``i`` wanted instead of answer ``message_id``; the response."""
        return self.post(f"/api/messages/{message_id}/correction", self.headers(i), {"text": text})

    def answer(self, i: int, prompt: str, temperature: float, n: int, seed: int | None,
               max_tokens: int = MAX_TOKENS) -> dict:
        resp = self.post("/v1/chat/completions", self.headers(i), {
            "messages": [{"role": "user", "content": prompt}], "n": n, "max_tokens": max_tokens,
            "temperature": temperature, "seed": seed,
        })
        resp.raise_for_status()
        return resp.json()


def run_parallel(fn, jobs: list, workers: int) -> list:
    with cf.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda job: fn(*job), jobs))


# -- populations: how the users express their taste ------------------------------------


def feedback_seed(cycle: int, i: int) -> int:
    return 10_000 * (cycle + 1) + 10 * i


def rate(flags: list[bool]) -> float | None:
    return round(sum(flags) / len(flags), 4) if flags else None


def mixed_feedback(users: Users, prompts: list[str], cfg: dict, cycle: int, workers: int,
                   taste: Taste = TASTES[DEFAULT_TASTE]) -> dict[str, Any]:
    """The mixed population: ``cfg["ab"]`` A/B turns, then ``cfg["thumbs"]``
    turns of ``cfg["thumbs_n"]`` sibling answers, each rated. An A/B turn is
    *informative* when its two answers differ in the judged trait (one satisfies,
    the other not); the rest were decided by the graded rule, tied or both bad.
    With ``cfg["ab_offered"]`` (``--ab-selection``) that many prompts are offered
    with ``only_if_selected`` instead and the server picks the A/B turns among
    them (about ``cfg["ab"]`` at the bench's TUNELOOP_AB_RATE)."""
    offered = cfg.get("ab_offered")
    n_ab = offered or cfg["ab"]
    ab_prompts, th_prompts = prompts[:n_ab], prompts[n_ab: n_ab + cfg["thumbs"]]
    jobs = [("ab", i, p) for i, p in enumerate(ab_prompts)] + [("th", i, p) for i, p in enumerate(th_prompts)]

    def one(kind: str, i: int, prompt: str) -> dict:
        if kind == "ab":
            return users.ab_turn(i, prompt, feedback_seed(cycle, i), taste, only_if_selected=bool(offered))
        return users.thumbs_turn(i, prompt, cfg["thumbs_n"], feedback_seed(cycle, i), taste)

    turns = run_parallel(one, jobs, workers)
    winners: dict[str, int] = {}
    verdicts = {"differ_in_trait": 0, "graded": 0, "tie": 0, "both_bad": 0}
    ups = downs = informative_thumbs = 0
    answers = []
    bases: dict[str, int] = {}
    for turn in turns:
        answers += turn["answers"]
        if turn.get("selection"):
            basis = turn["selection"]["basis"]
            bases[basis] = bases.get(basis, 0) + 1
        if turn["kind"] == "ab":
            winners[turn["winner"]] = winners.get(turn["winner"], 0) + 1
            ok_a, ok_b = turn["satisfied"]
            if ok_a != ok_b:
                verdicts["differ_in_trait"] += 1
            elif turn["winner"] in ("a", "b"):
                verdicts["graded"] += 1
            else:
                verdicts[turn["winner"]] += 1
        elif turn["kind"] == "thumbs":
            u = turn["ratings"].count("up")
            ups, downs = ups + u, downs + len(turn["ratings"]) - u
            informative_thumbs += 0 < u < len(turn["ratings"])
    compared = sum(winners.values())
    return {
        "population": "mixed",
        "ab_turns": compared, "ab_winners": winners, "ab_verdicts": verdicts,
        "ab_informative_share": round(verdicts["differ_in_trait"] / compared, 4) if compared else None,
        **({"ab_offered": offered, "ab_selection_basis": bases} if offered else {}),
        "thumbs_turns": len(th_prompts), "thumbs_up": ups, "thumbs_down": downs,
        "thumbs_turns_with_a_pair": informative_thumbs,
        "on_policy_satisfaction": rate([taste.satisfies(t, f) for t, f in answers]),
        "served_adapter": turns[0]["adapter"] if turns else None,
    }


give_feedback = mixed_feedback  # the name bench/hostile.py's honest users call


def thumbs_feedback(users: Users, prompts: list[str], cfg: dict, cycle: int, workers: int,
                    taste: Taste = TASTES[DEFAULT_TASTE]) -> dict[str, Any]:
    """The thumbs population: one answer per prompt (``cfg["thumbs_max_tokens"]``,
    n=1), rated up if it satisfies, down if not; nothing else. A thumb on an
    answer cut at the token limit is trained without the end-of-turn token."""
    jobs = [(i, p) for i, p in enumerate(prompts)]
    turns = run_parallel(lambda i, p: users.thumbs_turn(i, p, 1, feedback_seed(cycle, i), taste,
                                                        cfg["thumbs_max_tokens"]), jobs, workers)
    answers = [a for turn in turns for a in turn["answers"]]
    ratings = [r for turn in turns for r in turn["ratings"]]
    cut = [f == "length" for _, f in answers]
    return {
        "population": "thumbs",
        "thumbs_turns": len(turns), "thumbs_up": ratings.count("up"), "thumbs_down": ratings.count("down"),
        "thumbs_on_cut_answers": sum(cut),
        "thumbs_up_on_finished_answers": sum(r == "up" and not c for r, c in zip(ratings, cut, strict=True)),
        "thumbs_down_on_finished_answers": sum(r == "down" and not c for r, c in zip(ratings, cut, strict=True)),
        "mean_answer_words": round(sum(words(t) for t, _ in answers) / len(answers), 1) if answers else None,
        "on_policy_satisfaction": rate([taste.satisfies(t, f) for t, f in answers]),
        "served_adapter": turns[0]["adapter"] if turns else None,
    }


def corrections_feedback(users: Users, prompts: list[str], cfg: dict, cycle: int, workers: int,
                         taste: Taste = TASTES[DEFAULT_TASTE]) -> dict[str, Any]:
    """The corrections population: one answer per prompt (n=1); each one that
    does not satisfy is corrected by its user into ``taste.correct`` of it.
    Nothing else: no thumbs, no A/B."""

    def one(i: int, prompt: str) -> dict:
        body = users.answer(i, prompt, 1.0, 1, feedback_seed(cycle, i))
        choice = body["choices"][0]
        text, finish = choice["message"]["content"], choice["finish_reason"]
        turn = {"adapter": body["tuneloop"]["adapter"], "answer": (text, finish), "corrected": None}
        if taste.satisfies(text, finish) or not text.strip():
            return turn
        corrected = taste.correct(text, finish)
        if not taste.satisfies(corrected, "stop"):
            raise RuntimeError(f"the {taste.name} correction {corrected!r} of {text!r} does not satisfy the taste")
        resp = users.correction(i, body["tuneloop"]["message_id"], corrected)
        turn.update(corrected=corrected, status=resp.status_code,
                    pair_id=resp.json().get("pair_id") if resp.status_code == 200 else None,
                    error=None if resp.status_code == 200 else resp.text[:300])
        return turn

    turns = run_parallel(one, list(enumerate(prompts)), workers)
    sent = [t for t in turns if t["corrected"] is not None]
    refused = [t for t in sent if t["status"] != 200]
    answers = [t["answer"] for t in turns]
    return {
        "population": "corrections",
        "answers": len(turns), "corrections": len(sent), "corrections_refused": len(refused),
        "refusals": sorted({t["error"] for t in refused})[:3],
        "correction_pairs": sum(t["pair_id"] is not None for t in sent),
        "corrected_cut_answers": sum(t["answer"][1] == "length" for t in sent),
        "examples": [{"answer": t["answer"][0], "correction": t["corrected"]} for t in sent[:3]],
        "on_policy_satisfaction": rate([taste.satisfies(t, f) for t, f in answers]),
        "served_adapter": turns[0]["adapter"] if turns else None,
    }


POPULATIONS: dict[str, Callable[..., dict[str, Any]]] = {
    "mixed": mixed_feedback, "thumbs": thumbs_feedback, "corrections": corrections_feedback,
}


def prompts_per_cycle(population: str, cfg: dict) -> int:
    return cfg.get("ab_offered", cfg["ab"]) + cfg["thumbs"] if population == "mixed" else cfg["single"]


# -- measurements ------------------------------------------------------------------------


def measure_satisfaction(users: Users, prompts: list[str], workers: int, taste: Taste,
                         unseen: Taste) -> dict[str, Any]:
    """Served model on held-out prompts: greedy (n=1) and sampled (T=0.7, n=2,
    fixed seeds), judged by ``taste`` and, on the same answers, by ``unseen``."""
    greedy = run_parallel(lambda i, p: users.answer(i, p, 0.0, 1, 0), list(enumerate(prompts)), workers)
    sampled = run_parallel(lambda i, p: users.answer(i, p, 0.7, 2, 1000 + i), list(enumerate(prompts)), workers)

    def answers(bodies: list[dict]) -> list[tuple[str, str]]:
        return [(c["message"]["content"], c["finish_reason"]) for b in bodies for c in b["choices"]]

    def score(pairs: list[tuple[str, str]]) -> dict[str, Any]:
        return {
            "rate": rate([taste.satisfies(t, f) for t, f in pairs]), "n": len(pairs),
            "mean_first_sentence_words": round(
                sum(min(first_sentence_words(t, f), MAX_TOKENS) for t, f in pairs) / len(pairs), 2),
            "mean_words": round(sum(words(t) for t, _ in pairs) / len(pairs), 2),
            "cut_at_max_tokens": rate([f == "length" for _, f in pairs]),
        }

    got = {"temp0": answers(greedy), "sampled": answers(sampled)}
    return {
        "adapter": greedy[0]["tuneloop"]["adapter"],
        "temp0": score(got["temp0"]),
        "sampled": score(got["sampled"]),
        "unseen_taste": {"name": unseen.name, "description": unseen.description,
                         **{k: rate([unseen.satisfies(t, f) for t, f in v]) for k, v in got.items()}},
        "examples_temp0": [text[:160] for text, _ in got["temp0"][:3]],
        "answers": got,
    }


def eval_sets_by_cycle(db, run_ids: list[int], eval_share: float) -> tuple[list[list], list[list]]:
    """Held-out pairs, and held-out single thumbs, that first appeared in each
    run (run k's eval role minus earlier runs'), as the gate scores them (cut
    answers without an end token)."""
    from sqlmodel import Session, select

    from store.examples import example_key, single_thumbs
    from store.tables import PreferencePair, TrainingRunExample, TrainingRunPair
    from trainer.cycle import _as_training_pairs

    seen_pairs: set[int] = set()
    seen_examples: set[tuple[int, bool]] = set()
    pair_sets, example_sets = [], []
    with Session(db) as session:
        thumbs = {example_key(e.feedback_id, e.label): e for e in single_thumbs(session, eval_share)}
        for run_id in run_ids:
            ids = set(session.exec(select(TrainingRunPair.pair_id).where(
                TrainingRunPair.run_id == run_id, TrainingRunPair.role == "eval")).all())
            fresh = sorted(ids - seen_pairs)
            seen_pairs |= ids
            pairs, _ = _as_training_pairs(session, [session.get(PreferencePair, i) for i in fresh])
            pair_sets.append(pairs)
            keys = {example_key(f, label) for f, label in session.exec(
                select(TrainingRunExample.feedback_id, TrainingRunExample.label).where(
                    TrainingRunExample.run_id == run_id, TrainingRunExample.role == "eval")).all()}
            example_sets.append([thumbs[k] for k in sorted(keys - seen_examples) if k in thumbs])
            seen_examples |= keys
    return pair_sets, example_sets


def score_served(model: str, adapter_path: str | None, pair_sets: list[list], example_sets: list[list],
                 base_logps: dict[int, float], batch_size: int = 8) -> dict:
    """Preference accuracy and margin of base + ``adapter_path`` on each set of
    held-out pairs, accuracy and margin on each set of held-out single thumbs
    (reward against the base model, whose scores are kept in ``base_logps`` by
    feedback row), and its sanity-set NLL -- the same length-normalised scores
    as ``trainer.evaluate.evaluate_model``."""
    from trainer.evaluate import load_model, load_sanity_set, score_answers

    sanity = load_sanity_set()
    examples = [e for examples in example_sets for e in examples]
    items = [(p.prompt, answer, complete) for pairs in pair_sets for p in pairs
             for answer, complete in ((p.chosen, p.chosen_complete), (p.rejected, p.rejected_complete))]
    items += [(ex["messages"][:-1], ex["messages"][-1]["content"]) for ex in sanity]
    items += [(e.prompt, e.completion) for e in examples]
    model_obj, tokenizer = load_model(model, adapter_path)
    scores = score_answers(model_obj, tokenizer, items, batch_size=batch_size, max_length=1024)
    del model_obj
    out_sets, k = [], 0
    for pairs in pair_sets:
        margins = []
        for _ in pairs:
            (cs, cn), (rs, rn) = scores[k], scores[k + 1]
            margins.append(cs / cn - rs / rn)
            k += 2
        out_sets.append({"pairs": len(pairs), "accuracy": rate([m > 0 for m in margins]),
                         "margin": round(sum(margins) / len(margins), 4) if margins else None})
    sanity_scores = scores[k: k + len(sanity)]
    sanity_nll = -sum(s for s, _ in sanity_scores) / sum(n for _, n in sanity_scores)
    served = {e.feedback_id: s / max(n, 1) for e, (s, n) in zip(examples, scores[k + len(sanity):], strict=True)}
    if adapter_path is None:
        base_logps.update(served)
    missing = [e for e in examples if e.feedback_id not in base_logps]
    if missing:
        base_obj, _ = load_model(model, None)
        got = score_answers(base_obj, tokenizer, [(e.prompt, e.completion) for e in missing],
                            batch_size=batch_size, max_length=1024)
        del base_obj
        base_logps.update({e.feedback_id: s / max(n, 1) for e, (s, n) in zip(missing, got, strict=True)})
    example_out = []
    for examples_of_run in example_sets:
        signed = [(served[e.feedback_id] - base_logps[e.feedback_id]) * (1 if e.label else -1)
                  for e in examples_of_run]
        example_out.append({"thumbs": len(signed), "accuracy": rate([s > 0 for s in signed]),
                            "margin": round(sum(signed) / len(signed), 4) if signed else None})
    return {"eval_sets": out_sets, "eval_thumbs": example_out, "sanity_nll": round(sanity_nll, 5)}


def run_pair_sources(db, run_id: int) -> dict[str, dict[str, int]]:
    """The pairs run ``run_id`` used, counted by role (new, replay, eval,
    skipped) and source (comparison, thumbs, correction, import)."""
    from sqlalchemy import func
    from sqlmodel import Session, select

    from store.tables import PreferencePair, TrainingRunPair

    with Session(db) as session:
        rows = session.exec(
            select(TrainingRunPair.role, PreferencePair.source, func.count())
            .join(PreferencePair, PreferencePair.id == TrainingRunPair.pair_id)
            .where(TrainingRunPair.run_id == run_id)
            .group_by(TrainingRunPair.role, PreferencePair.source)
        ).all()
    out: dict[str, dict[str, int]] = {}
    for role, source, count in rows:
        out.setdefault(role, {})[source] = count
    return out


# -- the loop ------------------------------------------------------------------------------


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
    kto = train.get("kto") or {}
    steps = metrics.get("steps") or []
    last = steps[-1] if steps else {}
    pairs = metrics.get("pairs") or {}
    examples = metrics.get("examples") or {}
    interpolation = metrics.get("interpolation") or {}

    def rnd(v, d=4):
        return round(v, d) if isinstance(v, (int, float)) else v

    sanity, budget = numbers.get("candidate_sanity_nll"), numbers.get("max_sanity_nll")
    return {
        "run_id": run["id"], "status": run["status"], "adapter": run.get("adapter_version"),
        "parent": run.get("parent_version"), "error": (run.get("error") or "")[-600:] or None,
        "reason": metrics.get("reason"),
        "pairs": {"built": (pairs.get("built") or {}).get("added"), "new": pairs.get("new"),
                  "replay": pairs.get("replay"), "eval": pairs.get("eval"),
                  "capped": pairs.get("capped_by_user_limit"), "skipped": pairs.get("skipped")},
        "examples": {key: examples.get(key) for key in (
            "new", "waiting", "eval", "capped_by_user_limit", "deferred_by_step_budget", "skipped")},
        "train": {"steps": train.get("steps"), "seconds": train.get("seconds"),
                  "pairs_per_s": train.get("pairs_per_second"), "examples": train.get("examples"),
                  "kto": {key: kto.get(key) for key in ("steps", "examples", "desirable", "undesirable",
                                                        "desirable_weight", "undesirable_weight")} if kto else None,
                  "last_step": {k: rnd(last.get(k)) for k in (
                      "stage", "loss", "nll_loss", "log_odds_ratio", "rewards/accuracies", "rewards/margins",
                      "kl", "learning_rate") if k in last} if last else None},
        "interpolation_scale": interpolation.get("scale"),
        "gate": {
            "promote": decision.get("promote"),
            "reasons": decision.get("reasons"),
            "candidate_accuracy": rnd(numbers.get("candidate_accuracy")),
            "active_accuracy": rnd(numbers.get("active_accuracy")),
            "candidate_margin": rnd(numbers.get("candidate_margin")),
            "active_margin": rnd(numbers.get("active_margin")),
            "eval_pairs": numbers.get("pairs"),
            "candidate_example_accuracy": rnd(numbers.get("candidate_example_accuracy")),
            "active_example_accuracy": rnd(numbers.get("active_example_accuracy")),
            "candidate_example_margin": rnd(numbers.get("candidate_example_margin")),
            "active_example_margin": rnd(numbers.get("active_example_margin")),
            "eval_thumbs": numbers.get("examples"),
            "candidate_sanity_nll": rnd(sanity),
            "active_sanity_nll": rnd(numbers.get("active_sanity_nll")),
            "max_sanity_nll": rnd(budget),
            "sanity_within_budget": None if sanity is None or budget is None else sanity <= budget + 1e-9,
        },
    }


def plot(cycles: list[dict], base_sanity: float, tolerance: float, taste: Taste, population: str,
         path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [c["cycle"] for c in cycles]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    ax = axes[0][0]
    ax.plot(xs, [c["satisfaction"]["temp0"]["rate"] for c in cycles], "o-", label="temperature 0")
    ax.plot(xs, [c["satisfaction"]["sampled"]["rate"] for c in cycles], "s-", label="sampled (T=0.7)")
    unseen = cycles[0]["satisfaction"]["unseen_taste"]["name"]
    ax.plot(xs, [c["satisfaction"]["unseen_taste"]["sampled"] for c in cycles], "^:", color="gray",
            label=f"unseen taste '{unseen}' (sampled)")
    for c in cycles[1:]:
        status = c["run"]["status"]
        ax.annotate(status, (c["cycle"], c["satisfaction"]["temp0"]["rate"]), textcoords="offset points",
                    xytext=(0, 8), ha="center", fontsize=8, color="green" if status == "promoted" else "red")
    ax.set_title(f"held-out satisfaction, taste '{taste.name}':\n{taste.description}", fontsize=9)
    ax.set_xlabel("cycle (0 = base model)")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=8)

    ax = axes[0][1]
    ax.plot(xs, [c["served"]["sanity_nll"] for c in cycles], "o-", label="served model")
    ax.axhline(base_sanity, color="gray", ls="--", label="base model")
    ax.axhline(base_sanity * (1 + tolerance), color="red", ls=":", label=f"base +{tolerance:.0%} (gate budget)")
    ax.set_title("sanity-set NLL (per token)")
    ax.set_xlabel("cycle")
    ax.legend()

    ax = axes[1][0]
    for key, what, marker in (("eval_sets", "pairs", "o-"), ("eval_thumbs", "single thumbs", "s--")):
        for j in range(len(cycles) - 1):
            pts = [(c["cycle"], c["served"][key][j]["accuracy"]) for c in cycles
                   if j < len(c["served"][key]) and c["served"][key][j]["accuracy"] is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, label=f"held-out {what} of cycle {j + 1}")
    ax.set_title("served model's accuracy on each cycle's held-out feedback")
    ax.set_xlabel("cycle")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=7)

    ax = axes[1][1]
    runs = cycles[1:]
    rx = [c["cycle"] for c in runs]
    new = [c["run"]["pairs"]["new"] or 0 for c in runs]
    replay = [c["run"]["pairs"]["replay"] or 0 for c in runs]
    thumbs = [c["run"]["examples"]["new"] or 0 for c in runs]
    ev = [(c["run"]["pairs"]["eval"] or 0) + (c["run"]["examples"]["eval"] or 0) for c in runs]
    ax.bar([x - 0.2 for x in rx], new, width=0.4, label="new pairs")
    ax.bar([x - 0.2 for x in rx], replay, width=0.4, bottom=new, label="replayed pairs")
    ax.bar([x - 0.2 for x in rx], thumbs, width=0.4, bottom=[a + b for a, b in zip(new, replay, strict=True)],
           label="single thumbs (KTO)")
    ax.bar([x + 0.2 for x in rx], ev, width=0.4, label="held out (cumulative)")
    ax.set_title("what each run trained on")
    ax.set_xlabel("cycle")
    ax.legend(fontsize=8)
    for ax in axes.flat:
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(f"tuneloop learning bench: {population} population, taste '{taste.name}'")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- A/B selection: which offered prompts are worth an A/B turn (--selection-only) ----------

PROBE_LENGTHS = (1, 2, 4, 8, 16)   # probe tokens compared by --selection-only (the server probes PROBE_TOKENS)
SELECTION_REPLICAS = 400           # replays of each selector over the pool (its coin flips and turn order)
BOOTSTRAP = 2000                   # resamples of the pool's prompts for the confidence interval


def pair_seed(i: int, j: int) -> int:
    return 200_000 + 100 * i + 2 * j  # a comparison samples A with seed, B with seed + 1


def weighted_share(us: list[float], informative: list[float], rate: float) -> float | None:
    """Expected informative share of the A/B turns the uncertainty selector picks
    from a pool whose prompts have these uncertainties and informative rates:
    prompt i is chosen with p_i = min(1, c u_i), c keeping the mean p at ``rate``
    (``server.ab_selection.scale_for_rate``)."""
    from server.ab_selection import scale_for_rate

    scale = scale_for_rate(rate, us)
    if scale is None:
        return None
    ps = [min(1.0, scale * u) if u > 0 else 0.0 for u in us]
    total = sum(ps)
    return sum(p * x for p, x in zip(ps, informative, strict=True)) / total if total else None


def auc(scores: list[float], labels: list[bool]) -> float | None:
    """P(score of a positive > score of a negative), ties counting half."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not pos or not neg:
        return None
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    return round(wins / (len(pos) * len(neg)), 4)


def replay_selectors(us: list[float], informative: list[float], rate: float, replicas: int) -> dict[str, Any]:
    """Run the server's selector (``AbSelector.decide_for``, its window primed with
    the pool as a server in steady state would have it) and plain random
    selection at the same rate over the pool, ``replicas`` times in shuffled
    orders: the A/B turns each picked, and their informative share (pooled)."""
    from server.ab_selection import AbSelector

    found: dict[str, dict[str, list[float]]] = {m: {"turns": [], "informative": []} for m in ("uncertainty", "random")}
    n = len(us)
    for r in range(replicas):
        rng = random.Random(r)
        order = list(range(n))
        rng.shuffle(order)
        selector = AbSelector(None, rate, "uncertainty", rng=random.Random(10_000 + r))  # type: ignore[arg-type]
        selector.recent.extend(us[i] for i in rng.sample(range(n), n))
        chosen = {"uncertainty": [i for i in order if selector.decide_for(us[i]).compare],
                  "random": [i for i in order if rng.random() < rate]}
        for mode, picked in chosen.items():
            found[mode]["turns"].append(len(picked))
            found[mode]["informative"].append(sum(informative[i] for i in picked))
    out = {}
    for mode, data in found.items():
        turns, hits = sum(data["turns"]), sum(data["informative"])
        out[mode] = {"mean_ab_turns": round(turns / replicas, 2), "informative_share": round(hits / turns, 4)
                     if turns else None}
    return out


def selection_only(args: argparse.Namespace, emit: Callable[[dict[str, Any]], None]) -> None:
    """Which offered prompts are worth an A/B turn? No training: every prompt of
    a pool gets ``--pairs-per-prompt`` comparisons (as ``Users.ab_turn`` asks for
    them: temperature 1, MAX_TOKENS) and the model's uncertainty at several
    probe lengths; then the informative share of the A/B turns that uncertainty
    selection and random selection would pick at the same budget
    (``--ab-rate`` of the pool), both replayed over the same measured pool, plus
    the selector's expectation and a bootstrap interval for its gain."""
    from server.engine.base import PROBE_TOKENS

    taste, unseen = TASTES[args.taste], other_taste(TASTES[args.taste])
    rate = args.ab_rate
    t_start = time.monotonic()
    load_start = os.getloadavg()
    settings = bench_settings(temp_data_dir("ab-selection"), ab_selection="uncertainty", ab_rate=rate)
    loop_thread = start_loop_thread()
    engine = start_vllm_engine(settings, loop_thread)
    server = start_server(settings, loop_thread, engine)
    users = Users(server.base_url, [server.api_key(f"sim-user-{i}") for i in range(4)])
    pool = train_prompts()[args.pool_start: args.pool_start + args.pool]
    ask = [[{"role": "user", "content": prompt}] for prompt in pool]
    result: dict[str, Any] = {}
    error = None
    try:
        latency = []
        for messages in ask[:8]:  # the probe alone on the engine (the machine may be busy): what a turn waits
            started = time.perf_counter()
            loop_thread.run(engine.uncertainty(messages, None, PROBE_TOKENS), timeout=120)
            latency.append(time.perf_counter() - started)

        async def probe_all(tokens: int) -> list[float]:
            return list(await asyncio.gather(*(engine.uncertainty(m, None, tokens) for m in ask)))

        uncertainty = {k: loop_thread.run(probe_all(k), timeout=900) for k in PROBE_LENGTHS}
        log("probed %d prompts at %s tokens", len(pool), list(PROBE_LENGTHS))

        def pair(i: int, j: int) -> dict:
            made = users.post("/api/comparisons", users.headers(i), {
                "messages": ask[i], "max_tokens": MAX_TOKENS, "temperature": 1.0, "seed": pair_seed(i, j)})
            made.raise_for_status()
            return made.json()

        jobs = [(i, j) for i in range(len(pool)) for j in range(args.pairs_per_prompt)]
        bodies = run_parallel(pair, jobs, args.workers)
        log("%d comparisons generated", len(bodies))
        per_taste = {}
        for judge in (taste, unseen):
            differ = [[] for _ in pool]  # per prompt: whether each of its pairs differs in the trait
            for (i, _), body in zip(jobs, bodies, strict=True):
                differ[i].append(judge.satisfies(body["a"]["content"], body["a"]["finish_reason"])
                                 != judge.satisfies(body["b"]["content"], body["b"]["finish_reason"]))
            informative = [sum(d) / len(d) for d in differ]
            labels = [x for d in differ for x in d]
            by_length = {}
            for k, us in uncertainty.items():
                pair_us = [us[i] for i, d in enumerate(differ) for _ in d]
                rng = random.Random(k)
                gains = []
                for _ in range(BOOTSTRAP):
                    idx = [rng.randrange(len(pool)) for _ in pool]
                    share = weighted_share([us[i] for i in idx], [informative[i] for i in idx], rate)
                    if share is not None:
                        gains.append(share - sum(informative[i] for i in idx) / len(idx))
                gains.sort()
                top = sorted(range(len(pool)), key=lambda i: us[i], reverse=True)[: max(1, round(rate * len(pool)))]
                by_length[str(k)] = {
                    "auc_informative_pair": auc(pair_us, labels),
                    "expected_share_uncertainty": round(weighted_share(us, informative, rate) or 0.0, 4),
                    "gain_over_random_90ci": [round(gains[int(0.05 * len(gains))], 4),
                                              round(gains[int(0.95 * len(gains)) - 1], 4)] if gains else None,
                    "share_of_top_rate_by_uncertainty": round(sum(informative[i] for i in top) / len(top), 4),
                    "mean_uncertainty": round(sum(us) / len(us), 4),
                }
            per_taste[judge.name] = {
                "pool_informative_share": round(sum(informative) / len(informative), 4),
                "replay_probe_tokens": PROBE_TOKENS,
                "replay": replay_selectors(uncertainty[PROBE_TOKENS], informative, rate, SELECTION_REPLICAS),
                "by_probe_tokens": by_length,
            }
        result = {
            "probe_latency_idle_s": {"p50": round(sorted(latency)[len(latency) // 2], 3),
                                     "max": round(max(latency), 3), "probe_tokens": PROBE_TOKENS},
            "tastes": per_taste,
        }
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - reported in the summary line
        error = logged_error(exc)
    finally:
        tear_down(users, server, loop_thread, engine)
    summary = {
        "bench": "learning", "mode": "selection-only", "ok": error is None, "error": error,
        "taste": taste.name, "pool": len(pool), "pool_start": args.pool_start,
        "pairs_per_prompt": args.pairs_per_prompt, "ab_rate": rate,
        "replicas": SELECTION_REPLICAS, **result,
        "note": "informative: the two answers of a comparison differ in the judged trait. replay: the A/B turns "
                "each selector picks from the pool at the same rate, over the same measured answers; "
                "expected_share_uncertainty: the selector's expectation from each probe length",
        "seconds": round(time.monotonic() - t_start, 1),
        "loadavg_start": [round(x, 2) for x in load_start], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }
    stem = f"learning-ab-selection-{taste.name}" + (f"-from-{args.pool_start}" if args.pool_start else "")
    path = Path(args.out).with_suffix(".json") if args.out else RESULTS / f"{stem}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, default=str))
    emit(summary)


def results_stem(population: str, taste: str) -> str:
    """learning (the default population and taste), else learning-<population>[-<taste>]."""
    if population == "mixed" and taste == DEFAULT_TASTE:
        return "learning"
    return f"learning-{population}" + ("" if taste == DEFAULT_TASTE else f"-{taste}")


def targets(cycles: list[dict], base_sanity: float | None, tolerance: float) -> tuple[dict, dict]:
    """Each target as a boolean, and the numbers behind them. Rates are the
    served model's held-out satisfaction, cycle 0 being the base model."""
    t0 = [c["satisfaction"]["temp0"]["rate"] for c in cycles]
    ts = [c["satisfaction"]["sampled"]["rate"] for c in cycles]
    if len(t0) < 2:
        return {}, {}
    rise = {"temp0": round(max(t0[1:4]) - t0[0], 4), "sampled": round(max(ts[1:4]) - ts[0], 4)}
    drop = {name: round(max([0.0] + [a - b for a, b in zip(rates, rates[1:], strict=False)]), 4)
            for name, rates in (("temp0", t0), ("sampled", ts))}
    promoted = [c for c in cycles[1:] if c["run"]["status"] == "promoted"]
    budget = base_sanity * (1 + tolerance) if base_sanity else None
    sane = [bool(c["run"]["gate"]["sanity_within_budget"]) and budget is not None
            and c["served"]["sanity_nll"] <= budget + 1e-4 for c in promoted]
    return {
        "rises_30_points_within_3_cycles": rise["temp0"] >= 0.3 - 1e-9 and rise["sampled"] >= 0.3 - 1e-9,
        "never_falls": drop["temp0"] == 0 and drop["sampled"] == 0,
        "reaches_0_95_at_T0": max(t0) >= 0.95,
        "sanity_within_budget_at_every_promotion": all(sane) if promoted else None,
    }, {
        "cycles_run": len(cycles) - 1,
        "best_rise_within_3_cycles": rise,
        "largest_fall_between_cycles": drop,
        "best_temp0": max(t0), "best_sampled": max(ts),
        "promotions": len(promoted),
        "sanity_budget": round(budget, 5) if budget else None,
        "served_sanity_nll_at_promotions": [c["served"]["sanity_nll"] for c in promoted],
        "note": "rises: both T=0 and sampled reach base + 0.30 in cycles 1-3; never_falls: neither rate is ever "
                "below the previous cycle's; sanity: the gate's candidate NLL and the served model's, measured "
                "here, within base x (1 + tolerance) at every promotion (null: nothing was promoted)",
    }


def compact_cycle(c: dict) -> dict[str, Any]:
    """One cycle of the summary line: satisfaction, the gate and its sanity
    budget, what the feedback and the run were, forgetting."""
    g, run, fb = c["run"]["gate"], c["run"], c["feedback"]
    feedback_keys = {
        "mixed": ("ab_turns", "ab_offered", "ab_selection_basis", "ab_winners", "ab_verdicts",
                  "ab_informative_share", "thumbs_up", "thumbs_down", "thumbs_turns_with_a_pair"),
        "thumbs": ("thumbs_up", "thumbs_down", "thumbs_on_cut_answers", "thumbs_up_on_finished_answers",
                   "thumbs_down_on_finished_answers"),
        "corrections": ("corrections", "corrections_refused", "correction_pairs", "corrected_cut_answers"),
    }[fb["population"]]
    return {
        "cycle": c["cycle"], "status": run["status"], "promoted": run["status"] == "promoted",
        "adapter": c["served_adapter"],
        "sat_temp0": c["satisfaction"]["temp0"]["rate"], "sat_sampled": c["satisfaction"]["sampled"]["rate"],
        "unseen_taste": {k: c["satisfaction"]["unseen_taste"][k] for k in ("name", "temp0", "sampled")},
        "first_sentence_words_sampled": c["satisfaction"]["sampled"]["mean_first_sentence_words"],
        "feedback": {"on_policy_satisfaction": fb["on_policy_satisfaction"],
                     **{k: fb[k] for k in feedback_keys if k in fb}},
        "pairs": {"new": run["pairs"]["new"], "replay": run["pairs"]["replay"], "eval": run["pairs"]["eval"],
                  "by_role_and_source": c["pair_sources"]},
        "single_thumbs": {"new": run["examples"]["new"], "eval": run["examples"]["eval"],
                          "waiting": run["examples"]["waiting"], "kto": run["train"]["kto"]},
        "train_steps": run["train"]["steps"],
        "gate": {k: g[k] for k in ("candidate_accuracy", "active_accuracy", "candidate_margin", "active_margin",
                                   "candidate_example_accuracy", "active_example_accuracy")},
        "gate_sanity": {"candidate_nll": g["candidate_sanity_nll"], "budget": g["max_sanity_nll"],
                        "within_budget": g["sanity_within_budget"], "interpolation_scale": run["interpolation_scale"]},
        "gate_reasons": g["reasons"] if not g["promote"] else None,
        "run_reason": run["reason"],
        "sanity_nll_served": c["served"]["sanity_nll"],
        "acc_on_eval_sets": [s["accuracy"] for s in c["served"]["eval_sets"]],
        "acc_on_eval_thumbs": [s["accuracy"] for s in c["served"]["eval_thumbs"]],
        "seconds": c["seconds"],
    }


def logged_error(exc: BaseException) -> str:
    """Log a run's failure with its traceback; the text for the summary line."""
    import traceback

    error = f"{type(exc).__name__}: {exc}"
    log("ERROR %s\n%s", error, traceback.format_exc())
    return error


def tear_down(users: Any, server: Any, loop_thread: Any, engine: Any) -> None:
    """Close the clients, the server and the engine, whatever the run did."""
    users.http.close()
    server.stop()
    try:
        loop_thread.run(engine.shutdown(), timeout=120)
    finally:
        loop_thread.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 cycles, less feedback (~6-9 min)")
    parser.add_argument("--population", choices=sorted(POPULATIONS), default="mixed",
                        help="how the simulated users give feedback (default mixed)")
    parser.add_argument("--taste", choices=sorted(TASTES), default=DEFAULT_TASTE,
                        help=f"the users' hidden taste (default {DEFAULT_TASTE})")
    parser.add_argument("--cycles", type=int)
    parser.add_argument("--turns", type=int,
                        help="feedback prompts per cycle (mixed: two thirds A/B, the rest thumbs with siblings)")
    parser.add_argument("--heldout", type=int, help=f"held-out prompts (at most {len(HELDOUT_TOPICS)})")
    parser.add_argument("--thumbs-max-tokens", type=int, default=MAX_TOKENS,
                        help=f"answer length of the thumbs population (default {MAX_TOKENS}, as every population)")
    parser.add_argument("--lr", type=float, help="train_learning_rate")
    parser.add_argument("--epochs", type=float, help="train_epochs")
    parser.add_argument("--max-steps", type=int, help="train_max_steps")
    parser.add_argument("--beta", type=float, help="train_beta (ORPO lambda)")
    parser.add_argument("--kto-beta", type=float, help="train_kto_beta")
    parser.add_argument("--eval-share", type=float)
    parser.add_argument("--replay", type=float, help="replay_fraction")
    parser.add_argument("--tolerance", type=float, help="gate_sanity_tolerance")
    parser.add_argument("--ab-selection", choices=("random", "uncertainty"),
                        help="mixed population: offer ab / --ab-rate prompts with only_if_selected and let the "
                             "server pick the A/B turns (TUNELOOP_AB_SELECTION); default: the bench picks them all")
    parser.add_argument("--ab-rate", type=float, default=1 / 3,
                        help="TUNELOOP_AB_RATE for --ab-selection and --selection-only (default 1/3)")
    parser.add_argument("--selection-only", action="store_true",
                        help="no training: compare the informative share of uncertainty- and randomly selected "
                             "A/B turns on one pool (--pool, --pairs-per-prompt, --ab-rate, --taste)")
    parser.add_argument("--pool", type=int, default=96, help="--selection-only: prompts offered (default 96)")
    parser.add_argument("--pool-start", type=int, default=0,
                        help="--selection-only: first prompt of the pool in the shuffled feedback prompts (another "
                             "pool for an out-of-sample check; default 0)")
    parser.add_argument("--pairs-per-prompt", type=int, default=2,
                        help="--selection-only: comparisons generated per prompt (default 2)")
    parser.add_argument("--workers", type=int, default=8, help="concurrent HTTP requests")
    parser.add_argument("--out", help="plot path (default bench/results/learning-<population>[-<taste>].png)")
    args = parser.parse_args()
    emit = claim_stdout()
    if not 0.0 < args.ab_rate <= 1.0:
        raise SystemExit("--ab-rate must be in (0, 1]")
    if args.selection_only:
        selection_only(args, emit)
        return
    if args.ab_selection and args.population != "mixed":
        raise SystemExit("--ab-selection needs --population mixed (the only one with A/B turns)")

    mode = "quick" if args.quick else "full"
    cfg = dict(MODES[mode])
    if args.cycles is not None:
        cfg["cycles"] = args.cycles
    if args.turns is not None:
        cfg["ab"] = round(args.turns * 2 / 3)
        cfg["thumbs"] = args.turns - cfg["ab"]
        cfg["single"] = args.turns
    if args.heldout is not None:
        cfg["heldout"] = min(args.heldout, len(HELDOUT_TOPICS))
    if args.population == "thumbs":
        cfg["thumbs_max_tokens"] = args.thumbs_max_tokens
    overrides = dict(OVERRIDES)
    for arg, key in (("lr", "train_learning_rate"), ("epochs", "train_epochs"), ("eval_share", "eval_share"),
                     ("replay", "replay_fraction"), ("tolerance", "gate_sanity_tolerance"),
                     ("max_steps", "train_max_steps"), ("beta", "train_beta"), ("kto_beta", "train_kto_beta")):
        if getattr(args, arg) is not None:
            overrides[key] = getattr(args, arg)
    if args.ab_selection:
        cfg["ab_offered"] = round(cfg["ab"] / args.ab_rate)
        overrides["ab_selection"] = args.ab_selection
        overrides["ab_rate"] = args.ab_rate
    population, taste = args.population, TASTES[args.taste]
    unseen = other_taste(taste)
    give = POPULATIONS[population]

    t_start = time.monotonic()
    load_start = os.getloadavg()
    settings = bench_settings(temp_data_dir(f"learning-{population}"), **overrides)
    log("mode %s, population %s, taste %s, %s, overrides %s, data %s", mode, population, taste.name, cfg,
        overrides, settings.data_dir)
    loop_thread = start_loop_thread()
    engine = start_vllm_engine(settings, loop_thread)
    server = start_server(settings, loop_thread, engine)
    users = Users(server.base_url, [server.api_key(f"sim-user-{i}") for i in range(cfg["users"])])
    prompts = train_prompts()
    held = heldout_prompts(cfg["heldout"])
    if set(held) & set(prompts):
        raise SystemExit("held-out prompts overlap the feedback prompts")
    per_cycle = prompts_per_cycle(population, cfg)
    cycles: list[dict[str, Any]] = []
    run_ids: list[int] = []
    base_logps: dict[int, float] = {}
    adapter_path: str | None = None
    error = None
    try:
        t0 = time.monotonic()
        base_sat = measure_satisfaction(users, held, args.workers, taste, unseen)
        base_scores = score_served(settings.model, None, [], [], base_logps)
        cycles.append({"cycle": 0, "satisfaction": base_sat, "served": base_scores,
                       "seconds": {"measure": round(time.monotonic() - t0, 1)}})
        log("cycle 0 (base): %s temp0 %.2f sampled %.2f; unseen %s temp0 %.2f sampled %.2f; sanity NLL %.4f",
            taste.name, base_sat["temp0"]["rate"], base_sat["sampled"]["rate"], unseen.name,
            base_sat["unseen_taste"]["temp0"], base_sat["unseen_taste"]["sampled"], base_scores["sanity_nll"])

        for k in range(1, cfg["cycles"] + 1):
            times: dict[str, float] = {}
            t0 = time.monotonic()
            chunk = [prompts[(i + (k - 1) * per_cycle) % len(prompts)] for i in range(per_cycle)]
            feedback = give(users, chunk, cfg, k, args.workers, taste)
            times["feedback"] = round(time.monotonic() - t0, 1)
            log("cycle %d feedback: %s", k, json.dumps(feedback, default=str)[:1500])

            t0 = time.monotonic()
            run = retrain(users, timeout_s=settings.run_timeout_minutes * 60)
            times["retrain"] = round(time.monotonic() - t0, 1)
            summary = run_summary(run)
            run_ids.append(run["id"])
            log("cycle %d run %s: examples %s, kto %s, gate %s", k, run["status"], summary["examples"],
                summary["train"]["kto"], json.dumps(summary["gate"]))
            if run["status"] == "promoted":
                times["swap"] = round(wait_for_adapter(users, run["adapter_version"]), 1)
                adapters = users.http.get("/api/admin/adapters", headers=ADMIN).json()
                adapter_path = next(a["path"] for a in adapters if a["version"] == run["adapter_version"])
            elif run["status"] == "failed":
                raise RuntimeError(f"run {run['id']} failed: {run.get('error')}")

            t0 = time.monotonic()
            sat = measure_satisfaction(users, held, args.workers, taste, unseen)
            times["measure_served"] = round(time.monotonic() - t0, 1)
            t0 = time.monotonic()
            pair_sets, example_sets = eval_sets_by_cycle(server.db, run_ids, settings.eval_share)
            served = score_served(settings.model, adapter_path, pair_sets, example_sets, base_logps)
            times["score_eval_sets"] = round(time.monotonic() - t0, 1)
            cycles.append({"cycle": k, "feedback": feedback, "run": summary, "pair_sources": run_pair_sources(
                server.db, run["id"]), "satisfaction": sat, "served": served, "served_adapter": sat["adapter"],
                "seconds": times})
            log("cycle %d: %s; satisfaction temp0 %.2f sampled %.2f (unseen %s: %.2f / %.2f); sanity NLL %.4f; "
                "eval pairs %s, eval thumbs %s; times %s", k, run["status"], sat["temp0"]["rate"],
                sat["sampled"]["rate"], unseen.name, sat["unseen_taste"]["temp0"], sat["unseen_taste"]["sampled"],
                served["sanity_nll"], [s["accuracy"] for s in served["eval_sets"]],
                [s["accuracy"] for s in served["eval_thumbs"]], times)
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - reported in the summary line
        error = logged_error(exc)
    finally:
        tear_down(users, server, loop_thread, engine)

    base_sanity = cycles[0]["served"]["sanity_nll"] if cycles else None
    tolerance = overrides["gate_sanity_tolerance"]
    plot_path: Path | None = Path(args.out) if args.out else RESULTS / f"{results_stem(population, taste.name)}.png"
    if len(cycles) > 1:
        try:
            plot(cycles, base_sanity, tolerance, taste, population, plot_path)
        except Exception as exc:  # noqa: BLE001
            log("plot failed: %s", exc)
    else:
        log("no cycle finished: no plot")
    detail_path = plot_path.with_suffix(".json")
    detail_path.parent.mkdir(parents=True, exist_ok=True)
    goals, goal_numbers = targets(cycles, base_sanity, tolerance)
    detail_path.write_text(json.dumps({
        "mode": mode, "population": population, "taste": taste.name, "config": cfg, "overrides": overrides,
        "targets": goals, "target_numbers": goal_numbers, "cycles": cycles}, indent=2, default=str))

    emit({
        "bench": "learning", "mode": mode, "population": population,
        "ok": error is None and len(cycles) == cfg["cycles"] + 1, "error": error,
        "taste": {"name": taste.name, "satisfied_when": taste.description, "max_tokens": MAX_TOKENS},
        "unseen_taste": {"name": unseen.name, "satisfied_when": unseen.description},
        "settings_overrides": overrides, "config": cfg,
        "base": {"sat_temp0": cycles[0]["satisfaction"]["temp0"]["rate"] if cycles else None,
                 "sat_sampled": cycles[0]["satisfaction"]["sampled"]["rate"] if cycles else None,
                 "unseen_taste": {k: cycles[0]["satisfaction"]["unseen_taste"][k] for k in ("temp0", "sampled")}
                 if cycles else None,
                 "sanity_nll": base_sanity},
        "cycles": [compact_cycle(c) for c in cycles[1:]],
        "targets": goals, "target_numbers": goal_numbers,
        "plot": str(plot_path) if len(cycles) > 1 else None, "detail": str(detail_path),
        "seconds": round(time.monotonic() - t_start, 1),
        "loadavg_start": [round(x, 2) for x in load_start], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "note": "2-core CPU; other benchmarks may have been running at the same time (see loadavg)",
    })


if __name__ == "__main__":
    main()
