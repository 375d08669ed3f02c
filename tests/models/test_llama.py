"""loraplex's model code against transformers on the same (tiny, random) weights.

The attention metadata is built here by hand, so each path of ``paged_attention`` is
exercised on purpose: a whole prompt (plain causal), one token at a time through the paged
cache (batched decodes of different lengths), and a prefill chunk on top of cached
context, mixed with decodes in one forward pass. Block tables are scattered over the
cache and unused slots hold large garbage, so a wrong slot or mask cannot hide.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from loraplex import LLM, SamplingParams
from loraplex.models.attention import AttentionMetadata, PrefillChunk
from loraplex.models.linear import Linear, can_pack
from loraplex.models.llama import LlamaModel
from loraplex.models.loader import load_model, read_arch

ATOL = 1e-4
BLOCK_SIZE = 4
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

CONFIGS: dict[str, dict[str, Any]] = {
    "llama-gqa-untied": dict(model_type="llama"),
    "llama-mha-tied": dict(model_type="llama", num_key_value_heads=4, tie_word_embeddings=True,
                           num_hidden_layers=3),
    "qwen2-bias-gqa": dict(model_type="qwen2", seed=1, num_hidden_layers=3),
    "llama3-rope": dict(model_type="llama", seed=2, rope_scaling=LLAMA3_ROPE,
                        max_position_embeddings=512),
    "llama-headdim-mqa": dict(model_type="llama", seed=3, head_dim=32, num_key_value_heads=1,
                              num_hidden_layers=4, rope_theta=500.0),
    "mistral": dict(model_type="mistral", seed=5, sliding_window=None),
}

# Two prompts; the long one reaches past llama3's original 64 positions.
LEN_A, LEN_B = 75, 30


class Pair:
    """loraplex's model and transformers' on one folder, plus a paged KV cache."""

    def __init__(self, folder: Path, dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoModelForCausalLM

        self.ours: LlamaModel = load_model(folder, dtype, torch.device("cpu"))
        self.ours.pack_weights()
        self.hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        arch = self.ours.arch
        gen = torch.Generator().manual_seed(0)
        num_blocks = 4 * (-(-(LEN_A + LEN_B) // BLOCK_SIZE)) + 8  # three tests, one pair
        # Garbage everywhere: a read of a slot nobody wrote changes the result visibly.
        self.kv = 1e3 * torch.randn(arch.num_layers, 2, num_blocks * BLOCK_SIZE,
                                    arch.num_kv_heads, arch.head_dim, generator=gen).to(dtype)
        # Blocks are handed out in scrambled order, never contiguous.
        self.free_blocks = torch.randperm(num_blocks, generator=gen).tolist()
        self.tokens_a = torch.randint(3, arch.vocab_size, (LEN_A,), generator=gen).tolist()
        self.tokens_b = torch.randint(3, arch.vocab_size, (LEN_B,), generator=gen).tolist()

    def hf_logits(self, tokens: list[int]) -> torch.Tensor:  # [T, vocab]
        with torch.no_grad():
            return self.hf(torch.tensor([tokens])).logits[0].float()

    def new_table(self, num_tokens: int) -> list[int]:
        n = -(-num_tokens // BLOCK_SIZE)
        table, self.free_blocks = self.free_blocks[:n], self.free_blocks[n:]
        return table

    def forward(self, work: list[tuple[list[int], list[int], int, int]]) -> list[torch.Tensor]:
        """One forward pass. ``work``: (tokens, block table, start, end) per sequence;
        decodes (end - start == 1 and start > 0) must come first. Returns the logits of
        positions [start, end) for each entry."""
        ids, positions, slots = [], [], []
        decode_tables, decode_lens, chunks = [], [], []
        for tokens, table, start, end in work:
            row = len(ids)
            ids += tokens[start:end]
            positions += range(start, end)
            slots += [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, end)]
            if end - start == 1 and start > 0:
                assert not chunks, "decodes come first"
                decode_tables.append(table)
                decode_lens.append(end)
            else:
                ctx = torch.arange(end)
                context_slots = torch.tensor(table)[ctx // BLOCK_SIZE] * BLOCK_SIZE + ctx % BLOCK_SIZE
                mask = None
                if start:
                    mask = ctx[None, :] <= torch.arange(start, end)[:, None]
                chunks.append(PrefillChunk(row, len(ids), context_slots, mask))
        decode_slots = decode_mask = None
        if decode_tables:
            width = max(decode_lens)
            pos = torch.arange(width)
            decode_slots = torch.stack([
                torch.tensor(t + [0] * (-(-width // BLOCK_SIZE) - len(t)))[pos // BLOCK_SIZE]
                * BLOCK_SIZE + pos % BLOCK_SIZE for t in decode_tables])
            decode_mask = (pos[None, :] < torch.tensor(decode_lens)[:, None])[:, None, None, :]
        meta = AttentionMetadata(slot_mapping=torch.tensor(slots),
                                 num_decode_tokens=len(decode_tables), decode_slots=decode_slots,
                                 decode_mask=decode_mask,
                                 decode_lens=torch.tensor(decode_lens) if decode_tables else None,
                                 prefills=chunks)
        with torch.inference_mode():
            hidden = self.ours(torch.tensor(ids), torch.tensor(positions), self.kv, meta)
            logits = self.ours.compute_logits(hidden)
        assert logits.dtype == torch.float32 and logits.shape == (len(ids), self.ours.arch.vocab_size)
        out, row = [], 0
        for _, _, start, end in work:
            out.append(logits[row:row + end - start])
            row += end - start
        return out


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request: pytest.FixtureRequest, tiny_model: Callable[..., Path]) -> Pair:
    return Pair(tiny_model(**CONFIGS[request.param]))


def close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(ours, ref, rtol=0, atol=ATOL)


def test_config_is_read_as_written(pair: Pair) -> None:
    hf, arch = pair.hf.config, pair.ours.arch
    assert arch.num_kv_heads == hf.num_key_value_heads
    assert arch.head_dim == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    assert arch.tie_word_embeddings == hf.tie_word_embeddings
    assert arch.qkv_bias == (hf.model_type == "qwen2" or getattr(hf, "attention_bias", False))
    assert (arch.rope_scaling is not None) == (hf.rope_parameters.get("rope_type") == "llama3")


def test_prefill_matches_transformers(pair: Pair) -> None:
    # Two whole prompts in one forward pass: each attends only to itself.
    a, b = pair.tokens_a, pair.tokens_b
    ours_a, ours_b = pair.forward([(a, pair.new_table(LEN_A), 0, LEN_A),
                                   (b, pair.new_table(LEN_B), 0, LEN_B)])
    close(ours_a, pair.hf_logits(a))
    close(ours_b, pair.hf_logits(b))


def test_decode_token_by_token_matches_transformers(pair: Pair) -> None:
    # A and B decode side by side from their first token (B starts 7 tokens later, so
    # their context lengths differ every step); each step's logits are the next token's.
    a, b = pair.tokens_a, pair.tokens_b
    table_a, table_b = pair.new_table(LEN_A), pair.new_table(LEN_B)
    offset = 7
    got_a, got_b = [], []
    for step in range(LEN_A):
        work, which = [], []
        for tokens, table, pos, got in ((a, table_a, step, got_a), (b, table_b, step - offset, got_b)):
            if 0 <= pos < len(tokens):
                work.append((tokens, table, pos, pos + 1))
                which.append(got)
        # Position 0 has no context to page in: it runs as a one-token prefill, after the decodes.
        order = sorted(range(len(work)), key=lambda i: work[i][2] == 0)
        outs = pair.forward([work[i] for i in order])
        for i, logits in zip(order, outs):
            which[i].append(logits)
    close(torch.cat(got_a), pair.hf_logits(a))
    close(torch.cat(got_b), pair.hf_logits(b))


def test_chunked_prefill_matches_transformers(pair: Pair) -> None:
    # A's prompt in two chunks, the second on top of the cached first; the second chunk
    # shares its forward pass with a decode of B, as the scheduler mixes them.
    a, b = pair.tokens_a, pair.tokens_b
    table_a, table_b = pair.new_table(LEN_A), pair.new_table(LEN_B)
    split = 33  # not a block boundary
    (first_a, first_b) = pair.forward([(a, table_a, 0, split), (b, table_b, 0, LEN_B - 1)])
    (last_b, second_a) = pair.forward([(b, table_b, LEN_B - 1, LEN_B), (a, table_a, split, LEN_A)])
    close(torch.cat([first_a, second_a]), pair.hf_logits(a))
    close(torch.cat([first_b, last_b]), pair.hf_logits(b))


@pytest.mark.parametrize("config", ["llama-mha-tied", "qwen2-bias-gqa"])
def test_bfloat16_with_packed_weights_is_close_to_float32(
        tiny_model: Callable[..., Path], config: str) -> None:
    """bf16 serving (weights prepacked for oneDNN where the CPU allows) stays within bf16
    rounding of transformers' float32 logits, through prefill and decode alike."""
    pair = Pair(tiny_model(**CONFIGS[config]), dtype=torch.bfloat16)
    linears = [m for m in pair.ours.modules() if isinstance(m, Linear)]
    assert all(m.is_packed == can_pack(pair.ours.embed_tokens) for m in linears)
    a = pair.tokens_a
    ref = pair.hf_logits(a)
    table = pair.new_table(LEN_A)
    (prefill,) = pair.forward([(a, table, 0, 40)])
    decoded = [pair.forward([(a, table, p, p + 1)])[0] for p in range(40, 50)]
    ours = torch.cat([prefill, *decoded])
    err = (ours - ref[:50]).abs()
    assert err.mean() < 0.05 and err.max() < 0.6, (err.mean().item(), err.max().item())
    # Far from float32 rounding: this really ran in bf16.
    assert err.max() > 1e-3


def test_sliding_window_caps_the_context(tiny_model: Callable[..., Path]) -> None:
    # Attention is exact only within a Mistral window, so the engine's context stops there.
    folder = tiny_model(model_type="mistral", seed=5, sliding_window=32)
    llm = LLM(str(folder), dtype="float32", kv_cache_gib=0.01)
    assert llm.engine.max_model_len == 32
    with pytest.raises(ValueError, match=r"^prompt: 32 tokens .*max_model_len 32"):
        llm.generate([list(range(100, 132))], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match=r"^max_model_len: 64 exceeds .*\(32\)"):
        LLM(str(folder), dtype="float32", kv_cache_gib=0.01, max_model_len=64)


def test_llama_attention_bias_matches_transformers(tiny_model: Callable[..., Path]) -> None:
    # transformers' Llama puts a bias on q, k, v *and* o_proj when attention_bias is true.
    pair = Pair(tiny_model(model_type="llama", seed=4, attention_bias=True))
    a = pair.tokens_a
    (ours,) = pair.forward([(a, pair.new_table(LEN_A), 0, LEN_A)])
    close(ours, pair.hf_logits(a))


def test_engine_greedy_and_logprobs_match_transformers(tiny_model: Callable[..., Path]) -> None:
    """The whole engine path (scheduler, runner, sampler) on a tiny model: every reported
    logprob is transformers' log_softmax at that step, and greedy picks its argmax."""
    folder = tiny_model(**CONFIGS["llama-gqa-untied"])
    llm = LLM(str(folder), dtype="float32", block_size=4, kv_cache_gib=0.01,
              max_num_batched_tokens=16)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 49152, (n,), generator=gen).tolist() for n in (5, 23, 40)]
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=3, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outputs):
        assert len(out.token_ids) == 12 and out.finish_reason == "length"
        with torch.no_grad():
            logp = hf(torch.tensor([prompt + out.token_ids])).logits[0].log_softmax(-1)
        steps = logp[len(prompt) - 1:-1]  # the distribution each generated token came from
        for step, (token, lp) in enumerate(zip(out.token_ids, out.logprobs)):
            assert lp.token_id == token
            assert lp.logprob == pytest.approx(steps[step, token].item(), abs=ATOL)
            assert steps[step, token] >= steps[step].max() - ATOL  # greedy: the argmax
            ref_top = steps[step].topk(3).values.tolist()
            assert [v for _, v in lp.top] == pytest.approx(ref_top, abs=ATOL)
            for tid, v in lp.top:
                assert v == pytest.approx(steps[step, tid].item(), abs=ATOL)


# ---- what is not a supported model is refused, naming the field and the value ----------

def _copy_with_config(src: Path, dst: Path, **changes: Any) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("changes, field, value", [
    (dict(model_type="gpt2"), "model_type", "'gpt2'"),
    (dict(model_type=None), "model_type", "None"),
    (dict(hidden_act="gelu"), "hidden_act", "'gelu'"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}),
     "rope_scaling", "'yarn'"),
])
def test_unsupported_config_is_refused(tiny_model: Callable[..., Path], tmp_path: Path,
                                       changes: dict[str, Any], field: str, value: str) -> None:
    folder = _copy_with_config(tiny_model(), tmp_path / "model", **changes)
    with pytest.raises(ValueError) as err:
        read_arch(folder)
    assert field in str(err.value) and value in str(err.value)
    with pytest.raises(ValueError) as err:
        LLM(str(folder), dtype="float32", kv_cache_gib=0.01)
    assert field in str(err.value) and value in str(err.value)


def test_weights_that_do_not_fit_are_refused(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    folder = _copy_with_config(tiny_model(), tmp_path / "model", intermediate_size=96)
    with pytest.raises(ValueError, match=r"model: weight 'model\.layers\.0\.mlp\.\w+_proj\.weight' "
                                         r"has shape \(\d+, \d+\), expected"):
        load_model(folder, torch.float32, torch.device("cpu"))


def test_missing_weights_are_refused(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    # The config says 3 layers, the weights hold 2.
    folder = _copy_with_config(tiny_model(), tmp_path / "model", num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"model: \d+ weights missing .*layers\.2\."):
        load_model(folder, torch.float32, torch.device("cpu"))


def test_folder_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError) as err:
        read_arch(tmp_path)
    assert "model" in str(err.value) and repr(str(tmp_path)) in str(err.value)
    assert "config.json" in str(err.value)
    with pytest.raises(ValueError) as err:
        LLM(str(tmp_path))
    assert str(err.value).startswith("model:") and repr(str(tmp_path)) in str(err.value)
