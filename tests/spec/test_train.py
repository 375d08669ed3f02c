"""``loraplex train-draft`` on a tiny 4-layer target with a real PEFT adapter: the draft is
an HF folder (transformers loads it; the engine runs it as a draft), distillation lowers
the KL and raises the held-out acceptance, and bad input is refused by field."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from loraplex.cli import main
from loraplex.models.tokenizer import Tokenizer
from loraplex.spec.proposer import DRAFT_VOCAB_FILE
from loraplex.spec.train import DraftTrainConfig, draft_vocab, pick_layers, train_draft

from .conftest import make_adapter

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")

WORDS = ("red green blue cat dog bird one two three sun moon star tree river stone "
         "light dark fast slow big small").split()


def write_prompts(path: Path, num: int) -> Path:
    rng = random.Random(0)
    lines = [json.dumps({"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))})
             for _ in range(num)]
    lines.append(json.dumps({"messages": [{"role": "user", "content": "Hi there"}]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_train_draft_for_an_adapter(tiny_model, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForCausalLM

    target = tiny_model(num_hidden_layers=4, initializer_range=0.08)
    adapter = make_adapter(target, tmp_path / "adapter", seed=3)
    data = write_prompts(tmp_path / "prompts.jsonl", 40)
    out = tmp_path / "draft"
    assert main(["train-draft", "--model", str(target), "--adapter", str(adapter), "--data",
                 str(data), "--out", str(out), "--layers", "2", "--steps", "60",
                 "--max-new-tokens", "16", "--lr", "3e-3", "--num-held-out", "6",
                 "--draft-vocab", "24576"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith(f"train-draft: {out} (2 layers [0, 3])")
    report = json.loads((out / "draft_training.json").read_text())
    assert report["last_loss"] < 0.5 * report["first_loss"]
    assert report["acceptance_after"] > report["acceptance_before"]
    assert report["tokens_per_step_after"] > 1
    # A plain HF folder: transformers loads it, with the target's head and 2 layers.
    draft = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    hf_target = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    assert draft.config.num_hidden_layers == 2
    assert torch.equal(draft.lm_head.weight, hf_target.lm_head.weight)  # frozen, copied
    assert not torch.equal(draft.model.layers[1].mlp.down_proj.weight,
                           hf_target.model.layers[3].mlp.down_proj.weight)  # trained
    assert (out / "tokenizer.json").is_file()
    # The draft vocabulary: half the ids (a random model's continuations spread over all
    # of them; a task adapter's use far fewer), the end-of-sequence ids among them.
    vocab = json.loads((out / DRAFT_VOCAB_FILE).read_text())["token_ids"]
    assert len(set(vocab)) == len(vocab) == 24576 == report["draft_vocab_size"]
    assert set(Tokenizer(target).eos_token_ids) <= set(vocab)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".draft.")]  # no temp left
    # The output exists now: a second run is refused before any work.
    assert main(["train-draft", "--model", str(target), "--data", str(data), "--out",
                 str(out)]) == 2
    assert "out: " in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, field", [
    (dict(out="x"), "data"), (dict(data="x"), "out"),
    (dict(data="x", out="y", layers=0), "layers"), (dict(data="x", out="y", lr=0), "lr"),
])
def test_bad_train_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        DraftTrainConfig(**kwargs)


def test_bad_data_line_is_named(tiny_target: Path, tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "ok"}\n{"question": "no"}\n')
    with pytest.raises(ValueError, match="^data: line 2 "):
        train_draft(DraftTrainConfig(model=str(tiny_target), data=str(data),
                                     out=str(tmp_path / "o")), progress=False)


def test_layers_are_spread_over_the_target() -> None:
    assert pick_layers(30, 3) == [0, 14, 29]
    assert pick_layers(4, 2) == [0, 3]
    assert pick_layers(2, 5) == [0, 1]
    assert pick_layers(8, 1) == [0]


def test_draft_vocabulary_ranks_by_count_then_fills_with_low_ids() -> None:
    sequences = [[9, 7, 7, 5], [7, 5, 300]]
    # eos first, then by count (7: 3, 5: 2, then 9 and 300 once each, first seen first).
    assert draft_vocab(sequences, {2}, 1000, 5) == [2, 7, 5, 9, 300]
    assert draft_vocab(sequences, {2}, 1000, 8) == [2, 7, 5, 9, 300, 0, 1, 3]
    assert draft_vocab(sequences, {2}, 1000, 3) == [2, 7, 5]
    assert draft_vocab(sequences, {2}, 1000, 0) == list(range(1000))  # 0: the whole vocabulary
