"""Shared helpers for the scripts in ``benchmarks/`` (see /work/shared/BENCHMARKS.md).

Every figure a benchmark quotes is a ratio of two things measured side by side in one run:
``interleave`` runs A and B alternately (A B A B ...) after a warm-up, ``median_ratio``
takes the median of the pairwise ratios. ``measure_bandwidth`` and ``measure_matmul_rate``
give the physical limits (memory and arithmetic) measured in the same run.
"""
from __future__ import annotations

import contextlib
import gc
import os
import platform
import random
import resource
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

# ---- machine -----------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def l3_cache_bytes() -> int | None:
    """Size of the last-level (L3) cache as the kernel reports it, or None."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        indexes = sorted(os.listdir(base))
    except OSError:
        return None
    for index in indexes:
        try:
            with open(f"{base}/{index}/level") as f:
                level = int(f.read())
            with open(f"{base}/{index}/size") as f:
                size = f.read().strip()
        except (OSError, ValueError):
            continue
        if level == 3:
            units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
            try:
                return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
            except ValueError:
                return None
    return None


def l3_cache() -> str:
    n = l3_cache_bytes()
    return "?" if n is None else f"{n / (1 << 20):.0f} MiB"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_lines(dtype: torch.dtype | str) -> list[str]:
    """Lines describing the machine and software, for the top of a benchmark's output."""
    flags = cpu_flags()
    isa = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:
        tf_version = "not installed"
    dtype_name = str(dtype).replace("torch.", "")
    return [
        f"machine: cpu {cpu_model()} | {usable_cores()} cores usable | torch threads "
        f"{torch.get_num_threads()} | L3 {l3_cache()} | isa {' '.join(isa) or 'none of avx512/amx'}"
        f"{'' if 'amx_bf16' in flags else ' (no AMX)'}",
        f"software: python {platform.python_version()} | torch {torch.__version__} | "
        f"transformers {tf_version} | dtype {dtype_name}",
        f"load average at start (1/5/15 min): {load}  (shared machine: other processes may "
        f"compete for the cores; ratios are interleaved for that reason)",
    ]


# ---- inputs ------------------------------------------------------------------------------


def random_prompts(count: int, length: int, vocab_size: int, seed: int | str,
                   low: int = 256) -> list[list[int]]:
    """``count`` prompts of ``length`` random token ids in [low, vocab_size), reproducible
    from ``seed`` (an int or a string such as ``"0-b1-2"``). Ids below ``low`` (special and byte tokens in most vocabularies) are
    avoided. Never all one token (BENCHMARKS.md)."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        p = [rng.randrange(low, vocab_size) for _ in range(length)]
        while length > 1 and len(set(p)) == 1:  # vanishingly rare; the rule is absolute
            p = [rng.randrange(low, vocab_size) for _ in range(length)]
        prompts.append(p)
    return prompts


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch token-id lists for transformers ``generate``: left padding + attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        if p:
            ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p):] = 1
    return ids, mask


# ---- contention ---------------------------------------------------------------------------


def _system_cpu_seconds() -> tuple[float, float] | None:
    """(busy seconds excluding steal, steal seconds) summed over all CPUs, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / tick, steal / tick


def _self_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class CpuMeter:
    """How much of the machine this process and everything else used during a span.

    ``others``: CPU time of other processes / (wall x CPUs), i.e. the share of the machine
    they took while we were timing (0 on a quiet machine). ``steal``: time the hypervisor
    gave our virtual CPUs to other guests, same unit. ``self``: our CPU time / (wall x CPUs)
    (spin-waiting threads count as busy).
    """

    def __enter__(self) -> "CpuMeter":
        self._sys0 = _system_cpu_seconds()
        self._self0 = _self_cpu_seconds()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._t0
        cpus = os.cpu_count() or 1
        mine = _self_cpu_seconds() - self._self0
        sys1 = _system_cpu_seconds()
        self.self = mine / (wall * cpus)
        if self._sys0 is None or sys1 is None or wall <= 0:
            self.others = self.steal = float("nan")
        else:
            busy = sys1[0] - self._sys0[0]
            self.others = max(0.0, busy - mine) / (wall * cpus)
            self.steal = (sys1[1] - self._sys0[1]) / (wall * cpus)


# ---- timing ------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(wall seconds, result) of one call, after a garbage collection outside the timing."""
    gc.collect()
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def interleave(runs: dict[str, Callable[[int], Any]], repeats: int, warmup: int = 1,
               log: Callable[[str], None] | None = None) -> dict[str, list[Any]]:
    """Call each function in ``runs`` in turn (A B A B ...), ``warmup`` rounds discarded,
    then ``repeats`` rounds kept. Each function gets the round index (warm-up rounds are
    negative) so it can use fresh inputs per round, the same for A and B within a round.
    Returns name -> list of ``repeats`` results. A result that is a dict gets the share of
    the machine other processes took during the call (``others_cpu``, see ``CpuMeter``)."""
    results: dict[str, list[Any]] = {name: [] for name in runs}
    for r in range(-warmup, repeats):
        for name, fn in runs.items():
            gc.collect()
            with CpuMeter() as meter:
                out = fn(r)
            if isinstance(out, dict):
                out["others_cpu"] = meter.others
                if meter.steal == meter.steal and meter.steal > 0.005:
                    out["steal_cpu"] = meter.steal
            if r >= 0:
                results[name].append(out)
            if log is not None:
                log(f"  {'warm-up' if r < 0 else f'round {r}'} {name}: {describe(out)}")
    return results


def others_cpu(results: dict[str, list[Any]]) -> list[float]:
    """The ``others_cpu`` shares of every timed call in an ``interleave`` result."""
    return [x["others_cpu"] for runs in results.values() for x in runs
            if isinstance(x, dict) and x.get("others_cpu") == x.get("others_cpu")
            and "others_cpu" in x]


def describe(out: Any) -> str:
    if isinstance(out, float):
        return f"{out:.4g}"
    if isinstance(out, dict):
        return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in out.items())
    return str(out)


def ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    if len(a) != len(b) or not a:
        raise ValueError(f"ratios: need two equal, non-empty lists, got {len(a)} and {len(b)}")
    return [x / y for x, y in zip(a, b)]


def median_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median of the pairwise ratios a[i] / b[i] (BENCHMARKS.md: never a ratio of medians)."""
    return statistics.median(ratios(a, b))


def stats(values: Sequence[float]) -> dict[str, float]:
    """mean, median, p99 (nearest rank), min, max."""
    v = sorted(values)
    p99 = v[min(len(v) - 1, max(0, -(-99 * len(v) // 100) - 1))]
    return {"mean": statistics.fmean(v), "median": statistics.median(v), "p99": p99,
            "min": v[0], "max": v[-1]}


def fmt_list(values: Sequence[float], spec: str = ".3g") -> str:
    return " ".join(format(x, spec) for x in values)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# ---- transformers streaming timer --------------------------------------------------------


def token_timer():
    """A transformers streamer that timestamps every generated token.

    ``generate`` puts the prompt first, then one tensor per decoding step (all rows of the
    batch at once); ``times`` holds the perf_counter time of each generated step, so
    ``times[-1] - times[0]`` is first token to last, like the engine's ``decode_s``.
    """
    from transformers.generation.streamers import BaseStreamer

    class TokenTimer(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._prompt_seen = False

        def put(self, value: torch.Tensor) -> None:
            now = time.perf_counter()
            if not self._prompt_seen:
                self._prompt_seen = True
                return
            self.times.append(now)

        def end(self) -> None:
            pass

        def decode_s(self) -> float:
            return self.times[-1] - self.times[0] if len(self.times) > 1 else float("nan")

    return TokenTimer()


# ---- physical limits ---------------------------------------------------------------------


def measure_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> dict[str, float]:
    """Memory bandwidth from a large tensor copy: (bytes read + bytes written) / time.

    ``nbytes`` per buffer should be well above the last-level cache. Returns bytes/s:
    ``best`` (the limit the hardware showed; used for floors) and ``median``.
    """
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32)
    src.uniform_()  # touch every page, nonzero data
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault in dst; warm the copy path
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        elapsed = time.perf_counter() - start
        rates.append(2 * n * 4 / elapsed)
    del src, dst
    gc.collect()
    return {"best": max(rates), "median": statistics.median(rates), "bytes_per_copy": 2 * n * 4}


def measure_matmul_rate(m: int = 512, k: int = 576, n: int = 3072,
                        dtype: torch.dtype = torch.bfloat16, min_seconds: float = 0.3,
                        repeats: int = 5) -> dict[str, float]:
    """Matrix-product rate: ``[m, k] @ [k, n]`` in a loop, 2*m*k*n FLOPs each.

    Both ``torch.mm`` and ``F.linear`` (weight stored [n, k], as in a model) are tried;
    returns FLOP/s ``best`` over both (used for floors) and each path's best.
    """
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(k, n, generator=g).to(dtype)
    w = b.t().contiguous()
    flops = 2 * m * k * n
    paths = {"mm": lambda: torch.mm(a, b),
             "linear": lambda: torch.nn.functional.linear(a, w)}
    out: dict[str, float] = {}
    with torch.inference_mode():
        for name, fn in paths.items():
            for _ in range(3):
                fn()
            start = time.perf_counter()
            iters = 0
            while time.perf_counter() - start < 0.05:
                fn()
                iters += 1
            per_call = (time.perf_counter() - start) / iters
            iters = max(1, int(min_seconds / repeats / per_call))
            best = 0.0
            for _ in range(repeats):
                start = time.perf_counter()
                for _ in range(iters):
                    fn()
                best = max(best, flops * iters / (time.perf_counter() - start))
            out[name] = best
    out["best"] = max(out[name] for name in paths)
    return out


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return f"{n:.1f} GB"


# ---- loraplex engine steps ---------------------------------------------------------------


@contextlib.contextmanager
def record_steps(engine: Any):
    """Timestamp every ``engine.step()`` while the block runs (the method is wrapped on the
    instance; ``LLM.generate`` calls ``engine.step()``). Yields a list that fills with
    (perf_counter time at the end of the step, the step's list of RequestOutputs)."""
    steps: list[tuple[float, list]] = []
    had_own = "step" in vars(engine)
    original = engine.step

    def timed_step():
        out = original()
        steps.append((time.perf_counter(), out))
        return out

    engine.step = timed_step
    try:
        yield steps
    finally:
        if had_own:
            engine.step = original
        else:
            del engine.step


def pure_decode_steps(steps: Sequence[tuple[float, list]], num_requests: int
                      ) -> tuple[list[tuple[int, int, float]], float]:
    """The pure decode steps of a ``record_steps`` recording (see ``pure_decode_rate``):
    (index in ``steps``, tokens, seconds) of each step that produced tokens, and the time
    of the step before the first of them; ([], nan) if there is none."""
    seen: set[str] = set()
    lengths: dict[str, int] = {}  # request -> generated tokens as of the last step seen
    for k, (t, outs) in enumerate(steps):
        for o in outs:
            seen.add(o.request_id)
            lengths[o.request_id] = len(o.token_ids)
        if len(seen) >= num_requests:
            found, prev = [], t
            for i, (tt, o) in enumerate(steps[k + 1:], start=k + 1):
                n = 0
                for x in o:
                    if x.error is None:
                        n += len(x.token_ids) - lengths.get(x.request_id, 0)
                    lengths[x.request_id] = len(x.token_ids)
                if n:
                    found.append((i, n, tt - prev))
                prev = tt
            return found, t
    return [], float("nan")


def pure_decode_rate(steps: Sequence[tuple[float, list]], num_requests: int) -> dict[str, float]:
    """Decode throughput over the pure decode steps of a ``record_steps`` recording: the
    steps after the one in which the last of ``num_requests`` requests got its first token
    (prefill, and prefill chunks mixed with early decodes, stay out).

    ``tok_s``: their tokens over their time (end of that step to the end of the last one).
    ``median_tok_s``: the median over those steps of tokens / step duration -- robust to
    a burst of other tenants' work on a shared machine, which inflates a few steps.
    Also ``tokens``, ``seconds``, ``steps``; nan rates if no step is left. A step's tokens
    are counted from each output's growth, so a speculative step that appends several
    tokens to a request counts them all."""
    found, start = pure_decode_steps(steps, num_requests)
    if not found:
        nan = float("nan")
        return {"tok_s": nan, "median_tok_s": nan, "tokens": 0, "seconds": nan, "steps": 0}
    tokens = sum(n for _, n, _ in found)
    seconds = steps[-1][0] - start
    return {"tok_s": tokens / seconds, "median_tok_s": statistics.median(n / s for _, n, s in found),
            "tokens": tokens, "seconds": seconds, "steps": len(found)}


def median_step_rate(times: Sequence[float], tokens_per_step: int) -> float:
    """``tokens_per_step`` / the median gap between consecutive timestamps (e.g. a
    ``token_timer``'s ``times``): the same robust rate as ``pure_decode_rate``'s."""
    gaps = [b - a for a, b in zip(times, times[1:])]
    return tokens_per_step / statistics.median(gaps) if gaps else float("nan")


# ---- output, adapters and engine runs shared by the LoRA benchmarks ------------------------

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


def say(line: str = "") -> None:
    print(line, flush=True)


def make_peft_adapter(model_path: Path, folder: Path, seed: int, **lora_kwargs) -> None:
    """A real PEFT adapter on the base (bf16), lora_B ~ N(0, 0.02), saved with save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    model.save_pretrained(folder)
    del model, base


def clone_adapter(src: Path, dst: Path, seed: int, cold: bool = False) -> Path:
    """Copy of ``src`` with every lora_B redrawn from N(0, 0.02) (seeded): new content, same shapes."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    shutil.copyfile(src / CONFIG_FILE, dst / CONFIG_FILE)
    tensors = load_file(src / WEIGHTS_FILE)
    g = torch.Generator().manual_seed(seed)
    out = {k: (torch.randn(t.shape, generator=g) * 0.02).to(t.dtype) if "lora_B" in k else t
           for k, t in tensors.items()}
    save_file(out, dst / WEIGHTS_FILE, metadata={"format": "pt"})
    if cold:
        from loraplex.bench.measure import drop_from_page_cache

        drop_from_page_cache(dst)
    return dst


def lp_generate(llm, prompts, params, loras=None) -> dict:
    """One ``LLM.generate`` call, its pure decode rate and whole-call throughput."""
    with record_steps(llm.engine) as steps:
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, lora=loras)
        wall = time.perf_counter() - t0
    bad = [o for o in outs if o.error is not None or len(o.token_ids) != params.max_tokens]
    assert not bad, f"loraplex: {bad[0].error or f'{len(bad[0].token_ids)} tokens, expected {params.max_tokens}'}"
    dec = pure_decode_rate(steps, len(prompts))
    return {"decode_tok_s": dec["median_tok_s"], "mean_tok_s": dec["tok_s"],
            "tok_s": sum(len(o.token_ids) for o in outs) / wall,
            "wall_s": wall, "ttft_s": statistics.median(o.metrics.ttft_s for o in outs),
            "step_s": len(prompts) / dec["median_tok_s"]}  # median pure decode step (full batch)
