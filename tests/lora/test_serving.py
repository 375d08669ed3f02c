"""Multi-LoRA serving end to end: mixed batches against PEFT, adapter tiers, the adapter cap
and its no-starvation rule, refusals at run time, and the adapter in prefix-cache keys.

PEFT (``PeftModel.from_pretrained`` + ``generate``, one adapter alone) is the oracle: per
request the engine must produce the same greedy tokens and log-probabilities.
"""
from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.lora.adapter import CONFIG_FILE, WEIGHTS_FILE
from loraplex.models.registry import resolve_model

from .conftest import hf_model, make_adapter

# PEFT calls a transformers method that transformers 5 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")

VOCAB_SIZE = 49152  # the default model's tokenizer, which the tiny models borrow
TINY_KV_GIB = 0.01


# ---- model and adapter folders ----------------------------------------------------------

def make_tiny_model(folder: Path, model_type: str, seed: int = 0) -> Path:
    """A random 2-layer HF model with the default model's tokenizer files."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                             "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[model_type]
    config = config_cls(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
                        # Spread-out logits: greedy choices are far from ties.
                        initializer_range=0.15, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    with torch.no_grad():  # HF zero-initialises biases: make Qwen2's qkv bias count
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.5)
    model.save_pretrained(folder)
    for src in resolve_model("smollm2-135m").iterdir():
        if src.is_file() and src.name not in ("config.json", "generation_config.json") \
                and "safetensors" not in src.name:
            shutil.copy(src, folder / src.name)
    return folder


def edit_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], Any]) -> None:
    tensors = load_file(folder / WEIGHTS_FILE)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})


def edit_config(folder: Path, **updates: Any) -> None:
    path = folder / CONFIG_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **updates}))


def perturbed_copy(src: Path, dst: Path, seed: int, scale: float = 0.05) -> Path:
    """A copy of ``src`` with noise on every lora_B: different content, different hash."""
    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(seed)
    edit_tensors(dst, lambda t: t.update({k: v + scale * torch.randn(v.shape, generator=g)
                                          for k, v in t.items() if "lora_B" in k}))
    return dst


def random_prompts(n: int, seed: int, min_len: int = 5, max_len: int = 12) -> list[list[int]]:
    """Token-id prompts (the tiny models' text would be gibberish anyway)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB_SIZE) for _ in range(rng.randint(min_len, max_len))]
            for _ in range(n)]


def greedy(max_tokens: int, **kwargs: Any) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=5, **kwargs)


def tiny_llm(path: Path, **options: Any) -> LLM:
    return LLM(str(path), dtype="float32", kv_cache_gib=TINY_KV_GIB, **options)


# ---- the PEFT oracle --------------------------------------------------------------------

@torch.no_grad()
def peft_generate(base: Path, adapter: Path | None, prompts: list[list[int]],
                  max_tokens: int) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Per prompt: greedy tokens, per-step log-softmax [steps, vocab] from a fresh base with
    ``adapter`` applied by PEFT (or none), and the base model's first-step log-softmax."""
    from peft import PeftModel

    model = hf_model(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    results = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, temperature=None,
                             top_p=None, top_k=None, output_logits=True,
                             return_dict_in_generate=True)
        tokens = out.sequences[0, len(prompt):].tolist()
        logp = torch.cat(out.logits).float().log_softmax(-1)
        base_logp = logp[0]
        if adapter is not None:
            with model.disable_adapter():
                base_logp = model(ids).logits[0, -1].float().log_softmax(-1)
        results.append((tokens, logp, base_logp))
    return results


def assert_matches_peft(outputs: list[Any], loras: list[str | None], prompts: list[list[int]],
                        base: Path, adapters: dict[str, Path], max_tokens: int,
                        atol: float) -> None:
    """Each engine output equals PEFT's generation of its adapter alone, and each adapter
    moves the first-step distribution far beyond ``atol`` (else the check proves nothing)."""
    expected: dict[int, tuple[list[int], torch.Tensor, torch.Tensor]] = {}
    for name in [None, *adapters]:
        indices = [i for i, lora in enumerate(loras) if lora == name]
        results = peft_generate(base, adapters[name] if name else None,
                                [prompts[i] for i in indices], max_tokens)
        expected.update(zip(indices, results))
    for i, (out, lora) in enumerate(zip(outputs, loras)):
        tokens, logp, base_logp = expected[i]
        where = f"request {i} (adapter {lora})"
        assert out.token_ids == tokens, where
        assert len(out.logprobs) == len(tokens)
        got = torch.tensor([lp.logprob for lp in out.logprobs])
        want = logp[torch.arange(len(tokens)), torch.tensor(tokens)]
        torch.testing.assert_close(got, want, atol=atol, rtol=0, msg=where)
        # First step: the engine's top 5 are PEFT's top 5 (compared by value, so that
        # near-ties may swap places) and each carries PEFT's log-probability.
        top_ids = [t for t, _ in out.logprobs[0].top]
        top_values = torch.tensor([v for _, v in out.logprobs[0].top])
        torch.testing.assert_close(top_values, logp[0].topk(5).values, atol=atol, rtol=0, msg=where)
        torch.testing.assert_close(top_values, logp[0, top_ids], atol=atol, rtol=0, msg=where)
        if lora is not None:
            top = logp[0].topk(5).indices
            shift = (logp[0, top] - base_logp[top]).abs().max().item()
            assert shift > 50 * atol, f"{where} barely changes the output ({shift})"


# Ranks 4, 8, 16, 64; plain, rsLoRA and pattern scaling; attention, MLP and all-linear.
# (rank 64 on q and v only keeps the default model's adapter files small to write and read.)
ADAPTER_SPECS: dict[str, dict[str, Any]] = {
    "qv_r64": dict(r=64, lora_alpha=256, target_modules=["q_proj", "v_proj"]),
    "attn_r8_rslora": dict(r=8, lora_alpha=24, use_rslora=True,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "mlp_r16_patterns": dict(r=16, lora_alpha=48, target_modules=["gate_proj", "up_proj", "down_proj"],
                             rank_pattern={"down_proj": 4}, alpha_pattern={"up_proj": 96}),
    "all_r4": dict(r=4, lora_alpha=32, target_modules="all-linear"),
}
# Base requests beside adapter requests; one adapter used by two requests at once.
MIXED_LORAS = [None, "qv_r64", "attn_r8_rslora", "mlp_r16_patterns", "all_r4", "qv_r64"]


def make_adapter_set(base: Path, root: Path, b_std: float) -> dict[str, Path]:
    return {name: make_adapter(base, root / name, seed=i, b_std=b_std, **spec)
            for i, (name, spec) in enumerate(ADAPTER_SPECS.items())}


def run_mixed_batch(llm: LLM, adapters: dict[str, Path], prompts: list[list[int]],
                    max_tokens: int) -> list[Any]:
    loras = [LoRARequest(name, str(adapters[name])) if name else None for name in MIXED_LORAS]
    outputs = llm.generate(prompts, greedy(max_tokens), lora=loras)
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert engine.adapters.slot_refs == [0] * len(engine.adapters.slot_refs)
    # Four distinct adapters, each loaded from disk once and into a slot once.
    assert engine.adapters.stats.loads == 4 and engine.adapters.stats.slot_misses == 4
    assert sorted(h for h in engine.adapters.slot_owner if h) == sorted(engine.adapters.host)
    return outputs


# ---- against PEFT on the default model (the truth) ---------------------------------------

DEFAULT_TEXT_PROMPTS = [
    "The history of the city of Paris begins",
    "def fibonacci(n):",
    "Photosynthesis is the process by which",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
    "To make a cup of tea, first",
]


@pytest.fixture(scope="module")
def default_adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = resolve_model("smollm2-135m")
    return make_adapter_set(base, tmp_path_factory.mktemp("default_adapters"), b_std=0.02)


def test_mixed_batch_matches_peft_on_default_model(default_adapters: dict[str, Path]) -> None:
    base = resolve_model("smollm2-135m")
    llm = LLM("smollm2-135m", dtype="float32", max_loras=4, max_lora_rank=64, kv_cache_gib=0.1)
    prompts = [llm.tokenizer.encode(text) for text in DEFAULT_TEXT_PROMPTS]
    outputs = run_mixed_batch(llm, default_adapters, prompts, max_tokens=24)
    assert_matches_peft(outputs, MIXED_LORAS, prompts, base, default_adapters, 24, atol=1e-3)


# ---- against PEFT on tiny Llama and Qwen2 (qkv bias) ------------------------------------

@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {t: make_tiny_model(tmp_path_factory.mktemp(f"tiny_{t}"), t) for t in ("llama", "qwen2")}


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_mixed_batch_matches_peft_on_tiny_model(model_type: str, tiny_models: dict[str, Path],
                                                tmp_path: Path) -> None:
    base = tiny_models[model_type]
    adapters = make_adapter_set(base, tmp_path, b_std=0.2)
    llm = tiny_llm(base, max_loras=4, max_lora_rank=64)
    prompts = random_prompts(len(MIXED_LORAS), seed=1)
    outputs = run_mixed_batch(llm, adapters, prompts, max_tokens=24)
    assert_matches_peft(outputs, MIXED_LORAS, prompts, base, adapters, 24, atol=1e-4)


# ---- shared tiny adapters for the engine-behaviour tests --------------------------------

@pytest.fixture(scope="module")
def tiny_llama(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def many_adapters(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """64 adapters of distinct content: one PEFT adapter and 63 perturbed copies."""
    root = tmp_path_factory.mktemp("many_adapters")
    first = make_adapter(tiny_llama, root / "a00", seed=0, b_std=0.2, r=4, lora_alpha=8,
                         target_modules="all-linear")
    return [first] + [perturbed_copy(first, root / f"a{i:02d}", seed=i) for i in range(1, 64)]


def request(folder: Path) -> LoRARequest:
    return LoRARequest(folder.name, str(folder))


# ---- chunked prefill beside decodes --------------------------------------------------------

def test_chunked_prefills_beside_decodes_match_peft(tiny_llama: Path,
                                                    many_adapters: list[Path]) -> None:
    # A 16-token budget prefills the long prompts over several steps while the short
    # requests decode: one step mixes prefill chunks and decodes of different adapters.
    adapters = {f.name: f for f in many_adapters[:3]}
    loras = [None, "a00", "a01", "a02", "a00", None]
    prompts = random_prompts(6, seed=10, min_len=3, max_len=4)
    prompts[1] += random_prompts(1, seed=11, min_len=40, max_len=40)[0]
    prompts[5] += random_prompts(1, seed=12, min_len=30, max_len=30)[0]
    llm = tiny_llm(tiny_llama, max_num_batched_tokens=16)
    outputs = llm.generate(prompts, greedy(8), lora=[request(adapters[n]) if n else None
                                                     for n in loras])
    assert_matches_peft(outputs, loras, prompts, tiny_llama, adapters, 8, atol=1e-4)


# ---- tiers: evicted from slot and host, then reloaded ------------------------------------

def test_second_adapter_evicts_first_from_both_tiers(tiny_llama: Path,
                                                     many_adapters: list[Path]) -> None:
    llm = tiny_llm(tiny_llama, max_loras=1, max_cpu_loras=1)
    cache = llm.engine.adapters
    x, y = many_adapters[0], many_adapters[1]
    prompt = random_prompts(1, seed=2)[0]
    llm.generate(prompt, greedy(4), lora=request(x))
    (hash_x,) = cache.host
    assert cache.slot_owner == [hash_x]
    llm.generate(prompt, greedy(4), lora=request(y))
    (hash_y,) = cache.slot_owner
    assert hash_y != hash_x
    # The least recently used adapter leaves both tiers; the one just asked for stays,
    # and it was read from disk only once.
    assert list(cache.host) == [hash_y]
    assert (cache.stats.loads, cache.stats.slot_evictions, cache.stats.host_evictions) == (2, 1, 1)


def test_evicted_adapter_reloads_with_identical_output(tiny_llama: Path,
                                                       many_adapters: list[Path]) -> None:
    llm = tiny_llm(tiny_llama, max_loras=1, max_cpu_loras=1)
    cache = llm.engine.adapters
    x, y, z = many_adapters[:3]
    prompt = random_prompts(1, seed=3, min_len=8, max_len=8)[0]  # < one block: no prefix hits
    params = greedy(8, ignore_eos=True)
    first = llm.generate(prompt, params, lora=request(x))[0]
    hash_x = cache.slot_owner[0]
    # Two more adapters through one slot and one host entry: x has left both tiers.
    others = [llm.generate(prompt, params, lora=request(a))[0] for a in (y, z)]
    assert hash_x not in cache.host and hash_x not in cache.slot_owner
    assert cache.stats.slot_evictions >= 2 and cache.stats.host_evictions >= 1
    loads = cache.stats.loads
    again = llm.generate(prompt, params, lora=request(x))[0]
    assert cache.stats.loads > loads  # read from disk again
    assert cache.slot_owner == [hash_x]
    assert again.token_ids == first.token_ids
    assert [lp.logprob for lp in again.logprobs] == [lp.logprob for lp in first.logprobs]
    assert [lp.top for lp in again.logprobs] == [lp.top for lp in first.logprobs]
    for other in others:  # the slot really held other weights in between
        assert [lp.logprob for lp in other.logprobs] != [lp.logprob for lp in first.logprobs]
    assert llm.engine.block_manager.num_cache_hits == 0


# ---- many adapters, a cap of 8, and no starvation ----------------------------------------

def distinct_adapters(seqs: list[Any]) -> set[str]:
    return {s.adapter.content_hash for s in seqs if s.adapter is not None}


def spy_batches(engine: Any, monkeypatch: pytest.MonkeyPatch) -> list[set[str]]:
    """Record the distinct adapters of every batch the model runner executes, checking
    that each sequence's slot holds its own adapter."""
    seen: list[set[str]] = []
    execute = engine.runner.execute

    def spy(batch: Any) -> Any:
        for seq in batch.seqs:
            if seq.lora is not None:
                assert seq.lora_slot >= 0
                assert engine.adapters.slot_owner[seq.lora_slot] == seq.adapter.content_hash
            else:
                assert seq.lora_slot == -1
        seen.append(distinct_adapters(batch.seqs))
        return execute(batch)

    monkeypatch.setattr(engine.runner, "execute", spy)
    return seen


def test_64_adapters_with_8_slots(tiny_llama: Path, many_adapters: list[Path],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    llm = tiny_llm(tiny_llama, max_loras=8)
    engine = llm.engine
    batches = spy_batches(engine, monkeypatch)
    prompts = random_prompts(64, seed=4)
    params = greedy(4, ignore_eos=True)
    seqs = [engine.add_request(p, params, lora=request(a)) for p, a in zip(prompts, many_adapters)]
    num_steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        num_steps += 1
        assert num_steps < 2000, "requests never finished"
        assert len(distinct_adapters(engine.scheduler.running)) <= 8
    assert max(len(b) for b in batches) == 8  # the cap is reached, never passed
    assert all(len(b) <= 8 for b in batches)
    outputs = [engine.output_of(s) for s in seqs]
    assert all(o.finish_reason == "length" and len(o.token_ids) == 4 for o in outputs)
    stats = engine.adapters.stats
    assert stats.loads == 64 and stats.slot_misses == 64 and stats.slot_evictions == 56
    assert engine.adapters.slot_refs == [0] * 8
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    # Every request ran with its own adapter: PEFT agrees on a spread of them ...
    for i in range(0, 64, 9):
        (tokens, logp, _), = peft_generate(tiny_llama, many_adapters[i], [prompts[i]], 4)
        assert outputs[i].token_ids == tokens, i
        got = torch.tensor([lp.logprob for lp in outputs[i].logprobs])
        torch.testing.assert_close(got, logp[torch.arange(4), torch.tensor(tokens)],
                                   atol=1e-4, rtol=0)
    # ... and no two requests saw the same weights.
    first_steps = {tuple(v for _, v in o.logprobs[0].top) for o in outputs}
    assert len(first_steps) == 64


def run_stream_with_newcomer(llm: LLM, adapters: list[Path], num_stream_steps: int,
                             newcomer_at: int, max_tokens: int) -> tuple[dict[Any, int | None], Any]:
    """Every step, one new request for each of 8 resident adapters (so all 8 slots stay
    pinned); at step ``newcomer_at`` one request for a 9th adapter joins the queue.
    Returns, per sequence, the steps it waited for admission while the stream was on
    (None: never admitted during the stream), and the newcomer's sequence."""
    engine = llm.engine
    params = greedy(max_tokens, ignore_eos=True)
    for folder in adapters[:9]:  # in host memory: only slots are missing
        engine.adapters.load_now(request(folder))
    arrived: dict[Any, int] = {}
    waited: dict[Any, int | None] = {}
    newcomer = None
    rng = random.Random(5)
    for step in range(num_stream_steps):
        for folder in adapters[:8]:
            prompt = [rng.randrange(3, VOCAB_SIZE) for _ in range(6)]
            arrived[engine.add_request(prompt, params, lora=request(folder))] = step
        if step == newcomer_at:
            newcomer = engine.add_request(random_prompts(1, seed=6)[0], params,
                                          lora=request(adapters[8]))
            arrived[newcomer] = step
        engine.step()
        running = engine.scheduler.running
        assert len(distinct_adapters(running)) <= 8
        if newcomer is None and step >= 1:  # the stream alone fills all 8 slots
            assert len(distinct_adapters(running)) == 8
        for seq, arrival in arrived.items():
            if seq not in waited and seq.metrics.first_scheduled_time is not None:
                waited[seq] = step - arrival
    num_steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        num_steps += 1
        assert num_steps < 2000
    return {seq: waited.get(seq) for seq in arrived}, newcomer


STREAM_MAX_TOKENS, NEWCOMER_AT, NUM_STREAM_STEPS = 3, 4, 40


@pytest.fixture(scope="module")
def stream_run(tiny_llama: Path, many_adapters: list[Path]) -> Callable[[int], Any]:
    """``stream_run(max_lora_wait_steps) -> (waited, newcomer, batches, llm)``, run once each."""
    runs: dict[int, Any] = {}

    def run(max_lora_wait_steps: int) -> Any:
        if max_lora_wait_steps not in runs:
            llm = tiny_llm(tiny_llama, max_loras=8, max_lora_wait_steps=max_lora_wait_steps)
            with pytest.MonkeyPatch.context() as monkeypatch:
                batches = spy_batches(llm.engine, monkeypatch)
                waited, newcomer = run_stream_with_newcomer(
                    llm, many_adapters, NUM_STREAM_STEPS, NEWCOMER_AT, STREAM_MAX_TOKENS)
            runs[max_lora_wait_steps] = waited, newcomer, batches, llm
        return runs[max_lora_wait_steps]

    return run


def check_stream_finished(waited: dict[Any, int | None], batches: list[set[str]], llm: LLM) -> None:
    assert all(len(b) <= 8 for b in batches) and max(len(b) for b in batches) == 8
    for seq in waited:
        out = llm.engine.output_of(seq)
        assert out.finish_reason == "length" and len(out.token_ids) == STREAM_MAX_TOKENS
    assert llm.engine.adapters.slot_refs == [0] * 8


def test_request_for_ninth_adapter_is_admitted_within_bound(stream_run: Callable) -> None:
    wait_steps = 3
    waited, newcomer, batches, llm = stream_run(wait_steps)
    check_stream_finished(waited, batches, llm)
    # Passed over for max_lora_wait_steps steps, then slots drain (each stream request
    # needs max_tokens steps) and the newcomer takes the first free one.
    assert waited[newcomer] is not None, "the newcomer was never admitted during the stream"
    assert waited[newcomer] <= wait_steps + STREAM_MAX_TOKENS + 3
    assert newcomer.num_lora_skips > wait_steps  # it really was contended


def test_without_the_bound_the_stream_would_starve_it(stream_run: Callable) -> None:
    # The control for the test above: the scenario really keeps every slot pinned.
    waited, newcomer, batches, llm = stream_run(1000)
    check_stream_finished(waited, batches, llm)
    assert waited[newcomer] is None
    assert [w for seq, w in waited.items() if seq is not newcomer] == [0] * (8 * NUM_STREAM_STEPS)


def test_stream_keeps_flowing_after_a_starved_request(stream_run: Callable) -> None:
    # The stream only pauses while slots drain for the newcomer: no stream request waits
    # much longer than that drain (a wait that grows with the stream is unbounded).
    wait_steps = 3
    waited, newcomer, _, _ = stream_run(wait_steps)
    stream_waits = [w for seq, w in waited.items() if seq is not newcomer]
    bound = 2 * (wait_steps + STREAM_MAX_TOKENS) + 4
    late = [w for w in stream_waits if w is None or w > bound]
    never = sum(1 for w in late if w is None)
    assert not late, (f"{len(late)} of {len(stream_waits)} stream requests waited more than "
                      f"{bound} steps ({never} not admitted at all before the stream ended)")


# ---- refusals ---------------------------------------------------------------------------

Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def _bin_only(folder: Path) -> None:
    torch.save(load_file(folder / WEIGHTS_FILE), folder / "adapter_model.bin")
    (folder / WEIGHTS_FILE).unlink()


# case -> (how to break a copy of the good adapter, text the error must contain)
BREAKAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "dora": (lambda f: edit_config(f, use_dora=True), "use_dora"),
    "shape_mismatch": (lambda f: edit_tensors(f, lambda t: t.__setitem__(
        Q_A, t[Q_A][:, :32].contiguous())), "shapes"),
    "nan": (lambda f: edit_tensors(f, lambda t: t[Q_A].__setitem__((0, 0), float("nan"))), "NaN"),
    "bin_only": (_bin_only, "adapter_model.bin"),
}
REFUSAL_CASES = [*BREAKAGES, "rank_above_max"]


@pytest.fixture(scope="module")
def refusal_setup(tiny_llama: Path, many_adapters: list[Path],
                  tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An engine with max_lora_rank 8, a good adapter, bad folders, and the outputs of
    the good requests run without any bad one."""
    root = tmp_path_factory.mktemp("bad_adapters")
    good = many_adapters[0]  # rank 4, all-linear
    bad = {}
    for case, (breakage, _) in BREAKAGES.items():
        bad[case] = shutil.copytree(good, root / case)
        breakage(bad[case])
    bad["rank_above_max"] = make_adapter(tiny_llama, root / "rank_above_max", seed=7, b_std=0.2,
                                         r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    llm = tiny_llm(tiny_llama, max_loras=4, max_lora_rank=8)
    prompts = random_prompts(3, seed=8, max_len=10)  # < one block: outputs never cached
    loras = [None, request(good), request(many_adapters[1])]
    reference = llm.generate(prompts, greedy(6, ignore_eos=True), lora=loras)
    return dict(llm=llm, bad=bad, prompts=prompts, loras=loras, reference=reference)


def count_executions(engine: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    execute = engine.runner.execute

    def counting(batch: Any) -> Any:
        calls[0] += 1
        return execute(batch)

    monkeypatch.setattr(engine.runner, "execute", counting)
    return calls


@pytest.mark.parametrize("case", REFUSAL_CASES)
def test_refused_adapter_raises_from_generate_before_anything_runs(
        case: str, refusal_setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    llm, folder = refusal_setup["llm"], refusal_setup["bad"][case]
    expected = dict(BREAKAGES).get(case, (None, "max_lora_rank"))[1]
    engine = llm.engine
    calls = count_executions(engine, monkeypatch)
    prompts = [*refusal_setup["prompts"], [5, 6, 7, 8]]
    with pytest.raises(ValueError, match=expected) as info:
        llm.generate(prompts, greedy(6), lora=[*refusal_setup["loras"], request(folder)])
    assert str(folder) in str(info.value)
    assert calls[0] == 0
    assert not engine.has_unfinished_requests() and not engine.sequences
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("case", REFUSAL_CASES)
def test_refused_adapter_fails_only_its_request(case: str, refusal_setup: dict[str, Any]) -> None:
    llm, folder = refusal_setup["llm"], refusal_setup["bad"][case]
    expected = dict(BREAKAGES).get(case, (None, "max_lora_rank"))[1]
    engine = llm.engine
    params = greedy(6, ignore_eos=True)
    prompts, loras = refusal_setup["prompts"], refusal_setup["loras"]
    seqs = [engine.add_request(prompts[0], params, lora=loras[0]),
            engine.add_request([5, 6, 7, 8], params, lora=request(folder)),
            engine.add_request(prompts[1], params, lora=loras[1]),
            engine.add_request(prompts[2], params, lora=loras[2])]
    finished = {}
    num_steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        num_steps += 1
        assert num_steps < 1000
    failed = finished[seqs[1].request_id]
    assert failed.finish_reason == "error" and failed.token_ids == []
    assert expected in failed.error and str(folder) in failed.error
    for seq, want in zip([seqs[0], *seqs[2:]], refusal_setup["reference"]):
        out = finished[seq.request_id]
        assert out.finish_reason == "length" and out.error is None
        assert out.token_ids == want.token_ids
        torch.testing.assert_close(torch.tensor([lp.logprob for lp in out.logprobs]),
                                   torch.tensor([lp.logprob for lp in want.logprobs]),
                                   atol=1e-5, rtol=0)
    assert engine.adapters.slot_refs == [0] * 4
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


# ---- prefix cache keys include the adapter ----------------------------------------------

def test_prefix_cache_is_keyed_by_adapter_content(tiny_llama: Path, many_adapters: list[Path],
                                                  tmp_path: Path) -> None:
    a, b = many_adapters[0], many_adapters[5]
    a_renamed = shutil.copytree(a, tmp_path / "same_content_other_name")
    prompt = random_prompts(1, seed=9, min_len=50, max_len=50)[0]  # 3 full blocks + 2 tokens
    params = greedy(6, ignore_eos=True)
    uncached = tiny_llm(tiny_llama, enable_prefix_caching=False)
    want = {name: uncached.generate(prompt, params, lora=lora)[0]
            for name, lora in (("a", request(a)), ("b", request(b)), ("base", None))}
    assert uncached.engine.block_manager.num_cache_hits == 0
    first_a = [lp.logprob for lp in want["a"].logprobs]
    assert max(abs(x - y) for x, y in zip(first_a, [lp.logprob for lp in want["b"].logprobs])) > 1e-2

    llm = tiny_llm(tiny_llama)
    blocks = llm.engine.block_manager

    def run(lora: LoRARequest | None, expected: Any) -> int:
        hits = blocks.num_cache_hits
        out = llm.generate(prompt, params, lora=lora)[0]
        assert out.token_ids == expected.token_ids
        torch.testing.assert_close(torch.tensor([lp.logprob for lp in out.logprobs]),
                                   torch.tensor([lp.logprob for lp in expected.logprobs]),
                                   atol=1e-4, rtol=0)
        return blocks.num_cache_hits - hits

    assert run(request(a), want["a"]) == 0
    assert run(request(b), want["b"]) == 0  # A's blocks hold A's keys and values
    assert run(None, want["base"]) == 0
    assert run(request(a), want["a"]) == 48  # the same adapter hits its 3 full blocks
    assert run(LoRARequest("renamed", str(a_renamed)), want["a"]) == 48  # identity = content
    assert run(request(b), want["b"]) == 48
    assert run(None, want["base"]) == 48
