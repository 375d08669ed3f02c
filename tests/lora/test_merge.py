"""Merging: the offline folder against PEFT, dedicated deployments, live merge and unmerge
(bit for bit), the unmerge mapping, and auto-merge under shifting traffic.

PEFT's ``merge_and_unload`` (and ``add_weighted_adapter`` for weighted merges) is the
oracle; transformers loads the merged folders.
"""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex import LLM, LoRARequest, SamplingParams
from loraplex import cli
from loraplex.lora.adapter import WEIGHTS_FILE
from loraplex.lora.layers import LoRAStack
from loraplex.lora.merge import merge_to_folder
from loraplex.lora.ops import LoRAMapping, add_lora_reference
from loraplex.models.linear import Linear

from .conftest import hf_model, make_adapter

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT_IDS = [[17, 4033, 288, 1029, 9521, 30, 5], [1640, 314, 216, 2250, 11, 27]]


@torch.no_grad()
def logits_of(model: Any, ids: list[list[int]]) -> torch.Tensor:
    return torch.cat([model(torch.tensor([p])).logits[0] for p in ids])  # [tokens, vocab]


@torch.no_grad()
def peft_merged(base: Path, adapters: list[Path], weights: list[float] | None = None) -> Any:
    """PEFT's own merge: ``merge_and_unload`` of one adapter, or of the ``cat`` combination
    (exactly sum_i w_i * delta_i, whatever the ranks) of several."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(hf_model(base), str(adapters[0]), adapter_name="a0")
    if weights is not None:
        for i, path in enumerate(adapters[1:], 1):
            model.load_adapter(str(path), adapter_name=f"a{i}")
        names = [f"a{i}" for i in range(len(adapters))]
        model.add_weighted_adapter(names, weights, "merged", combination_type="cat")
        model.set_adapter("merged")
    return model.merge_and_unload().eval()


def assert_close_relative(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor,
                          rtol: float = 1e-5) -> None:
    """Within ``rtol`` of the logits' scale, and the adapter moved them far beyond it."""
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale)
    assert (want - base).abs().max().item() > 1000 * rtol * scale, "the adapter changes nothing"


# ---- the merged folder against PEFT ------------------------------------------------------

@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_merged_folder_equals_peft_merge_and_unload(model_type: str, tiny_model: Callable,
                                                     tmp_path: Path) -> None:
    base = tiny_model(model_type)
    adapter = make_adapter(base, tmp_path / "a", seed=1, b_std=0.3, r=8, lora_alpha=16,
                           target_modules="all-linear", rank_pattern={"down_proj": 4})
    out = merge_to_folder(base, [adapter], tmp_path / "merged", dtype=torch.float32,
                          show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "merged"]  # no leftovers
    ours = logits_of(hf_model(out), PROMPT_IDS)
    assert_close_relative(ours, logits_of(peft_merged(base, [adapter]), PROMPT_IDS),
                          logits_of(hf_model(base), PROMPT_IDS))


def test_weighted_merge_equals_peft_weighted_adapter(tiny_model: Callable, tmp_path: Path) -> None:
    base = tiny_model("llama")
    a = make_adapter(base, tmp_path / "a", seed=1, b_std=0.3, r=4, lora_alpha=8,
                     target_modules=["q_proj", "v_proj", "down_proj"])
    b = make_adapter(base, tmp_path / "b", seed=2, b_std=0.3, r=8, lora_alpha=32, use_rslora=True,
                     target_modules=["q_proj", "o_proj", "gate_proj"])
    assert cli.main(["merge", "--model", str(base), "--adapter", str(a), "--adapter", str(b),
                     "--weights", "0.7,-0.4", "--dtype", "float32",
                     "--out", str(tmp_path / "merged")]) == 0
    ours = logits_of(hf_model(tmp_path / "merged"), PROMPT_IDS)
    assert_close_relative(ours, logits_of(peft_merged(base, [a, b], [0.7, -0.4]), PROMPT_IDS),
                          logits_of(hf_model(base), PROMPT_IDS))


def test_merge_refusals_write_nothing(tiny_model: Callable, tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    base = tiny_model("llama")
    adapter = make_adapter(base, tmp_path / "a", seed=1, b_std=0.3, r=4, target_modules=["q_proj"])
    huge = tmp_path / "huge"
    shutil.copytree(adapter, huge)
    tensors = load_file(huge / WEIGHTS_FILE)
    # Finite factors, but B @ A overflows float32: the merged weight would be Inf.
    save_file({k: torch.full_like(v, 1e20) for k, v in tensors.items()}, huge / WEIGHTS_FILE)
    with pytest.raises(ValueError, match="NaN or Inf"):
        merge_to_folder(base, [huge], tmp_path / "out", show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "huge"]

    (tmp_path / "taken").mkdir()
    with pytest.raises(ValueError, match="exists"):
        merge_to_folder(base, [adapter], tmp_path / "taken", show_progress=False)
    assert cli.main(["merge", "--model", str(base), "--adapter", str(adapter),
                     "--weights", "0.5,0.5", "--out", str(tmp_path / "out")]) == 2
    assert "weights: 2 given for 1 adapters" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---- serving merged weights: folder, dedicated, unmerged all agree (the default model) ---

def test_default_model_merged_three_ways_agree(llm_f32: LLM, default_model_path: Path,
                                               tmp_path: Path) -> None:
    adapter = make_adapter(default_model_path, tmp_path / "a", seed=3, b_std=0.02, r=8,
                           lora_alpha=16, target_modules="all-linear")
    folder = merge_to_folder(default_model_path, [adapter], tmp_path / "merged",
                             dtype=torch.float32, show_progress=False)
    ids = [llm_f32.tokenizer.encode(t) for t in ("The capital of France is", "def add(a, b):")]
    assert_close_relative(logits_of(hf_model(folder), ids),
                          logits_of(peft_merged(default_model_path, [adapter]), ids),
                          logits_of(hf_model(default_model_path), ids))

    params = SamplingParams(temperature=0, max_tokens=16)
    unmerged = llm_f32.generate(ids, params, lora=LoRARequest("a", str(adapter)))
    base = llm_f32.generate(ids, params)
    from_folder = LLM(str(folder), dtype="float32", kv_cache_gib=0.05, max_loras=0).generate(ids, params)
    dedicated = LLM("smollm2-135m", dtype="float32", kv_cache_gib=0.05, max_loras=0,
                    merge=str(adapter)).generate(ids, params)
    for u, f, d, b in zip(unmerged, from_folder, dedicated, base):
        assert f.token_ids == u.token_ids == d.token_ids
    assert any(u.token_ids != b.token_ids for u, b in zip(unmerged, base))


# ---- live merge and unmerge --------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_run_time_merge_then_unmerge_restores_every_weight_bitwise(
        dtype: str, tiny_model: Callable, tmp_path: Path) -> None:
    base = tiny_model("llama")
    merged_path = make_adapter(base, tmp_path / "a", seed=1, b_std=0.3, r=8,
                               target_modules="all-linear")
    other_path = make_adapter(base, tmp_path / "b", seed=2, b_std=0.3, r=4,
                              target_modules=["q_proj", "down_proj"])
    merged, other = LoRARequest("a", str(merged_path)), LoRARequest("b", str(other_path))
    # No prefix cache: KV computed while merged must not be reused after the unmerge
    # (in bf16 it differs from the base's by rounding).
    llm = LLM(str(base), dtype=dtype, kv_cache_gib=0.01, enable_prefix_caching=False)
    model = llm.engine.runner.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    before = [(m.weight, m.is_packed, m.weight.detach().clone() if not m.is_packed else None)
              for m in linears]
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=3)
    mix = [None, merged, other]
    prompts = PROMPT_IDS + PROMPT_IDS[:1]
    unmerged_out = llm.generate(prompts, params, lora=mix)

    llm.merge(merged)
    assert sum(m.weight is not w for m, (w, _, _) in zip(linears, before)) == 4 * 2  # 2 layers
    merged_out = llm.generate(prompts, params, lora=mix)
    if dtype == "float32":  # every request, merged adapter or not, computes what it did
        for m_out, u_out in zip(merged_out, unmerged_out):
            assert m_out.token_ids == u_out.token_ids
            torch.testing.assert_close([lp.logprob for lp in m_out.logprobs],
                                       [lp.logprob for lp in u_out.logprobs], atol=1e-4, rtol=0)

    llm.unmerge()
    for m, (weight, is_packed, values) in zip(linears, before):
        assert m.weight is weight and m.is_packed == is_packed
        if values is not None:
            assert torch.equal(m.weight, values)
    again = llm.generate(prompts, params, lora=mix)
    for a, b in zip(again, unmerged_out):  # the very same logits as before the merge
        assert a.token_ids == b.token_ids
        assert [lp.logprob for lp in a.logprobs] == [lp.logprob for lp in b.logprobs]
    assert llm.engine.adapters.stats.merges == llm.engine.adapters.stats.unmerges == 1


def test_run_time_merge_keeps_the_adapter_merged_at_load(tiny_model: Callable,
                                                          tmp_path: Path) -> None:
    """A dedicated deployment (merge= at load) that merges another adapter at run time:
    the rebuilt weights hold both deltas, so nothing changes for any request."""
    base = tiny_model("llama")
    at_load = make_adapter(base, tmp_path / "a", seed=1, b_std=0.3, r=8, target_modules="all-linear")
    live = LoRARequest("b", str(make_adapter(base, tmp_path / "b", seed=2, b_std=0.3, r=4,
                                             target_modules=["q_proj", "down_proj"])))
    llm = LLM(str(base), dtype="float32", kv_cache_gib=0.01, enable_prefix_caching=False,
              merge=str(at_load))
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=1)
    mix = [None, live]
    unmerged = llm.generate(PROMPT_IDS, params, lora=mix)
    llm.merge(live)
    merged = llm.generate(PROMPT_IDS, params, lora=mix)
    for m_out, u_out in zip(merged, unmerged):
        assert m_out.token_ids == u_out.token_ids
        torch.testing.assert_close([lp.logprob for lp in m_out.logprobs],
                                   [lp.logprob for lp in u_out.logprobs], atol=1e-4, rtol=0)


def test_unmerge_mapping_takes_the_merged_delta_out() -> None:
    """With slot 1 merged into the weights, every other token gets slot 1's delta taken
    out (and its own added): the result is what the unmerged weights would give."""
    g = torch.Generator().manual_seed(0)
    outs, in_features, ranks = [48, 16, 16], 32, {0: 4, 1: 8, 2: 8}
    stack = LoRAStack(("q_proj", "k_proj", "v_proj"), in_features, outs, max_loras=3,
                      max_rank=8, dtype=torch.float64, device=torch.device("cpu"))
    for slot, r in ranks.items():
        stack.load(slot, r, {name: (torch.randn(r, in_features, generator=g, dtype=torch.float64),
                                    torch.randn(out, r, generator=g, dtype=torch.float64), 1.0)
                             for name, out in zip(stack.slice_names, outs)})
    token_slots = [-1, 1, 0, 1, 2, -1, 1, 1, 0]
    x = torch.randn(len(token_slots), in_features, generator=g, dtype=torch.float64)
    base = torch.randn(len(token_slots), sum(outs), generator=g, dtype=torch.float64)

    merged = base.clone()  # as if slot 1's delta were in the weights: every token has it
    add_lora_reference(merged, x, [1] * len(token_slots), ranks, stack.a_flat, stack.b_flat, outs)
    mapping = LoRAMapping.build(token_slots, ranks, torch.device("cpu"), merged_slot=1)
    assert [g.slots for g in mapping.unmerge_groups] == [[1]]
    assert mapping.unmerge_groups[0].rows.tolist() == [0, 2, 4, 5, 8]
    stack.apply(merged, x, mapping)

    expected = base.clone()
    add_lora_reference(expected, x, token_slots, ranks, stack.a_flat, stack.b_flat, outs)
    torch.testing.assert_close(merged, expected, rtol=1e-12, atol=1e-10)


# ---- auto-merge under shifting traffic (the default model) ------------------------------

def test_auto_merge_outputs_equal_the_unmerged_engine(llm_f32: LLM, default_model_path: Path,
                                                      tmp_path: Path) -> None:
    first = make_adapter(default_model_path, tmp_path / "ad0", seed=4, b_std=0.02, r=8,
                         target_modules="all-linear")
    folders = [first]
    g = torch.Generator().manual_seed(0)
    for i in range(1, 8):  # different content, same shape: cheap to make
        folder = tmp_path / f"ad{i}"
        shutil.copytree(first, folder)
        tensors = load_file(folder / WEIGHTS_FILE)
        save_file({k: v + 0.02 * torch.randn(v.shape, generator=g) if "lora_B" in k else v
                   for k, v in tensors.items()}, folder / WEIGHTS_FILE)
        folders.append(folder)
    adapters = [LoRARequest(f"ad{i}", str(f)) for i, f in enumerate(folders)]
    texts = ["Tell me about the moon.", "Write a haiku about rain.", "What is 12 times 7?",
             "Name three fruits.", "How do birds fly?", "Why is the sky blue?"]
    # 90% one adapter (with a base request and another adapter), uniform over 8, and back.
    skewed = [adapters[0]] * 14 + [None, adapters[5]]
    phases = [skewed, adapters * 2, skewed]
    auto = LLM("smollm2-135m", dtype="float32", kv_cache_gib=0.1, auto_merge=True,
               auto_merge_window=4)
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=1)
    for phase_index, loras in enumerate(phases):
        prompts = [llm_f32.tokenizer.apply_chat_template(
            [{"role": "user", "content": texts[(i + phase_index) % len(texts)]}])
            for i in range(len(loras))]
        want = llm_f32.generate(prompts, params, lora=loras)
        got = auto.generate(prompts, params, lora=loras)
        for i, (w, o) in enumerate(zip(want, got)):
            assert o.token_ids == w.token_ids, f"phase {phase_index} request {i} ({loras[i]})"
            torch.testing.assert_close(torch.tensor([lp.logprob for lp in o.logprobs]),
                                       torch.tensor([lp.logprob for lp in w.logprobs]),
                                       atol=1e-3, rtol=0)
    stats = auto.engine.adapters.stats
    assert stats.merges >= 2 and stats.unmerges >= 1  # merged, unmerged, merged again
    assert auto.engine.live_merged is not None and auto.engine.live_merged.name == "ad0"
