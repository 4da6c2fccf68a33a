"""Single thumbs as training examples: one rated answer, no pair.

In a real chat most thumbs are single: an answer rated up or down with no
sibling rated the other way, so no chosen/rejected pair can be made from it
(``store.pairs``). Such a thumb is still a labelled example -- this answer to
this conversation was desirable, or not -- which the trainer learns from with
an unpaired objective (KTO, ``trainer.kto``) next to ORPO on the pairs.

An example is derived from its feedback row when a run selects (nothing is
built or withdrawn when a thumb changes): a thumb becomes an example when

- it made no pair (a thumb that did teaches through the pair already);
- its answer would make a pair (``store.pairs.usable_answer``: a finished model
  answer with text, not written by an API caller, not excluded); an answer cut
  at its token limit counts (``complete`` False: it is trained and scored
  without an end-of-turn token, as in pairs, so the model does not learn to
  stop mid-sentence);
- the same trust rules as pairs hold (``store.selection``): the user, the
  conversation and the message are not excluded, the account is not
  disabled, and anonymous visitors count only with TUNELOOP_TRAIN_ON_ANONYMOUS.

Like a pair, an example lands in the train or eval split for good by the hash
of its prompt, answer and label. What a run used is recorded per feedback row
with the label it had (``TrainingRunExample``), so a thumb flipped after a run
trained on it is a new example, and an adapter's lineage still shows what it
learned from.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import exists, or_
from sqlmodel import Session, col, select

from store.conversations import chat_context
from store.pairs import content_hash, split_for, usable_answer
from store.selection import cap_eval_pairs, newest_per_user, round_robin
from store.tables import Conversation, Feedback, Message, PreferencePair, TrainingRun, TrainingRunExample, User


@dataclass(frozen=True)
class Example:
    """One rated answer: ``completion`` to the chat ``prompt`` was desirable
    (``label`` True, a thumbs-up) or not."""

    feedback_id: int
    user_id: int
    message_id: int
    prompt: list[dict[str, str]]
    completion: str
    label: bool
    split: str
    content_hash: str
    complete: bool = True

    @property
    def id(self) -> int:
        """The feedback row: what the run records and the selection orders by."""
        return self.feedback_id

    def to_trl(self) -> dict:
        """TRL's unpaired preference format (KTOTrainer, BCO)."""
        return {"prompt": self.prompt, "completion": [{"role": "assistant", "content": self.completion}],
                "label": self.label}


def example_key(feedback_id: int, label: bool) -> tuple[int, bool]:
    return feedback_id, label


def single_thumbs(session: Session, eval_share: float, include_anonymous: bool = False) -> list[Example]:
    """Every single thumb that may be trained on, oldest first (see the module doc)."""
    made_pair = exists().where(or_(PreferencePair.chosen_feedback_id == Feedback.id,
                                   PreferencePair.rejected_feedback_id == Feedback.id))
    untrusted = or_(User.excluded_from_training == True, User.status == "disabled")  # noqa: E712
    if not include_anonymous:
        untrusted = or_(untrusted, User.kind == "browser")
    rows = session.exec(
        select(Feedback, Message)
        .join(Message, Message.id == Feedback.message_id)
        .join(Conversation, Conversation.id == Message.conversation_id)
        .join(User, User.id == Feedback.user_id)
        .where(~made_pair, ~untrusted, Conversation.excluded_from_training == False,  # noqa: E712
               Message.role == "assistant", Message.status == "complete", col(Message.parent_id).is_not(None))
        .order_by(col(Feedback.id))
    ).all()
    contexts: dict[int, dict[int, Message]] = {}
    examples = []
    for feedback, message in rows:
        if not usable_answer(message):
            continue
        prompt = _context(session, contexts, message)
        if not prompt or prompt[-1]["role"] != "user":
            continue
        label = feedback.rating == "up"
        digest = content_hash(prompt, message.content, "desirable" if label else "undesirable")
        examples.append(Example(
            feedback_id=feedback.id, user_id=feedback.user_id, message_id=message.id, prompt=prompt,
            completion=message.content, label=label, split=split_for(digest, eval_share), content_hash=digest,
            complete=message.finish_reason != "length",
        ))
    return examples


def _context(session: Session, cache: dict[int, dict[int, Message]], message: Message) -> list[dict[str, str]]:
    """The chat before ``message``: its parent's thread, each conversation read once."""
    if message.conversation_id not in cache:
        cache[message.conversation_id] = {
            m.id: m for m in session.exec(select(Message).where(Message.conversation_id == message.conversation_id))
        }
    by_id = cache[message.conversation_id]
    path = []
    node = by_id.get(message.parent_id)
    while node is not None:
        path.append(node)
        node = by_id.get(node.parent_id) if node.parent_id is not None else None
    return chat_context(path[::-1])


def trained_example_keys(session: Session) -> set[tuple[int, bool]]:
    """(feedback row, label) of the examples some promoted run trained on."""
    rows = session.exec(
        select(TrainingRunExample.feedback_id, TrainingRunExample.label)
        .join(TrainingRun, TrainingRun.id == TrainingRunExample.run_id)
        .where(TrainingRun.status == "promoted", col(TrainingRunExample.role).in_(("new", "replay")))
    ).all()
    return {example_key(f, label) for f, label in rows}


def skipped_example_keys(session: Session) -> set[tuple[int, bool]]:
    rows = session.exec(
        select(TrainingRunExample.feedback_id, TrainingRunExample.label).where(TrainingRunExample.role == "skipped")
    ).all()
    return {example_key(f, label) for f, label in rows}


def record_examples(session: Session, run_id: int, role: str, examples: Iterable[Example]) -> None:
    """Record that run ``run_id`` used ``examples`` as ``role`` (new, eval, skipped)."""
    session.add_all(TrainingRunExample(run_id=run_id, feedback_id=e.feedback_id, label=e.label, role=role)
                    for e in examples)


@dataclass
class ExampleSelection:
    new: list[Example]
    eval: list[Example]
    capped: int  # new examples left for later because of the per-user cap
    deferred: int = 0  # new examples left for later because of the run's budget


def select_examples_for_run(
    session: Session, eval_share: float, max_per_user: int, max_train: int | None = None,
    max_eval: int | None = None, include_anonymous: bool = False, seed: int = 0,
) -> ExampleSelection:
    """The single thumbs a run trains on and evaluates with, by the pairs' rules
    (``store.selection``): new = train-split examples no promoted run used and no
    run skipped, round-robin across users with at most ``max_per_user`` each and
    at most ``max_train`` in all; eval = the eval split, at most ``max_per_user``
    per user (their newest), at most ``max_eval`` (newest half plus a sample).
    Examples are not replayed: the pairs' replay keeps the earlier lessons."""
    used = trained_example_keys(session) | skipped_example_keys(session)
    every = single_thumbs(session, eval_share, include_anonymous)
    fresh = [e for e in every if e.split == "train" and example_key(e.feedback_id, e.label) not in used]
    new, capped = round_robin(fresh, max_per_user)
    deferred = 0
    if max_train is not None and len(new) > max_train:
        deferred, new = len(new) - max_train, new[:max_train]
    skipped = skipped_example_keys(session)
    held_out = [e for e in every if e.split == "eval" and example_key(e.feedback_id, e.label) not in skipped]
    evaluated = newest_per_user(held_out, max_per_user)
    if max_eval is not None:
        evaluated = cap_eval_pairs(evaluated, max_eval, seed)
    return ExampleSelection(new=new, eval=evaluated, capped=capped, deferred=deferred)


def count_new_examples(session: Session, eval_share: float, include_anonymous: bool = False) -> int:
    """Train-split single thumbs no promoted run used and no run skipped (what the
    scheduler counts, beside the new pairs)."""
    used = trained_example_keys(session) | skipped_example_keys(session)
    return sum(1 for e in single_thumbs(session, eval_share, include_anonymous)
               if e.split == "train" and example_key(e.feedback_id, e.label) not in used)
