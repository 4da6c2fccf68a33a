"""A second adapter version answering beside the served one (the A/B canary):
``ChatEngine.serve_beside`` on the fake engine, on stand-ins for a second
engine, and on the real one.

The real engine's tests share ONE second engine (the module-scoped ``beside``
fixture: starting one costs ~40 s on CPU) and run in file order: the last one
releases it. They need the merged serving mode (the CPU default); in the LoRA
mode serve_beside is load_adapter, covered by test_vllm_engine.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from server.engine.base import AdapterLoadError, AdapterRef, EngineUnavailable, GenerationChunk, SamplingSettings
from server.engine.fake import FakeChatEngine
from server.engine.loop_thread import EngineThread
from server.engine.vllm_engine import BESIDE_KV_CACHE_MIN_BYTES, KV_CACHE_ENV, VllmChatEngine
from tests.conftest import make_settings
from tests.server.test_vllm_engine import STORY, collect, make_lora, text_of

GREEDY = SamplingSettings(temperature=0.0, max_tokens=24)
HELLO = [{"role": "user", "content": "hello there"}]


async def answer(engine: Any, adapter: AdapterRef | None) -> list[GenerationChunk]:
    return [chunk async for chunk in engine.generate(HELLO, GREEDY, f"r-{time.monotonic_ns()}", adapter)]


# -- the fake engine -----------------------------------------------------------

V1 = AdapterRef("v1", 1, "/adapters/v1")
V2 = AdapterRef("v2", 2, "/adapters/v2")
V3 = AdapterRef("v3", 3, "/adapters/v3")


@pytest.fixture
def fake() -> FakeChatEngine:
    engine = FakeChatEngine(merged=True)
    asyncio.run(engine.start())
    return engine


def test_fake_the_adapter_beside_answers_as_itself_beside_the_served_one(fake: FakeChatEngine) -> None:
    async def scenario() -> None:
        await fake.serve(V1)
        await fake.serve_beside(V2)
        assert fake.serving_beside() == V2
        served, beside, pinned = await answer(fake, V1), await answer(fake, V2), await answer(fake, V3)
        assert text_of(served).startswith("[v1]") and "served_adapter" not in served[-1].extra
        assert text_of(beside).startswith("[v2]") and "served_adapter" not in beside[-1].extra
        # any other version is answered by the served one, and says so
        assert text_of(pinned).startswith("[v1]") and pinned[-1].extra["served_adapter"] == "v1"
        base = await answer(fake, None)
        assert not text_of(base).startswith("[")

    asyncio.run(scenario())


def test_fake_a_new_adapter_beside_replaces_the_last_and_none_releases_it(fake: FakeChatEngine) -> None:
    async def scenario() -> None:
        await fake.serve_beside(V2)
        await fake.serve_beside(V3)
        assert fake.serving_beside() == V3
        assert (await answer(fake, V2))[-1].extra["served_adapter"] is None  # the base model serves
        assert "served_adapter" not in (await answer(fake, V3))[-1].extra
        await fake.serve_beside(None)
        assert fake.serving_beside() is None
        assert (await answer(fake, V3))[-1].extra["served_adapter"] is None
        assert fake.beside_calls == ["v2", "v3", None]

    asyncio.run(scenario())


def test_fake_unusable_adapter_or_stopped_engine_change_nothing(fake: FakeChatEngine) -> None:
    async def scenario() -> None:
        await fake.serve_beside(V2)
        with pytest.raises(AdapterLoadError):
            await fake.serve_beside(AdapterRef("v4", 4, "/adapters/corrupt"))
        assert fake.serving_beside() == V2
        fake.beside_dead = True  # its engine died: requests for it fail, the rest are served
        assert fake.serving_beside() is None
        with pytest.raises(EngineUnavailable):
            await answer(fake, V2)
        assert (await answer(fake, None))[-1].finished
        await fake.shutdown()
        with pytest.raises(EngineUnavailable):
            await fake.serve_beside(V3)

    asyncio.run(scenario())


def test_fake_in_the_lora_mode_every_adapter_answers_as_itself() -> None:
    async def scenario() -> None:
        engine = FakeChatEngine()
        await engine.start()
        await engine.serve_beside(V2)
        assert "v2" in engine.loaded
        chunks = await answer(engine, V3)
        assert text_of(chunks).startswith("[v3]") and chunks[-1].extra == {}

    asyncio.run(scenario())


# -- routing and lifecycle, with a stand-in for the second engine ---------------


class StandIn:
    """What VllmChatEngine asks of the engine beside, without vLLM."""

    def __init__(self, dead: bool = False) -> None:
        self.dead = dead
        self.shut = False
        self.aborted: list[str] = []

    async def generate(self, messages, sampling, request_id, adapter):  # noqa: ANN001 - the ChatEngine signature
        if self.dead:
            raise EngineUnavailable("the engine beside stopped and is restarting; try again")
        yield GenerationChunk(text=f"[{adapter.name} beside]")
        yield GenerationChunk(text="", finished=True, finish_reason="stop")

    async def uncertainty(self, messages, adapter=None, tokens=4) -> float:  # noqa: ANN001
        return 0.5

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def shutdown(self) -> None:
        self.shut = True


def merged_engine_with(beside: StandIn, tmp_path: Path) -> VllmChatEngine:
    engine = VllmChatEngine(make_settings(tmp_path, engine="vllm"))
    engine.merged = True
    engine._beside_engine = beside  # type: ignore[assignment]
    engine._beside = V2
    return engine


def test_requests_for_the_adapter_beside_go_to_its_engine_and_its_death_stays_there(tmp_path: Path) -> None:
    async def scenario() -> None:
        beside = StandIn()
        engine = merged_engine_with(beside, tmp_path)
        assert text_of(await answer(engine, V2)) == "[v2 beside]"
        assert await engine.uncertainty(HELLO, V2) == 0.5
        await engine.abort("r1")
        assert beside.aborted == ["r1"]
        with pytest.raises(EngineUnavailable, match="stopped"):  # this engine is not started
            await answer(engine, V3)
        beside.dead = True
        with pytest.raises(EngineUnavailable, match="beside"):
            await answer(engine, V2)
        assert engine.restarts == 0 and engine.state == "stopped"  # untouched by the death beside

    asyncio.run(scenario())


def test_shutting_the_engine_down_takes_the_one_beside_along(tmp_path: Path) -> None:
    async def scenario() -> None:
        beside = StandIn()
        engine = merged_engine_with(beside, tmp_path)
        await engine.shutdown()
        assert beside.shut and engine.beside_engine is None and engine.serving_beside() is None

    asyncio.run(scenario())


def test_a_stopped_engine_refuses_an_adapter_beside(tmp_path: Path) -> None:
    engine = VllmChatEngine(make_settings(tmp_path, engine="vllm"))
    with pytest.raises(EngineUnavailable):
        asyncio.run(engine.serve_beside(V2))
    asyncio.run(engine.serve_beside(None))  # nothing to release: no error


# -- the real engine -------------------------------------------------------------


def process_tree(pids: list[int]) -> list[Any]:
    import psutil

    tree = []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            tree += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    return tree


def memory_mib(pids: list[int]) -> dict[str, float]:
    """RSS and USS (memory no other process shares) of processes and their children."""
    rss = uss = 0
    for proc in process_tree(pids):
        info = proc.memory_full_info()
        rss, uss = rss + info.rss, uss + info.uss
    return {"rss_mib": round(rss / 2**20, 1), "uss_mib": round(uss / 2**20, 1)}


@pytest.fixture
def run(engine_loop: EngineThread):
    def _run(coro: Coroutine[Any, Any, Any], timeout: float = 120) -> Any:
        return engine_loop.run(coro, timeout=timeout)

    return _run


@pytest.fixture(scope="module")
def candidates(vllm_engine: VllmChatEngine, tmp_path_factory: pytest.TempPathFactory) -> dict[str, AdapterRef]:
    root = tmp_path_factory.mktemp("beside")
    return {
        name: AdapterRef(f"beside-test-{name}", 950 + seed, str(make_lora(vllm_engine.model, root / name, seed=seed)))
        for name, seed in (("c1", 11), ("c2", 12))
    }


@pytest.fixture(scope="module")
def beside(
    vllm_engine: VllmChatEngine, engine_loop: EngineThread, candidates: dict[str, AdapterRef]
) -> Iterator[VllmChatEngine]:
    """The session engine with candidate c1 beside it: the file's one second engine."""
    if not vllm_engine.merged:
        pytest.skip("the session's engine serves adapters as LoRAs (serve_beside is load_adapter there)")
    engine_loop.run(vllm_engine.serve(None), timeout=120)
    main_memory = memory_mib(vllm_engine.engine_core_pids())
    started = time.monotonic()
    engine_loop.run(vllm_engine.serve_beside(candidates["c1"]), timeout=600)
    elapsed = time.monotonic() - started
    second = vllm_engine.beside_engine
    assert second is not None
    print(  # the figures the README and the lead need (run with -s)
        f"\nengine beside: serve_beside took {elapsed:.1f} s (engine start {second.start_seconds:.1f} s); "
        f"its processes {memory_mib(second.engine_core_pids())}, the main engine's {main_memory}"
    )
    try:
        yield vllm_engine
    finally:
        engine_loop.run(vllm_engine.serve_beside(None), timeout=180)


@pytest.mark.engine
def test_the_candidate_beside_answers_as_it_would_serve_and_the_rest_is_unchanged(
    beside: VllmChatEngine, run, candidates: dict[str, AdapterRef]
) -> None:
    engine, c1 = beside, candidates["c1"]
    second = engine.beside_engine
    assert second is not None and engine.serving_beside() == c1
    # its own, smaller KV cache; the variable the main engine reads is back
    assert second._llm is not None and second._llm.vllm_config.cache_config.kv_cache_memory_bytes == max(
        BESIDE_KV_CACHE_MIN_BYTES, engine._settings.kv_cache_gib * 2**30 // 4
    )
    assert os.environ[KV_CACHE_ENV] == str(engine._settings.kv_cache_gib)

    base = run(collect(engine, STORY, GREEDY))
    canary = run(collect(engine, STORY, GREEDY, adapter=c1))
    assert text_of(canary) != text_of(base)
    assert "served_adapter" not in canary[-1].extra and "served_adapter" not in base[-1].extra
    # c2 is neither served nor beside: the base model answers it, and says so
    assert run(collect(engine, STORY, GREEDY, adapter=candidates["c2"]))[-1].extra["served_adapter"] is None

    # the same folder as another version, served by the main engine: the canary
    # answered exactly what promoting it will serve (temperature 0)
    promoted = AdapterRef("beside-test-c1-promoted", 960, c1.path)
    try:
        run(engine.serve(promoted))
        assert text_of(run(collect(engine, STORY, GREEDY, adapter=promoted))) == text_of(canary)
        # what serves changed, not what answers beside it
        again = run(collect(engine, STORY, GREEDY, adapter=c1))
        assert text_of(again) == text_of(canary) and "served_adapter" not in again[-1].extra
    finally:
        run(engine.serve(None))
    assert text_of(run(collect(engine, STORY, GREEDY))) == text_of(base)


@pytest.mark.engine
def test_another_candidate_replaces_the_first_in_the_same_engine(
    beside: VllmChatEngine, run, candidates: dict[str, AdapterRef]
) -> None:
    engine, c1, c2 = beside, candidates["c1"], candidates["c2"]
    second = engine.beside_engine
    assert second is not None
    pids = second.engine_core_pids()
    first = text_of(run(collect(engine, STORY, GREEDY, adapter=c1)))
    run(engine.serve_beside(c2), timeout=300)
    assert engine.beside_engine is second and second.engine_core_pids() == pids
    assert engine.serving_beside() == c2
    chunks = run(collect(engine, STORY, GREEDY, adapter=c2))
    assert "served_adapter" not in chunks[-1].extra and text_of(chunks) != first
    # c1 is no longer beside: the served weights (the base model) answer it, and say so
    assert run(collect(engine, STORY, GREEDY, adapter=c1))[-1].extra["served_adapter"] is None


@pytest.mark.engine
def test_an_unusable_candidate_leaves_the_one_beside(
    beside: VllmChatEngine, run, candidates: dict[str, AdapterRef], tmp_path: Path
) -> None:
    engine = beside
    before = engine.serving_beside()
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterLoadError, match="beside-test-broken"):
        run(engine.serve_beside(AdapterRef("beside-test-broken", 970, str(tmp_path))))
    assert engine.serving_beside() == before and before is not None
    assert "served_adapter" not in run(collect(engine, HELLO, GREEDY, adapter=before))[-1].extra


@pytest.mark.engine
def test_none_shuts_the_engine_beside_down(beside: VllmChatEngine, run, candidates: dict[str, AdapterRef]) -> None:
    """Last of the real-engine tests: it releases the module's second engine."""
    engine = beside
    second = engine.beside_engine
    assert second is not None
    processes = process_tree(second.engine_core_pids())
    assert processes
    pinned = engine.serving_beside()
    assert pinned is not None
    run(engine.serve_beside(None), timeout=180)
    assert engine.beside_engine is None and engine.serving_beside() is None and second.state == "stopped"
    deadline = time.monotonic() + 30
    while any(proc.is_running() and proc.status() != "zombie" for proc in processes):
        assert time.monotonic() < deadline, "the second engine's processes are still running"
        time.sleep(0.5)
    # its requests are the main engine's again, which says what answered them
    assert run(collect(engine, HELLO, GREEDY, adapter=pinned))[-1].extra["served_adapter"] is None
    assert engine.ready
