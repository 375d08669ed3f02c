"""``loraplex explain``: why is my LoRA slower than the base model, measured on my model and
adapter, in this process.

Each scenario of BENCHMARKS.md is one function in ``scenarios.SCENARIOS``; it gets the
shared ``ExplainContext`` (the engine, the adapter, prompts, the plan) and returns a
``ScenarioResult``. A scenario whose feature is not available here (merging and speculative
decoding before they land, transformers + PEFT not installed) returns "not measured" with
the reason; one that fails for another reason is reported the same way, so the report is
always written. Then ``markdown.write_report`` writes report.md and ``plots`` the PNGs.
"""
from __future__ import annotations

import datetime
import gc
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loraplex.lora.request import LoRARequest


@dataclass(frozen=True)
class ExplainConfig:
    model: str = "smollm2-135m"
    adapter: str = ""
    draft: str | None = None
    out: str = "explain-report"
    quick: bool = False
    dtype: str = "auto"
    num_threads: int | None = None
    peer: bool = True

    def __post_init__(self) -> None:
        folder = Path(self.adapter)
        if not (folder / "adapter_config.json").is_file():
            raise ValueError(f"adapter: {self.adapter!r} is not a PEFT adapter folder "
                             "(no adapter_config.json)")
        if self.draft is not None and not Path(self.draft).is_dir():
            raise ValueError(f"draft: {self.draft!r} is not a folder")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ValueError(f"out: {self.out!r} exists and is not a folder")


@dataclass(frozen=True)
class Plan:
    """How much to measure. ``quick`` is a smoke-sized run (about 2 minutes on the default
    model); the full plan follows BENCHMARKS.md (concurrency 1, 8 and 32)."""

    rounds: int
    warmup: int
    concurrencies: tuple[int, ...]
    prompt_len: int
    output_len: int
    ttft_prompt_len: int
    adapter_counts: tuple[int, ...]
    adapters_concurrency: int
    num_registered: int
    shared_mine: int
    shared_others: int
    peer_concurrencies: tuple[int, ...]

    @classmethod
    def for_mode(cls, quick: bool) -> Plan:
        if quick:
            # warmup 0: ExplainContext.warm_up runs every batch shape once before the first
            # scenario instead of a discarded round per scenario (a third of the time).
            return cls(rounds=2, warmup=0, concurrencies=(1, 8), prompt_len=32, output_len=16,
                       ttft_prompt_len=128, adapter_counts=(1, 4, 8), adapters_concurrency=8,
                       num_registered=100, shared_mine=2, shared_others=6, peer_concurrencies=(1,))
        return cls(rounds=5, warmup=1, concurrencies=(1, 8, 32), prompt_len=128, output_len=64,
                   ttft_prompt_len=512, adapter_counts=(1, 4, 8, 16, 32), adapters_concurrency=32,
                   num_registered=1000, shared_mine=4, shared_others=28, peer_concurrencies=(1, 8))

    @property
    def max_batch(self) -> int:
        return max(*self.concurrencies, self.adapters_concurrency, self.shared_mine + self.shared_others)


@dataclass
class ScenarioResult:
    """What one scenario found. ``rows`` is its table (dicts with the same keys, in
    ``columns`` order); ``headline`` the ratios the answers quote; ``series`` what plots draw."""

    key: str
    title: str
    question: str
    measured: bool = True
    reason: str = ""  # why not measured
    columns: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    headline: dict[str, float] = field(default_factory=dict)
    series: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @classmethod
    def not_measured(cls, key: str, title: str, question: str, reason: str) -> ScenarioResult:
        return cls(key, title, question, measured=False, reason=reason)


class ExplainContext:
    """What every scenario shares: the plan, one engine with the user's adapter, prompts,
    adapter copies, and a scratch folder removed at the end."""

    def __init__(self, config: ExplainConfig, log: Callable[[str], None]) -> None:
        from loraplex.bench.workload import word_token_ids
        from loraplex.llm import LLM
        from loraplex.lora.adapter import load_adapter
        from loraplex.models.loader import read_arch
        from loraplex.models.registry import resolve_model

        self.config, self.log = config, log
        self.plan = Plan.for_mode(config.quick)
        self.model_path = resolve_model(config.model)
        self.adapter_path = Path(config.adapter).resolve()
        # Refuse a bad adapter now, with the engine's own message, before minutes of work.
        self.adapter = load_adapter(self.adapter_path, read_arch(self.model_path), max_lora_rank=1 << 16)
        plan = self.plan
        self.engine_options: dict[str, Any] = dict(
            dtype=config.dtype, num_threads=config.num_threads,
            kv_cache_gib=kv_cache_gib(read_arch(self.model_path), plan),
            enable_prefix_caching=False,  # every arm computes its whole prompt
            max_num_seqs=max(64, plan.max_batch))
        self.lora_options: dict[str, Any] = dict(
            max_loras=max(plan.adapter_counts), max_lora_rank=max(16, self.adapter.max_rank),
            max_cpu_loras=max(64, 2 * max(plan.adapter_counts) + plan.rounds * 4 + 8))
        log(f"loading {self.model_path} ...")
        self.llm = LLM(str(self.model_path), **self.engine_options, **self.lora_options)
        self.tokenizer = self.llm.tokenizer
        self.scratch = Path(tempfile.mkdtemp(prefix="loraplex-explain-"))
        self.user = LoRARequest("user-adapter", str(self.adapter_path))
        self.llm.engine.adapters.load_now(self.user)
        self.words = word_token_ids(self.tokenizer)
        # Everything loaded so far lives to the end: keep it out of the collections that
        # run between timed arms (they would cost ~0.3 s each).
        gc.freeze()
        self._copies: list[LoRARequest] = []
        self._num_cold = 0

    def prompts(self, tag: str, round_index: int, count: int, length: int | None = None) -> list[str]:
        """Fresh real-word prompts of exactly ``length`` tokens for one arm of one round."""
        from loraplex.bench.workload import random_word_prompts

        length = min(length or self.plan.prompt_len, self.llm.engine.max_model_len - self.plan.output_len - 1)
        return random_word_prompts(self.tokenizer, count, length, zlib.crc32(f"{tag}/{round_index}".encode()), self.words)

    def copies(self, count: int) -> list[LoRARequest]:
        """``count`` distinct adapters: the user's, then perturbed copies of it (loaded)."""
        from loraplex.bench.measure import copy_adapter

        while len(self._copies) < count - 1:
            k = len(self._copies) + 1
            path = copy_adapter(self.adapter_path, self.scratch / f"copy-{k}", k)
            request = LoRARequest(f"copy-{k}", str(path))
            self.llm.engine.adapters.load_now(request)
            self._copies.append(request)
        return [self.user, *self._copies][:count]

    def cold_copy(self) -> LoRARequest:
        """A copy never seen before, its files dropped from the page cache."""
        from loraplex.bench.measure import copy_adapter

        self._num_cold += 1
        path = copy_adapter(self.adapter_path, self.scratch / f"cold-{self._num_cold}",
                            10_000 + self._num_cold, cold=True)
        return LoRARequest(f"cold-{self._num_cold}", str(path))

    def warm_up(self) -> None:
        """One untimed batch of every shape the scenarios run (each concurrency, base and
        adapter, the most adapters in one batch), so first-call costs land nowhere."""
        from loraplex.bench.measure import run_batch

        plan = self.plan
        adapters = self.copies(max(plan.adapter_counts))
        for c in sorted({*plan.concurrencies, plan.adapters_concurrency, plan.shared_mine,
                         plan.shared_mine + plan.shared_others}):
            prompts = self.prompts("warm-up", c, c)
            run_batch(self.llm, prompts, plan.output_len)
            run_batch(self.llm, prompts, plan.output_len, [adapters[i % len(adapters)] for i in range(c)])
        run_batch(self.llm, self.prompts("warm-up-ttft", 0, 1, plan.ttft_prompt_len), 1, [self.user])

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)
        gc.unfreeze()


def kv_cache_gib(arch: Any, plan: Plan) -> float:
    """Twice the KV cache the largest batch needs (float32 bytes, any dtype fits): enough,
    without minutes of zeroing a default-sized cache per engine."""
    bytes_per_token = 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * 4
    tokens = plan.max_batch * (plan.prompt_len + plan.output_len + 32) + plan.ttft_prompt_len + 64
    return max(2 * tokens * bytes_per_token / 2**30, 1 / 1024)


def machine_info(ctx: ExplainContext) -> dict[str, Any]:
    import platform

    import torch

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    engine = ctx.llm.engine
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "device": str(engine.device), "dtype": str(engine.dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "model": str(ctx.model_path), "adapter": str(ctx.adapter_path),
            "adapter_rank": ctx.adapter.max_rank,
            "adapter_targets": sorted(ctx.adapter.target_modules),
            "adapter_mb": ctx.adapter.num_bytes / 1e6, "mode": "quick" if ctx.config.quick else "full",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def cpu_seconds() -> tuple[float, float]:
    """(busy seconds of the whole machine, of this process): the share of the CPUs other
    processes took during a run says how much to trust its absolute times."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in f.readline().split()[1:8])
        busy = (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        busy = float("nan")
    return busy, ru.ru_utime + ru.ru_stime


@dataclass
class ExplainReport:
    results: list[ScenarioResult]
    machine: dict[str, Any]
    plan: Plan
    summary_line: str


def run_explain(config: ExplainConfig, log: Callable[[str], None] = print) -> ExplainReport:
    from loraplex.bench import markdown, plots
    from loraplex.bench.scenarios import SCENARIOS
    from loraplex.bench.report import to_json
    from loraplex.bench.stats import write_atomic

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    busy0, mine0 = cpu_seconds()
    ctx = ExplainContext(config, log)
    try:
        machine = machine_info(ctx)
        log("warming up ...")
        ctx.warm_up()
        results = []
        for scenario in SCENARIOS:
            log(f"scenario {scenario.__name__} ...")
            t0 = time.perf_counter()
            try:
                result = scenario(ctx)
            except Exception as e:  # the report is still written; the log has the traceback
                import traceback
                log(traceback.format_exc())
                name = scenario.__name__
                result = ScenarioResult.not_measured(name, name, "", f"failed: {type(e).__name__}: {e}")
            result.seconds = time.perf_counter() - t0
            log(f"  {'done' if result.measured else 'not measured: ' + result.reason} "
                f"({result.seconds:.1f} s)")
            results.append(result)
            gc.collect()
    finally:
        ctx.close()
    machine["seconds"] = time.perf_counter() - started
    busy1, mine1 = cpu_seconds()
    others = (busy1 - busy0) - (mine1 - mine0)
    machine["others_cpu"] = max(0.0, others) / (machine["seconds"] * (os.cpu_count() or 1))
    images = plots.write_plots(results, out)
    text = markdown.render(results, machine, ctx.plan, images)
    write_atomic(out / "report.md", text)
    doc = {"machine": machine, "plan": asdict(ctx.plan), "scenarios": [asdict(r) for r in results]}
    write_atomic(out / "results.json", to_json(doc))
    return ExplainReport(results, machine, ctx.plan, markdown.summary_line(results))
