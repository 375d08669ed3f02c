"""Fine-tuning data: parsing, loss masks, batching and every bad-data message."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from loraplex import cli
from loraplex.train.config import FinetuneConfig
from loraplex.train.data import IGNORE_INDEX, collate, load_examples, make_batches
from loraplex.train.demo_data import TASKS, get_task, make_examples

CHAT = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you."}]


def write_lines(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def learned_text(example, tokenizer) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels)
                             if label != IGNORE_INDEX])


def test_chat_loss_is_on_assistant_turns_only(tmp_path: Path, hf_tokenizer) -> None:
    [example] = load_examples(write_lines(tmp_path / "d.jsonl", [{"messages": CHAT}]),
                              hf_tokenizer, 512)
    full = hf_tokenizer.apply_chat_template(CHAT, tokenize=False)
    # The ids are exactly the template's rendering (system prompt included, as served) ...
    assert list(example.input_ids) == hf_tokenizer.encode(full, add_special_tokens=False)
    # ... and only the assistant turns, with their end-of-turn token, carry a label.
    assert learned_text(example, hf_tokenizer) == "Hello!<|im_end|>\nSee you.<|im_end|>\n"
    for token, label in zip(example.input_ids, example.labels):
        assert label in (token, IGNORE_INDEX)
    assert "Hi there" not in learned_text(example, hf_tokenizer)


def test_prompt_completion_loss_is_on_the_completion_and_eos(tmp_path: Path, hf_tokenizer) -> None:
    path = write_lines(tmp_path / "d.jsonl", [{"prompt": "The sky is", "completion": " blue."}])
    [example] = load_examples(path, hf_tokenizer, 512)
    prompt_ids = hf_tokenizer.encode("The sky is")
    assert list(example.input_ids[:len(prompt_ids)]) == prompt_ids
    assert set(example.labels[:len(prompt_ids)]) == {IGNORE_INDEX}
    assert example.labels[-1] == hf_tokenizer.eos_token_id == example.input_ids[-1]
    assert hf_tokenizer.decode(example.labels[len(prompt_ids):-1]) == " blue."


def test_blank_lines_are_skipped_and_line_numbers_kept(tmp_path: Path, hf_tokenizer) -> None:
    path = write_lines(tmp_path / "d.jsonl", ["", {"messages": CHAT}, "  ",
                                              {"prompt": "a", "completion": "b"}])
    assert [e.line_number for e in load_examples(path, hf_tokenizer, 512)] == [2, 4]


@pytest.mark.parametrize("lines, message", [
    ([{"prompt": "a", "completion": "b"}, "{\"prompt\": \"a\", \"completion\": ",
      {"prompt": "c", "completion": "d"}], "d.jsonl line 2: not valid JSON"),
    ([{"prompt": "a"}], "line 1: missing field 'completion'"),
    ([{"completion": "a"}], "line 1: missing field 'prompt'"),
    ([{"prompt": "a", "completion": ""}], "line 1: completion: is empty"),
    ([{"prompt": "a", "completion": 3}], "line 1: completion: expected a string, got 3"),
    ([{"text": "a"}], "line 1: expected a 'messages' field or 'prompt' and 'completion' "
                      "fields, got keys ['text']"),
    ([[1, 2]], "line 1: expected a JSON object, got list"),
    ([{"messages": []}], "line 1: messages: expected a non-empty list"),
    ([{"messages": [{"role": "user"}]}], "line 1: messages[0]: missing field 'content'"),
    ([{"messages": [{"role": "bot", "content": "x"}]}],
     "line 1: messages[0].role: expected one of system, user, assistant, got 'bot'"),
    ([{"messages": [{"role": "user", "content": "x"}]}],
     "line 1: messages: no assistant message, so there is nothing to learn"),
    ([{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]}],
     "line 1: messages[1].content: expected a string, got None"),
])
def test_bad_records_are_refused_with_line_and_field(tmp_path: Path, hf_tokenizer,
                                                     lines: list[Any], message: str) -> None:
    with pytest.raises(ValueError) as e:
        load_examples(write_lines(tmp_path / "d.jsonl", lines), hf_tokenizer, 512)
    assert message in str(e.value)
    assert str(e.value).startswith("data: ")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_refused(tmp_path: Path, hf_tokenizer, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match="has no examples \\(the file is empty\\)"):
        load_examples(path, hf_tokenizer, 512)


def test_missing_file_is_refused(tmp_path: Path, hf_tokenizer) -> None:
    with pytest.raises(ValueError, match="eval: .*nope.jsonl' is not a file"):
        load_examples(tmp_path / "nope.jsonl", hf_tokenizer, 512, field="eval")


def test_too_long_example_is_refused_not_truncated(tmp_path: Path, hf_tokenizer) -> None:
    path = write_lines(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"},
                                              {"prompt": "word " * 40, "completion": "end"}])
    num_tokens = len(load_examples(path, hf_tokenizer, 4096)[1].input_ids)
    with pytest.raises(ValueError) as e:
        load_examples(path, hf_tokenizer, num_tokens - 1)
    assert (f"d.jsonl line 2: {num_tokens} tokens, longer than max_seq_len {num_tokens - 1}; "
            "examples are refused, not truncated") in str(e.value)
    assert "--max-seq-len" in str(e.value)


def test_cli_reports_bad_data_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          default_model_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, "{oops"])
    code = cli.main(["finetune", "--data", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("loraplex: error: data: d.jsonl line 2: not valid JSON")
    assert err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kwargs, message", [
    (dict(targets="q,x"), "targets: 'x' is not a projection"),
    (dict(rank=0), "rank: must be an integer >= 1, got 0"),
    (dict(steps=0), "steps: must be an integer >= 1, got 0"),
    (dict(lr=0.0), "lr: must be > 0"),
    (dict(save_dtype="int8"), "save_dtype: expected one of float32, bfloat16, float16"),
])
def test_bad_flags_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FinetuneConfig(data="d.jsonl", out="out", **kwargs)


def test_targets_short_and_full_names() -> None:
    config = FinetuneConfig(data="d", out="o", targets="q, v_proj,gate,q")
    assert config.target_modules == ["q_proj", "v_proj", "gate_proj"]
    assert FinetuneConfig(data="d", out="o").target_modules == "all-linear"


def test_batches_cover_every_example_once_and_are_reproducible(tmp_path: Path,
                                                               hf_tokenizer) -> None:
    path = write_lines(tmp_path / "d.jsonl", make_examples("iso-date", 37))
    examples = load_examples(path, hf_tokenizer, 512)
    batches = make_batches(examples, 8, seed=3, epoch=1)
    assert sorted(e.line_number for b in batches for e in b) == list(range(1, 38))
    assert batches == make_batches(examples, 8, seed=3, epoch=1)
    assert batches != make_batches(examples, 8, seed=3, epoch=2)
    tensors = collate(batches[0], pad_token_id=2)
    lengths = [len(e.input_ids) for e in batches[0]]
    assert tensors["input_ids"].shape == (len(batches[0]), max(lengths))
    assert tensors["attention_mask"].sum(1).tolist() == lengths
    assert (tensors["labels"][tensors["attention_mask"] == 0] == IGNORE_INDEX).all()


@pytest.mark.parametrize("task", sorted(TASKS))
def test_demo_splits_never_share_a_prompt_and_answers_check(task: str) -> None:
    train, held_out = make_examples(task, 200, "train"), make_examples(task, 50, "eval")
    prompts = {e["messages"][0]["content"] for e in train}
    assert len(prompts) == 200
    assert not prompts & {e["messages"][0]["content"] for e in held_out}
    assert make_examples(task, 5, "eval", seed=1) == make_examples(task, 5, "eval", seed=1)
    check = get_task(task).is_correct
    answer = held_out[0]["messages"][1]["content"]
    assert check(answer, answer) and check(f"Sure: {answer}\n", answer)
    assert not check(answer.replace("1", "2").replace("3", "4"), answer)
    assert not check("no idea", answer)


def test_demo_data_cli_writes_jsonl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sub" / "d.jsonl"
    assert cli.main(["demo-data", "json-record", "--out", str(out), "--num-examples", "5"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records == make_examples("json-record", 5)
    assert cli.main(["demo-data", "pirate", "--out", str(out)]) == 2
    assert "task: unknown demo task 'pirate'; known: json-record, iso-date" in capsys.readouterr().err
