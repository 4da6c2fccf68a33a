"""The worker extension vLLM injects into every CPU engine worker: the
seeded-sampling fix (importing ``cpu_seed_fix`` patches the CPU model runner)
and loading merged adapter weights (``merged_weights``). One class, because
``worker_extension_cls`` names one."""

from __future__ import annotations

from server.engine.cpu_seed_fix import CpuSeedFix
from server.engine.merged_weights import MergedWeights


class CpuWorkerExtension(CpuSeedFix, MergedWeights):
    pass
