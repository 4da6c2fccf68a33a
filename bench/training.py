"""Training throughput and cycle cost of tuneloop's trainer.

Part 1 -- ORPO throughput: ``trainer.orpo.train_adapter`` against a minimal,
standard TRL script (AutoModelForCausalLM + get_peft_model + ORPOConfig /
ORPOTrainer on the same pairs as a ``datasets.Dataset`` in TRL's
conversational format) with the same batch size, steps, learning rate, LoRA
config (r=8, alpha=16, dropout 0, all-linear), float32 and bf16=False. Each
side runs in its own fresh process; pairs/s and tokens/s are measured over the
training loop only (``trainer.train()``), tokens being the non-padding tokens
of prompt+chosen and prompt+rejected per pair, like ``TrainResult``.
End-to-end seconds (imports excluded; model load, dataset preparation,
training, saving included) are reported too.

Part 2 -- cycle cost against history: a fresh database per case holding a
large history (decided A/B turns -- conversation, question, two answers,
comparison -- already built into pairs and trained by a promoted run, ~10 % of
them eval pairs) and an active adapter, plus N new decided A/B turns from many
users (below the per-user cap) that the cycle builds into pairs; then one real
``trainer.cycle.run_cycle``
(build pairs -> select new + replay + eval -> ORPO on the active adapter ->
evaluate candidate and active -> gate). Phases are timed by wrapping
``trainer.cycle``'s own functions. A control case runs the smallest N on a
10x smaller history, to separate what grows with the new pairs from what grows
with the history.

With ``--qlora`` it measures QLoRA instead of parts 1 and 2: ``train_adapter``
with float32 LoRA against QLoRA (4-bit nf4 base with double quantisation,
8-bit AdamW) on the same pairs, seed and steps, each side in its own fresh
process: seconds per step, peak RSS of the process (model load included),
load + save seconds, final loss.

Usage::

    .venv/bin/python bench/training.py --quick   # 32 pairs; N = 10, 40 on 2000 history (+10 on 200)
    .venv/bin/python bench/training.py           # 96 pairs x2; N = 50, 200, 800 on 5000 (+50 on 500)
    .venv/bin/python bench/training.py --quick --qlora   # float32 LoRA vs QLoRA on 32 pairs

Prints one JSON line last on stdout; logs go to stderr. Synthetic pairs
(fixed seed) with realistic lengths (prompt ~35 tokens, answers ~20-70 words).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_MODEL, REPO, claim_stdout, log, temp_data_dir  # noqa: E402

BATCH = 4
LR = 1e-4
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"}

MODES = {
    "quick": {"throughput_pairs": 32, "throughput_reps": 1, "history": 2000, "new": [10, 40],
              "control_history": 200},
    "full": {"throughput_pairs": 96, "throughput_reps": 2, "history": 5000, "new": [50, 200, 800],
             "control_history": 500},
}

# -- synthetic pairs -------------------------------------------------------------------

_WORD_TEXT = (
    "the a of and to in is that it for on with as are this was be by from at or an they which one "
    "you all were we there can more has their if will about would so what when up out into some time "
    "them these two than then first water been people other many way most over know could work life "
    "light warm cold small large early late plant river mountain city music garden kitchen science "
    "history animal ocean forest weather energy story simple careful quickly slowly often usually "
    "important useful common natural different similar strong gentle bright quiet busy fresh"
)
_WORDS = _WORD_TEXT.split()
_TOPICS = [
    "volcanoes", "bees", "coffee", "the moon", "glaciers", "pianos", "deserts", "penguins", "bread",
    "rivers", "clouds", "elephants", "chess", "tea", "earthquakes", "owls", "bridges", "tomatoes",
]
_TEMPLATES = ["Tell me about {t}.", "What is interesting about {t}?", "Why are {t} important?",
              "Describe {t} in a few words.", "What should I know about {t}?"]


def _sentence(rng: random.Random) -> str:
    n = rng.randint(6, 14)
    text = " ".join(rng.choice(_WORDS) for _ in range(n))
    return text[0].upper() + text[1:] + "."


def _answer(rng: random.Random, sentences: tuple[int, int]) -> str:
    return " ".join(_sentence(rng) for _ in range(rng.randint(*sentences)))


def synthetic_pair(index: int, seed: int = 0) -> tuple[list[dict[str, str]], str, str]:
    """A deterministic (prompt, chosen, rejected): a short chosen answer over a longer one."""
    rng = random.Random(seed * 1_000_003 + index)
    topic = _TOPICS[index % len(_TOPICS)]
    prompt = [{"role": "user", "content": _TEMPLATES[rng.randrange(len(_TEMPLATES))].format(t=topic)
               + f" (question {index})"}]
    return prompt, _answer(rng, (1, 3)), _answer(rng, (2, 5))


# -- part 1: throughput workers (each in its own process) --------------------------------


def worker_tuneloop(spec: dict) -> dict:
    from store.exchange.pair_format import Pair
    from trainer.config import TrainConfig
    from trainer.orpo import train_adapter

    t0 = time.perf_counter()
    pairs = [Pair(prompt=p, chosen=c, rejected=r, pair_id=i) for i, (p, c, r) in enumerate(spec["pairs"])]
    config = TrainConfig(
        lora_r=LORA["r"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"],
        target_modules=LORA["target_modules"], learning_rate=LR, batch_size=BATCH, epochs=1,
        max_steps=spec["steps"], seed=0, qlora=spec.get("qlora", False),
    )
    result = train_adapter(spec["model"], None, pairs, Path(spec["out_dir"]), config)
    return {
        "steps": result.steps, "pairs_seen": result.steps * BATCH, "train_seconds": result.seconds,
        "tokens": result.train_tokens, "pairs_per_s": result.pairs_per_second,
        "tokens_per_s": result.tokens_per_second, "end_to_end_s": round(time.perf_counter() - t0, 3),
        "final_loss": (result.step_metrics[-1] if result.step_metrics else {}).get("loss"),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # KiB on Linux
    }


def worker_trl(spec: dict) -> dict:
    """The plain script: what a TRL user would write."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"])
    model = get_peft_model(model, LoraConfig(
        r=LORA["r"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"],
        target_modules=LORA["target_modules"], task_type="CAUSAL_LM"))
    dataset = Dataset.from_list([
        {"prompt": p, "chosen": [{"role": "assistant", "content": c}],
         "rejected": [{"role": "assistant", "content": r}]}
        for p, c, r in spec["pairs"]
    ])
    args = ORPOConfig(
        output_dir=spec["out_dir"], learning_rate=LR, per_device_train_batch_size=BATCH,
        max_steps=spec["steps"], bf16=False, use_cpu=True, save_strategy="no", report_to="none",
        seed=0,
    )
    trainer = ORPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    started = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - started
    trainer.save_model(spec["out_dir"])
    rows = trainer.train_dataset
    tokens = sum(len(a) + len(b) for a, b in zip(rows["chosen_input_ids"], rows["rejected_input_ids"], strict=True))
    seen = trainer.state.global_step * BATCH
    # every row is seen exactly once (steps x batch == rows), so tokens are the dataset's
    assert seen == len(rows), (seen, len(rows))
    return {
        "steps": trainer.state.global_step, "pairs_seen": seen, "train_seconds": round(seconds, 3),
        "tokens": tokens, "pairs_per_s": round(seen / seconds, 4), "tokens_per_s": round(tokens / seconds, 2),
        "end_to_end_s": round(time.perf_counter() - t0, 3), "final_loss": output.training_loss,
    }


def run_worker(kind: str, spec: dict, workdir: Path) -> dict:
    spec_path = workdir / f"spec-{kind}.json"
    spec_path.write_text(json.dumps(spec))
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--spec", str(spec_path)],
        stdout=subprocess.PIPE, stderr=sys.stderr, cwd=str(REPO), text=True,
        env={**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed with code {proc.returncode}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = round(time.perf_counter() - started, 1)
    return result


def throughput(cfg: dict, workdir: Path) -> tuple[dict, str]:
    n = cfg["throughput_pairs"]
    pairs = [synthetic_pair(i, seed=1) for i in range(n)]
    results: dict[str, list[dict]] = {"tuneloop": [], "trl": []}
    order = ["tuneloop", "trl"]
    for rep in range(cfg["throughput_reps"]):
        for kind in (order if rep % 2 == 0 else order[::-1]):
            out_dir = workdir / f"{kind}-{rep}"
            spec = {"model": DEFAULT_MODEL, "pairs": pairs, "steps": n // BATCH, "out_dir": str(out_dir)}
            log("throughput: %s rep %d (%d pairs, %d steps)", kind, rep, n, n // BATCH)
            result = run_worker(kind, spec, workdir)
            log("  %s", result)
            results[kind].append(result)

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in results[kind])

    summary = {
        "pairs": n, "batch_size": BATCH, "steps": n // BATCH, "learning_rate": LR, "lora": LORA,
        "reps": cfg["throughput_reps"],
        **{kind: {key: med(kind, key) for key in
                  ("pairs_per_s", "tokens_per_s", "train_seconds", "end_to_end_s", "tokens")}
           for kind in results},
    }
    summary["ratio_pairs_per_s"] = round(med("tuneloop", "pairs_per_s") / med("trl", "pairs_per_s"), 3)
    summary["ratio_tokens_per_s"] = round(med("tuneloop", "tokens_per_s") / med("trl", "tokens_per_s"), 3)
    summary["ratio_end_to_end"] = round(med("trl", "end_to_end_s") / med("tuneloop", "end_to_end_s"), 3)
    summary["tokens_per_pair"] = {k: round(med(k, "tokens") / n, 1) for k in results}
    return summary, str(workdir / "tuneloop-0")


def qlora_comparison(cfg: dict, workdir: Path) -> dict:
    """float32 LoRA against QLoRA: the same pairs, seed and steps, alternating order per rep."""
    n = cfg["throughput_pairs"]
    pairs = [synthetic_pair(i, seed=1) for i in range(n)]
    results: dict[str, list[dict]] = {"lora_float32": [], "qlora": []}
    order = list(results)
    for rep in range(cfg["throughput_reps"]):
        for kind in (order if rep % 2 == 0 else order[::-1]):
            spec = {"model": DEFAULT_MODEL, "pairs": pairs, "steps": n // BATCH, "qlora": kind == "qlora",
                    "out_dir": str(workdir / f"{kind}-{rep}")}
            log("qlora: %s rep %d (%d pairs, %d steps)", kind, rep, n, n // BATCH)
            result = run_worker("tuneloop", spec, workdir)
            result["seconds_per_step"] = round(result["train_seconds"] / result["steps"], 3)
            result["load_and_save_s"] = round(result["end_to_end_s"] - result["train_seconds"], 3)
            log("  %s", result)
            results[kind].append(result)
    keys = ("seconds_per_step", "train_seconds", "load_and_save_s", "end_to_end_s", "peak_rss_mib", "final_loss")
    summary: dict[str, Any] = {
        "pairs": n, "batch_size": BATCH, "steps": n // BATCH, "learning_rate": LR, "lora": LORA,
        "reps": cfg["throughput_reps"],
        **{kind: {key: statistics.median(r[key] for r in runs) for key in keys} for kind, runs in results.items()},
    }
    lora, qlora = summary["lora_float32"], summary["qlora"]
    summary["qlora_vs_lora_seconds_per_step"] = round(qlora["seconds_per_step"] / lora["seconds_per_step"], 3)
    summary["qlora_vs_lora_peak_rss"] = round(qlora["peak_rss_mib"] / lora["peak_rss_mib"], 3)
    return summary


# -- part 2: cycle cost against a large history -------------------------------------------


def _db(settings):
    from store.db import make_engine, upgrade

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)
    return make_engine(settings.resolved_database_url)


def _ab_turns(session, turns: list[tuple[int, list[dict[str, str]], str, str]]) -> list[tuple[int, int, int]]:
    """What decided A/B turns leave in the store -- per ``(user id, prompt, chosen,
    rejected)``: a conversation, the question, two answers, the comparison (A won).
    Rows get their ids up front so thousands go in as a few batched INSERTs.
    Returns ``(comparison id, answer A id, answer B id)`` per turn."""
    from sqlalchemy import func
    from sqlmodel import select

    from store.tables import Comparison, Conversation, Message, utcnow

    def next_id(model) -> int:
        return (session.exec(select(func.max(model.id))).one() or 0) + 1

    conv0, msg0, cmp0 = next_id(Conversation), next_id(Message), next_id(Comparison)
    now = utcnow()
    conversations, messages, comparisons, ids = [], [], [], []
    for k, (user_id, prompt, chosen, rejected) in enumerate(turns):
        conv, q, a, b, c = conv0 + k, msg0 + 3 * k, msg0 + 3 * k + 1, msg0 + 3 * k + 2, cmp0 + k
        conversations.append(Conversation(id=conv, user_id=user_id, source="api", title=prompt[-1]["content"][:80]))
        messages.append(Message(id=q, conversation_id=conv, role="user", content=prompt[-1]["content"],
                                status="complete"))
        messages += [Message(id=i, conversation_id=conv, parent_id=q, role="assistant", content=text,
                             status="complete", finish_reason="stop") for i, text in ((a, chosen), (b, rejected))]
        comparisons.append(Comparison(id=c, user_id=user_id, conversation_id=conv, message_a_id=a, message_b_id=b,
                                      winner="a", decided_at=now))
        ids.append((c, a, b))
    for rows in (conversations, messages, comparisons):
        session.add_all(rows)
        session.flush()
    return ids


def seed_history(db, history: int, eval_share: float, adapter_path: str) -> dict:
    """``history`` decided A/B turns already built into pairs, all trained by one
    promoted run whose adapter is active -- what months of feedback leave behind."""
    from store.db import session_scope
    from store.pairs import content_hash, split_for
    from store.tables import AdapterVersion, PreferencePair, TrainingRun, TrainingRunPair, User, utcnow

    with session_scope(db) as session:
        users = [User(kind="api", name=f"history-{i}") for i in range(50)]
        session.add_all(users)
        session.flush()
        turns = [(users[i % len(users)].id, *synthetic_pair(i, seed=2)) for i in range(history)]
        rows = []
        made = _ab_turns(session, turns)
        for (user_id, prompt, chosen, rejected), (comparison_id, a, b) in zip(turns, made, strict=True):
            digest = content_hash(prompt, chosen, rejected)
            rows.append(PreferencePair(
                prompt=prompt, chosen=chosen, rejected=rejected, source="comparison",
                split=split_for(digest, eval_share), content_hash=digest, user_id=user_id,
                comparison_id=comparison_id, chosen_message_id=a, rejected_message_id=b,
            ))
        session.add_all(rows)
        session.flush()
        run = TrainingRun(status="promoted", trigger="manual", adapter_version=1, finished_at=utcnow())
        session.add(run)
        session.flush()
        session.add_all([TrainingRunPair(run_id=run.id, pair_id=p.id, role="new" if p.split == "train" else "eval")
                         for p in rows])
        session.add(AdapterVersion(version=1, path=adapter_path, status="active", training_run_id=run.id,
                                   activated_at=utcnow()))
        return {"train": sum(p.split == "train" for p in rows), "eval": sum(p.split == "eval" for p in rows)}


def add_new_pairs(db, new_train: int, eval_share: float, per_user: int = 40) -> dict:
    """New decided A/B turns from many users (not yet built into pairs: the cycle's
    build step does that) until ``new_train`` of them will land in the train split
    (the eval-split ones that come along are kept: that is what feedback does)."""
    from store.db import session_scope
    from store.pairs import content_hash, split_for
    from store.tables import User

    with session_scope(db) as session:
        users = [User(kind="api", name=f"new-{i}") for i in range(math.ceil(new_train / per_user))]
        session.add_all(users)
        session.flush()
        train = evals = 0
        i = 0
        turns = []
        while train < new_train:
            prompt, chosen, rejected = synthetic_pair(i, seed=3)
            split = split_for(content_hash(prompt, chosen, rejected), eval_share)
            turns.append((users[train // per_user if split == "train" else 0].id, prompt, chosen, rejected))
            train += split == "train"
            evals += split == "eval"
            i += 1
        _ab_turns(session, turns)
        return {"train": train, "eval": evals}


def one_cycle(history: int, new: int, adapter_path: str, root: Path, epochs: float = 2.0) -> dict:
    import trainer.cycle as cycle
    from store.run_lease import open_run
    from store.settings import Settings

    # no step cap: this measures how a cycle's cost grows with every new pair trained on
    settings = Settings(data_dir=root / f"h{history}-n{new}", model=DEFAULT_MODEL, engine="fake", scheduler=False,
                        train_epochs=epochs, train_max_steps=-1)
    db = _db(settings)
    t0 = time.perf_counter()
    hist = seed_history(db, history, settings.eval_share, adapter_path)
    fresh = add_new_pairs(db, new, settings.eval_share)
    seed_s = time.perf_counter() - t0
    run_id = open_run(db, "manual")

    timings: dict[str, float] = {}
    originals = {name: getattr(cycle, name) for name in ("build_pairs", "select_for_run", "_train", "_evaluate")}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timings[name] = round(time.perf_counter() - started, 3)
        return wrapper

    for name, fn in originals.items():
        setattr(cycle, name, timed(name, fn))
    try:
        started = time.perf_counter()
        status = cycle.run_cycle(settings, run_id)
        total = time.perf_counter() - started
    finally:
        for name, fn in originals.items():
            setattr(cycle, name, fn)
    from store.db import session_scope
    from store.tables import TrainingRun

    with session_scope(db) as session:
        metrics = session.get(TrainingRun, run_id).metrics or {}
    db.dispose()
    pairs = metrics.get("pairs") or {}
    train = metrics.get("train") or {}
    result = {
        "history_pairs": history, "history_eval_pairs": hist["eval"], "new_pairs": pairs.get("new"),
        "new_eval_pairs": fresh["eval"], "replay_pairs": pairs.get("replay"), "eval_pairs": pairs.get("eval"),
        "steps": train.get("steps"), "status": status, "cycle_s": round(total, 2),
        "build_pairs_s": timings.get("build_pairs"), "select_s": timings.get("select_for_run"),
        "train_s": timings.get("_train"), "train_loop_s": train.get("seconds"),
        "evaluate_s": timings.get("_evaluate"), "train_pairs_per_s": train.get("pairs_per_second"),
        "seed_db_s": round(seed_s, 1),
    }
    result["selection_plus_train_s"] = round(
        (result["build_pairs_s"] or 0) + (result["select_s"] or 0) + (result["train_s"] or 0), 2)
    shutil.rmtree(settings.data_dir, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", choices=["tuneloop", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--skip-throughput", action="store_true", help="part 2 only (trains its own active adapter)")
    parser.add_argument("--new", help="comma-separated new-pair counts for part 2 (default: the mode's)")
    parser.add_argument("--history", type=int, help="history pairs for part 2 (default: the mode's)")
    parser.add_argument("--epochs", type=float, default=2.0, help="TUNELOOP_TRAIN_EPOCHS for part 2 (default 2)")
    parser.add_argument("--no-control", action="store_true",
                        help="skip the control cycle (smallest N on a 10x smaller history)")
    parser.add_argument("--reps", type=int, help="throughput repetitions per side (default: the mode's)")
    parser.add_argument("--qlora", action="store_true",
                        help="only compare float32 LoRA with QLoRA training (instead of parts 1 and 2)")
    args = parser.parse_args()
    emit = claim_stdout()
    if args.worker:
        spec = json.loads(args.spec.read_text())
        emit((worker_tuneloop if args.worker == "tuneloop" else worker_trl)(spec))
        return

    mode = "quick" if args.quick else "full"
    cfg = dict(MODES[mode])
    if args.new:
        cfg["new"] = [int(n) for n in args.new.split(",")]
    if args.reps:
        cfg["throughput_reps"] = args.reps
    if args.history:
        cfg["history"] = args.history
        cfg["control_history"] = max(1, args.history // 10)
    started = time.monotonic()
    load_start = os.getloadavg()
    workdir = temp_data_dir("training")
    log("mode %s %s, workdir %s", mode, cfg, workdir)
    if args.qlora:
        summary, error = None, None
        try:
            summary = qlora_comparison(cfg, workdir)
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - reported in the summary line
            error = f"{type(exc).__name__}: {exc}"
        shutil.rmtree(workdir, ignore_errors=True)
        emit({
            "bench": "training-qlora", "mode": mode, "ok": error is None, "error": error, "qlora": summary,
            "seconds": round(time.monotonic() - started, 1),
            "loadavg_start": [round(x, 2) for x in load_start],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "note": "2-core CPU; peak RSS is the training process's, model load included",
        })
        return
    error = None
    tp: dict[str, Any] | None = None
    cycles: list[dict] = []
    try:
        if args.skip_throughput:
            spec = {"model": DEFAULT_MODEL, "pairs": [synthetic_pair(i, seed=1) for i in range(8)], "steps": 2,
                    "out_dir": str(workdir / "tuneloop-0")}
            run_worker("tuneloop", spec, workdir)
            adapter = str(workdir / "tuneloop-0")
        else:
            tp, adapter = throughput(cfg, workdir)
            log("throughput: %s", tp)
        # the control (smallest N on a 10x smaller history) right after the smallest N,
        # so an interrupted run (Ctrl-C still prints the summary) has both sides
        cases = [(cfg["history"], cfg["new"][0])]
        if not args.no_control:
            cases.append((cfg["control_history"], cfg["new"][0]))
        cases += [(cfg["history"], n) for n in cfg["new"][1:]]
        for history, new in cases:
            log("cycle: %d new pairs on %d history", new, history)
            result = one_cycle(history, new, adapter, workdir, args.epochs)
            log("  %s", result)
            cycles.append(result)
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - reported in the summary line
        import traceback

        error = f"{type(exc).__name__}: {exc}"
        log("ERROR %s\n%s", error, traceback.format_exc())

    scaling: dict[str, Any] = {}
    big = [c for c in cycles if c["history_pairs"] == cfg["history"]]
    if len(big) >= 2:
        a, b = big[0], big[-1]
        dn = (b["new_pairs"] or 0) - (a["new_pairs"] or 0)
        scaling["selection_plus_train_s_per_extra_new_pair"] = round(
            (b["selection_plus_train_s"] - a["selection_plus_train_s"]) / dn, 3) if dn else None
        scaling["selection_plus_train_ratio_largest_vs_smallest_new"] = round(
            b["selection_plus_train_s"] / a["selection_plus_train_s"], 2)
    control = [c for c in cycles if c["history_pairs"] == cfg["control_history"]]
    if big and control:
        a, c = big[0], control[0]
        scaling["same_new_history_ratio"] = round(a["history_pairs"] / c["history_pairs"], 1)
        scaling["selection_plus_train_ratio_big_vs_small_history"] = round(
            a["selection_plus_train_s"] / c["selection_plus_train_s"], 2)
        scaling["evaluate_ratio_big_vs_small_history"] = round(a["evaluate_s"] / c["evaluate_s"], 2)
        scaling["build_select_ratio_big_vs_small_history"] = round(
            (a["build_pairs_s"] + a["select_s"]) / max(1e-3, c["build_pairs_s"] + c["select_s"]), 2)
    shutil.rmtree(workdir, ignore_errors=True)
    emit({
        "bench": "training", "mode": mode, "ok": error is None, "error": error, "part2_epochs": args.epochs,
        "part2_history": cfg["history"], "part2_new": cfg["new"],
        "throughput": tp, "cycles": cycles, "scaling": scaling,
        "seconds": round(time.monotonic() - started, 1),
        "loadavg_start": [round(x, 2) for x in load_start], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "note": "2-core CPU, float32; other benchmarks may have been running at the same time (see loadavg)",
    })


if __name__ == "__main__":
    main()
