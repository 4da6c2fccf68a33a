"""The browser UI: conversation list, chat page, streamed answers, thumbs, A/B,
and after a thumbs-down "try again" (the two answers side by side) and corrections.

Every page works without JavaScript (forms post, the server answers in full and
redirects); htmx upgrades it: the turn is appended in place and the answer
streams in over SSE. Full pages extend ``base.html``; the fragments
``_name.html`` render both inside the page and as htmx swaps.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from html import escape
from typing import Annotated, cast

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from starlette.concurrency import run_in_threadpool

from server.ab_selection import AbDecision
from server.answers import AnswerService
from server.csrf import browser_token
from server.deps import (
    AnswersDep,
    BrowserSessionDep,
    BrowserUser,
    DbDep,
    FeedbackIngestDep,
    GenerationSlotsDep,
    MetricsDep,
    PageRender,
    SessionDep,
    SettingsDep,
    TemplatesDep,
    rate_limited,
)
from server.engine.base import EngineUnavailable
from server.errors import ApiError
from server.rate_limit import GenerationSlots, RateLimited
from server.rendering import is_htmx
from server.schemas import FeedbackIn
from store.conversations import (
    add_message,
    chat_context,
    check_turn_limit,
    feedback_by_message,
    list_conversations,
    open_comparisons,
    owned_conversation,
    owned_message,
    set_leaf,
    siblings,
    start_retry,
    start_turn,
    thread,
)
from store.corrections import CorrectionRecorded, CorrectionWrite, corrections_by_message
from store.feedback import Choice, Thumb
from store.settings import Settings
from store.tables import Comparison, Conversation, Message, User

router = APIRouter(tags=["pages"], include_in_schema=False)

ContentForm = Annotated[str, Form(max_length=100_000)]


# --- view models ------------------------------------------------------------


def message_view(session: Session, user: User, message: Message, conversation: Conversation) -> dict:
    """What a message's fragment needs: feedback, correction, siblings, whether it's the leaf."""
    sibs = siblings(session, message) if message.role == "assistant" else [message]
    feedback = feedback_by_message(session, user, [message.id]).get(message.id)
    return {
        "m": message,
        "feedback": feedback,
        "correction": corrections_by_message(session, user, [message.id]).get(message.id),
        "sibling_ids": [s.id for s in sibs],
        "sibling_index": [s.id for s in sibs].index(message.id) + 1,
        "is_leaf": conversation.current_leaf_id == message.id,
    }


def thread_items(session: Session, user: User, conversation: Conversation) -> list[dict]:
    """The visible thread; an undecided A/B pair at its end is shown as one item."""
    messages = thread(session, conversation)
    pending_pairs = {
        c.message_a_id: c for c in open_comparisons(session, conversation)
    }
    items = []
    for message in messages:
        comparison = pending_pairs.get(message.id)
        if comparison is not None and message.id == conversation.current_leaf_id:
            items.append(comparison_view(session, user, comparison, conversation))
        else:
            items.append({"kind": "message", **message_view(session, user, message, conversation)})
    return items


def comparison_view(session: Session, user: User, comparison: Comparison, conversation: Conversation) -> dict:
    a = session.get(Message, comparison.message_a_id)
    b = session.get(Message, comparison.message_b_id)
    return {
        "kind": "comparison",
        "c": comparison,
        "a": message_view(session, user, a, conversation),
        "b": message_view(session, user, b, conversation),
        "retry": _is_retry(a, b),
    }


def _is_retry(a: Message, b: Message) -> bool:
    """Whether B was asked for after A had finished ("try again", ``start_retry``)
    rather than beside it (an A/B turn, whose two answers are stored together)."""
    return a.completed_at is not None and _utc(b.created_at) >= _utc(a.completed_at)


def _utc(moment: datetime) -> datetime:
    """Naive UTC: SQLite hands back naive datetimes (stored as UTC), new rows and PostgreSQL aware ones."""
    return moment.astimezone(timezone.utc).replace(tzinfo=None) if moment.tzinfo else moment


def _in_open_comparison(session: Session, message: Message) -> Comparison | None:
    return session.exec(
        select(Comparison).where(
            col(Comparison.winner).is_(None),
            (Comparison.message_a_id == message.id) | (Comparison.message_b_id == message.id),
        )
    ).first()


# --- pages ------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
def index(user: BrowserUser, session: SessionDep, render: PageRender) -> HTMLResponse:
    return render(
        "index.html", {"user": user, "conversations": list_conversations(session, user), "conversation": None}
    )


@router.get("/c/{conversation_id}", response_class=HTMLResponse)
def conversation_page(
    conversation_id: int, user: BrowserUser, session: SessionDep, render: PageRender
) -> HTMLResponse:
    conversation = owned_conversation(session, user, conversation_id)
    return render(
        "conversation.html",
        {
            "user": user,
            "conversation": conversation,
            "conversations": list_conversations(session, user),
            "items": thread_items(session, user, conversation),
        },
    )


def _check_text(text: str, max_chars: int) -> str:
    text = text.strip()
    if not text:
        raise ApiError(400, "the message is empty; type something first", "content")
    if len(text) > max_chars:
        raise ApiError(
            400, f"the message is {len(text)} characters; the limit is {max_chars}", "content"
        )
    return text


def _turn_context(
    session: Session, settings: Settings, conversation: Conversation | None, text: str, answers: AnswerService
) -> list[dict[str, str]]:
    """What the model will answer: the conversation so far and the user's new
    message. Refused (400, nothing stored) when it and the answer cannot fit
    the model's context."""
    history = chat_context(thread(session, conversation)) if conversation is not None else []
    context = [*history, {"role": "user", "content": text}]
    answers.check_context_fits(context, settings.default_max_tokens)
    return context


async def _decide_ab(
    session: Session, settings: Settings, conversation: Conversation | None, text: str, answers: AnswerService
) -> AbDecision:
    """Whether this turn is an A/B turn, and of what (``AnswerService.decide_ab``:
    it may probe the model, so it runs here, on the event loop, before the turn
    is stored in the thread pool). Raises the context check's 400 first."""
    context = await run_in_threadpool(_turn_context, session, settings, conversation, text, answers)
    return await answers.decide_ab(context)


def _add_turn(
    session: Session, settings: Settings, user: User, conversation: Conversation | None, text: str,
    answers: AnswerService, ab: AbDecision,
) -> tuple[Conversation, dict]:
    """Store the user's message and one answer, or two as an A/B turn (``ab``;
    a new conversation when ``conversation`` is None). Two samples of one
    version differ more when the second is hotter; two versions are sampled
    alike, so only the version differs."""
    contrast = ab.challenger is None
    turn = start_turn(
        session, user, conversation, [{"role": "user", "content": text}],
        [answers.web_sampling(contrast=contrast and i == 1).to_json() for i in range(2 if ab.compare else 1)],
        max_turns=settings.max_turns, source="web", compare=ab.compare, challenger=ab.challenger,
    )
    conversation = turn.conversation
    if turn.comparison is not None:
        answer = comparison_view(session, user, turn.comparison, conversation)
    else:
        answer = {"kind": "message", **message_view(session, user, turn.answers[0], conversation)}
    session.commit()
    return conversation, {"question": turn.question, "answer": answer}


def _pending_answers(session: Session, conversation: Conversation) -> list[int]:
    return list(session.exec(
        select(Message.id).where(Message.conversation_id == conversation.id, Message.status == "pending")
    ).all())


async def _finish_without_js(
    answers: AnswerService, slots: GenerationSlots, session: Session, user: User, conversation: Conversation
) -> None:
    """No JavaScript, no SSE: produce the pending answers before redirecting
    (one after the other, each holding one of the user's generation slots)."""
    for message_id in await run_in_threadpool(_pending_answers, session, conversation):
        await answers.complete(message_id, slots.take(user.id))


# The chat handlers are async because they may generate (no-JS answers); every
# database call in them runs in the thread pool, never on the event loop.


@router.post("/c", dependencies=[rate_limited("chat", page=True)])
async def new_conversation(
    request: Request, user: BrowserUser, session: SessionDep, settings: SettingsDep,
    answers: AnswersDep, slots: GenerationSlotsDep, content: ContentForm,
) -> Response:
    text = _check_text(content, settings.max_message_chars)
    slots.check(user.id)  # all the user's slots busy: 429 before anything is stored
    ab = await _decide_ab(session, settings, None, text, answers)
    conversation, _ = await run_in_threadpool(_add_turn, session, settings, user, None, text, answers, ab)
    url = f"/c/{conversation.id}"
    if is_htmx(request):
        return Response(status_code=204, headers={"HX-Location": url})
    await _finish_without_js(answers, slots, session, user, conversation)
    return RedirectResponse(url, status_code=303)


@router.post("/c/{conversation_id}/messages", dependencies=[rate_limited("chat", page=True)])
async def post_message(
    conversation_id: int, request: Request, user: BrowserUser, session: SessionDep,
    settings: SettingsDep, answers: AnswersDep, slots: GenerationSlotsDep, render: PageRender,
    content: ContentForm,
) -> Response:
    conversation = await run_in_threadpool(owned_conversation, session, user, conversation_id)
    text = _check_text(content, settings.max_message_chars)
    slots.check(user.id)
    ab = await _decide_ab(session, settings, conversation, text, answers)
    conversation, turn = await run_in_threadpool(_add_turn, session, settings, user, conversation, text, answers, ab)
    if is_htmx(request):
        return await run_in_threadpool(render, "_turn.html", {"user": user, "conversation": conversation, **turn})
    await _finish_without_js(answers, slots, session, user, conversation)
    return RedirectResponse(f"/c/{conversation.id}", status_code=303)


# --- answers: stream, stop, regenerate, select, rate ------------------------


def _sse(event: str, data: str) -> str:
    lines = data.split("\n")
    return f"event: {event}\n" + "".join(f"data: {line}\n" for line in lines) + "\n"


@router.get("/answers/{message_id}/stream")
async def stream_answer(
    message_id: int, user: BrowserUser, session: SessionDep, answers: AnswersDep,
    settings: SettingsDep, db: DbDep, templates: TemplatesDep, browser: BrowserSessionDep,
    slots: GenerationSlotsDep,
) -> StreamingResponse:
    await run_in_threadpool(_check_owned_then_close, session, user, message_id)
    # The generation starts here, before the response: with all the user's slots
    # busy the stream is refused with 429 (htmx's SSE extension retries later),
    # and an answer whose client never reads the stream still completes.
    job = await answers.start(message_id, slots.take(user.id))

    async def events():
        chunks = job.chunks() if job is not None else answers.stream(message_id, owner=user.id)
        try:
            async for chunk in chunks:
                if chunk.text:
                    yield _sse("token", escape(chunk.text))
        except (EngineUnavailable, ValueError, RateLimited) as exc:
            yield _sse("token", f'<span class="inline-error">The model could not answer: {escape(str(exc))}</span>')
        token = browser_token(settings.secret_key, browser.sid)
        yield _sse("done", await run_in_threadpool(_final_fragment, db, templates, token, user, message_id))

    return StreamingResponse(
        events(), media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _check_owned_then_close(session: Session, user: User, message_id: int) -> None:
    owned_message(session, user, message_id)
    session.close()  # the stream may last minutes: don't hold a connection


def _final_fragment(db: Engine, templates: Jinja2Templates, csrf_token: str, user: User, message_id: int) -> str:
    """The answer's fragment once its stream ends (the stream's own session was
    closed at its start, so this opens one)."""
    with Session(db) as session:
        message = session.get(Message, message_id)
        conversation = session.get(Conversation, message.conversation_id)
        view = message_view(session, user, message, conversation)
        in_comparison = _in_open_comparison(session, message) is not None
        return templates.get_template("_message.html").render(
            {**view, "in_comparison": in_comparison, "csrf": csrf_token}
        )


@router.post("/answers/{message_id}/stop")
async def stop_answer(message_id: int, user: BrowserUser, session: SessionDep, answers: AnswersDep) -> Response:
    await run_in_threadpool(owned_message, session, user, message_id)
    await answers.stop(message_id)
    return Response(status_code=204)


def _add_regeneration(
    session: Session, settings: Settings, user: User, message_id: int, answers: AnswerService
) -> tuple[Message, Conversation]:
    """Store a pending sibling of answer ``message_id`` and make it the leaf."""
    message, conversation = owned_message(session, user, message_id)
    if message.role != "assistant":
        raise ApiError(400, "only answers can be regenerated")
    check_turn_limit(session, conversation, 1, settings.max_turns)
    sibling = add_message(
        session, conversation, message.parent_id, "assistant", status="pending",
        sampling=answers.web_sampling().to_json(),
    )
    set_leaf(session, conversation, sibling)
    session.commit()
    return sibling, conversation


def _message_fragment(
    session: Session, user: User, message: Message, conversation: Conversation, render: Callable[..., HTMLResponse]
) -> HTMLResponse:
    view = message_view(session, user, message, conversation)
    return render("_message.html", {"user": user, **view})


@router.post("/answers/{message_id}/regenerate", dependencies=[rate_limited("chat", page=True)])
async def regenerate(
    message_id: int, request: Request, user: BrowserUser, session: SessionDep,
    settings: SettingsDep, answers: AnswersDep, slots: GenerationSlotsDep, render: PageRender,
) -> Response:
    slots.check(user.id)
    sibling, conversation = await run_in_threadpool(_add_regeneration, session, settings, user, message_id, answers)
    if is_htmx(request):
        return await run_in_threadpool(_message_fragment, session, user, sibling, conversation, render)
    await answers.complete(sibling.id, slots.take(user.id))
    return RedirectResponse(f"/c/{conversation.id}", status_code=303)


def _add_retry(
    session: Session, settings: Settings, user: User, message_id: int, answers: AnswerService
) -> tuple[dict, Conversation]:
    """Store a new pending answer beside answer ``message_id`` as a comparison
    (``store.conversations.start_retry``); its view and the conversation."""
    turn = start_retry(session, user, message_id, answers.web_sampling().to_json(), max_turns=settings.max_turns)
    view = comparison_view(session, user, turn.comparison, turn.conversation)
    session.commit()
    return view, turn.conversation


@router.post("/answers/{message_id}/retry", dependencies=[rate_limited("chat", page=True)])
async def retry_answer(
    message_id: int, request: Request, user: BrowserUser, session: SessionDep,
    settings: SettingsDep, answers: AnswersDep, slots: GenerationSlotsDep, render: PageRender,
) -> Response:
    """After a thumbs-down: answer the same question again and ask which of the
    two is better (the choice form posts to ``/comparisons/{id}/choice``)."""
    slots.check(user.id)
    view, conversation = await run_in_threadpool(_add_retry, session, settings, user, message_id, answers)
    if is_htmx(request):
        return await run_in_threadpool(render, "_comparison.html", {"user": user, **view})
    await answers.complete(view["b"]["m"].id, slots.take(user.id))
    return RedirectResponse(f"/c/{conversation.id}", status_code=303)


@router.post("/answers/{message_id}/select")
def select_branch(message_id: int, user: BrowserUser, session: SessionDep) -> Response:
    """Show another regeneration of an answer (and the conversation that followed it)."""
    message, conversation = owned_message(session, user, message_id)
    leaf = message
    while True:
        child = session.exec(
            select(Message).where(Message.parent_id == leaf.id).order_by(col(Message.id).desc())
        ).first()
        if child is None:
            break
        leaf = child
    set_leaf(session, conversation, leaf)
    session.commit()
    return RedirectResponse(f"/c/{conversation.id}", status_code=303)


@router.post("/answers/{message_id}/feedback", dependencies=[rate_limited("feedback", page=True)])
async def rate_answer(
    message_id: int, request: Request, user: BrowserUser, db: DbDep, ingest: FeedbackIngestDep,
    metrics: MetricsDep, render: PageRender,
    rating: Annotated[str | None, Form()] = None,
    current_rating: Annotated[str | None, Form()] = None,
    comment: Annotated[str, Form(max_length=2000)] = "",
    tags: Annotated[str, Form(max_length=500)] = "",
) -> Response:
    chosen = rating or current_rating
    if chosen not in ("up", "down"):
        raise ApiError(400, "choose thumbs up or thumbs down first", "rating")
    data = FeedbackIn(rating=chosen, comment=comment, tags=[t for t in tags.split(",") if t.strip()])
    recorded = await ingest.thumb(Thumb(user.id, message_id, data.rating, data.comment, tuple(data.tags)))
    metrics.feedback(f"thumbs_{chosen}")
    if is_htmx(request):
        return await run_in_threadpool(_view_fragment, db, user, message_id, render, "_feedback.html")
    return RedirectResponse(f"/c/{recorded.conversation_id}", status_code=303)


@router.post("/comparisons/{comparison_id}/choice", dependencies=[rate_limited("feedback", page=True)])
async def choose(
    comparison_id: int, request: Request, user: BrowserUser, db: DbDep, ingest: FeedbackIngestDep,
    metrics: MetricsDep, render: PageRender, winner: Annotated[str, Form()],
) -> Response:
    recorded = await ingest.choice(Choice(user.id, comparison_id, winner))
    metrics.feedback(f"choice_{winner}")
    if is_htmx(request):
        return await run_in_threadpool(
            _view_fragment, db, user, recorded.chosen_id, render, "_message.html", {"choice": winner}
        )
    return RedirectResponse(f"/c/{recorded.conversation_id}", status_code=303)


@router.post("/answers/{message_id}/correction", dependencies=[rate_limited("feedback", page=True)])
async def correct_answer(
    message_id: int, request: Request, user: BrowserUser, db: DbDep, settings: SettingsDep,
    ingest: FeedbackIngestDep, metrics: MetricsDep, render: PageRender, content: ContentForm = "",
) -> Response:
    """The answer the user wanted instead (``store.corrections``)."""
    write = CorrectionWrite(user.id, message_id, content, settings.max_message_chars)
    recorded = cast(CorrectionRecorded, await ingest.record(write))
    metrics.feedback("correction")
    if is_htmx(request):
        return await run_in_threadpool(_view_fragment, db, user, message_id, render, "_feedback.html")
    return RedirectResponse(f"/c/{recorded.conversation_id}#message-{message_id}", status_code=303)


def _view_fragment(
    db: Engine, user: User, message_id: int, render: Callable[..., HTMLResponse], template: str,
    extra: dict | None = None,
) -> HTMLResponse:
    """A message's fragment after its feedback was committed (read in a session of its own)."""
    with Session(db) as session:
        message, conversation = owned_message(session, user, message_id)
        view = message_view(session, user, message, conversation)
        return render(template, {"user": user, **view, **(extra or {})})
