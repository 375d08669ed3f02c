"""SpecConfig validation, the CLI flags built from it, the choice of k, and refusals."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from loraplex import LLM, SpecConfig
from loraplex.cli import build_parser, engine_options, main
from loraplex.config import EngineConfig
from loraplex.spec.decoder import best_num_tokens, expected_speedup
from loraplex.spec.proposer import DRAFT_VOCAB_FILE


@pytest.mark.parametrize("kwargs, field", [
    (dict(method="medusa"), "method"),
    (dict(method="draft"), "draft_model"),
    (dict(method="ngram", draft_model="x"), "draft_model"),
    (dict(method="ngram", num_tokens=0), "num_tokens"),
    (dict(method="ngram", max_spec_tokens=99), "max_spec_tokens"),
    (dict(method="ngram", max_spec_seqs=0), "max_spec_seqs"),
    (dict(method="ngram", ngram_min=3, ngram_max=2), "ngram_min"),
    (dict(method="draft", draft_for=("a/path",)), "draft_for"),
    (dict(method="draft", draft_for=("a=x", "a=y")), "draft_for"),
])
def test_bad_spec_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        SpecConfig(**kwargs)


def test_draft_for_accepts_a_mapping_or_cli_strings() -> None:
    assert SpecConfig("draft", draft_for={"a": "/x"}).draft_for == (("a", "/x"),)
    assert SpecConfig("draft", draft_for=["a=/x", "b=/y=z"]).draft_for == (("a", "/x"), ("b", "/y=z"))


def test_cli_flags_build_the_spec_config() -> None:
    args = build_parser().parse_args([
        "serve", "--spec", "draft", "--draft", "/d", "--draft-for", "bot=/bot-draft",
        "--draft-for", "other=/o", "--spec-tokens", "3", "--spec-max-seqs", "2"])
    spec = EngineConfig.from_flat(**engine_options(args)).spec
    assert spec == SpecConfig("draft", draft_model="/d", num_tokens=3, max_spec_seqs=2,
                              draft_for={"bot": "/bot-draft", "other": "/o"})
    off = EngineConfig.from_flat(**engine_options(build_parser().parse_args(["serve"]))).spec
    assert not off.is_enabled


def test_generate_command_with_speculation_prints_the_same_text(
        tiny_target: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["generate", "--model", str(tiny_target), "--dtype", "float32", "--prompt",
              "one two three one two three one two", "--max-tokens", "16",
              "--kv-cache-gib", "0.01"]
    assert main(common) == 0
    plain = capsys.readouterr().out
    assert main(common + ["--spec", "ngram", "--spec-tokens", "3"]) == 0
    assert capsys.readouterr().out == plain
    assert main(common + ["--spec", "draft"]) == 2  # no draft model: one clear line
    assert "draft_model: method 'draft' needs a draft model" in capsys.readouterr().err


def test_draft_with_another_vocabulary_is_refused(tiny_target: Path, tiny_model) -> None:
    other = tiny_model(vocab_size=256)
    with pytest.raises(ValueError, match="^draft_model: .*vocab_size 256"):
        LLM(str(tiny_target), dtype="float32", kv_cache_gib=0.01,
            speculative=SpecConfig("draft", draft_model=str(other)))


@pytest.mark.parametrize("content", ['{"token_ids": []}', '{"token_ids": [1, 1]}',
                                     '{"token_ids": [49152]}', '[3, 4]', 'not json'])
def test_bad_draft_vocabulary_is_refused(tiny_target: Path, tmp_path: Path,
                                         content: str) -> None:
    draft = tmp_path / "draft"
    shutil.copytree(tiny_target, draft)
    (draft / DRAFT_VOCAB_FILE).write_text(content)
    with pytest.raises(ValueError, match=f"^draft_model: .*{DRAFT_VOCAB_FILE}"):
        LLM(str(tiny_target), dtype="float32", kv_cache_gib=0.01,
            speculative=SpecConfig("draft", draft_model=str(draft)))


def test_speculative_argument_is_checked() -> None:
    with pytest.raises(ValueError, match="^method: "):
        LLM("smollm2-135m", speculative="lookahead")
    with pytest.raises(TypeError, match="^speculative: "):
        LLM("smollm2-135m", speculative=3)


def test_choice_of_k_follows_the_expected_speedup() -> None:
    # (1 - a^(k+1)) / ((1 - a)(k c + 1)), written as a geometric sum.
    a, k, c = 0.7, 4, 0.1
    assert expected_speedup(a, k, c) == pytest.approx((1 - a ** (k + 1)) / ((1 - a) * (k * c + 1)))
    assert best_num_tokens(0.9, 0.0, 6) == 6  # free proposals: as many as allowed
    assert best_num_tokens(0.05, 0.3, 6) == 0  # rarely right and costly: do not speculate
    assert 0 < best_num_tokens(0.8, 0.1, 8) < 8
    assert best_num_tokens(0.8, 0.1, 8) == max(range(9), key=lambda g: expected_speedup(0.8, g, 0.1))


def test_cost_ratio_comes_from_the_measured_steps() -> None:
    from loraplex.spec.decoder import SpecDecoder

    spec = SpecDecoder(SpecConfig("ngram"), None, None, None, None, 16, 16)
    proposer = spec.shared
    assert spec.cost_ratio(proposer, 1) == 0.02  # nothing measured yet
    for _ in range(200):  # plain steps of 100 ms, steps verifying 4 drafts of 120 ms
        spec._observe_step(0.100, 0)
        spec._observe_step(0.120, 4)
    spec._observe_step(30.0, 0)  # the engine sat idle: ignored
    assert spec.plain_step_s == pytest.approx(0.100, rel=0.01)
    assert spec.verify_token_s == pytest.approx(0.005, rel=0.01)
    assert spec.cost_ratio(proposer, 1) == pytest.approx(0.05, rel=0.02)
    assert spec.cost_ratio(proposer, 8) == pytest.approx(0.40, rel=0.02)  # 8 to verify
    # Acceptance 0.5: worth speculating alone, not with 8 sequences to verify.
    assert best_num_tokens(0.5, spec.cost_ratio(proposer, 1), 6) > 0
    assert best_num_tokens(0.5, spec.cost_ratio(proposer, 8), 6) <= 1


def test_automatic_k_per_adapter_with_probes_when_off() -> None:
    from loraplex import LoRARequest, SamplingParams
    from loraplex.engine.sequence import SequenceStatus
    from loraplex.spec.decoder import SpecDecoder

    spec = SpecDecoder(SpecConfig("ngram", max_spec_tokens=5), None, None, None, None, 16, 16)
    spec.plain_step_s, spec.verify_token_s = 0.1, 0.002  # c = 0.02 for one sequence

    def seq(name: str | None):
        from loraplex.engine.sequence import Sequence
        s = Sequence(request_id=str(name), prompt=None, prompt_token_ids=[5, 6, 7],
                     params=SamplingParams(max_tokens=100), eos_token_ids=frozenset(),
                     max_model_len=512, lora=LoRARequest(name, "/x") if name else None)
        s.status = SequenceStatus.RUNNING
        return s

    good, bad = seq("good"), seq("bad")
    for _ in range(50):  # good: all 4 drafts accepted every time; bad: none
        good.draft_token_ids, bad.draft_token_ids = [1] * 4, [1] * 4
        spec.record(good, 4)
        spec.record(bad, 0)
    assert spec._num_tokens(good, spec.shared) == 5
    choices = [spec._num_tokens(bad, spec.shared) for _ in range(64)]
    assert choices.count(0) == 62 and choices.count(1) == 2  # a probe every 32 decisions
    near_end = seq("good")
    near_end.output_token_ids = [1] * 97  # max_tokens 100: room for 2 drafts at most
    assert spec._num_tokens(near_end, spec.shared) == 2
