"""``loraplex bench`` against a real server: every request accounted for, the timings
consistent, the token counts equal the server's own, the model selection honoured."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from loraplex.bench.workload import random_word_prompts, select_models
from loraplex.cli import main
from loraplex.models.tokenizer import Tokenizer


def run_bench(server, tmp_path: Path, *extra: str, name: str = "results.json") -> tuple[int, dict]:
    out = tmp_path / name
    code = main(["bench", "--url", server.url, "--no-progress", "--out", str(out), *extra])
    return code, json.loads(out.read_text())


def counter_by_model(server) -> Counter:
    counts: Counter = Counter()
    for key, value in server.metrics().items():
        if key.startswith("loraplex:requests_total{"):
            model = key.split('model="', 1)[1].split('"', 1)[0]
            counts[model] += value
    return counts


def test_round_robin_run_matches_the_server(bench_server, tmp_path, capsys):
    base = bench_server.base_id
    before = bench_server.metrics()
    by_model_before = counter_by_model(bench_server)
    code, doc = run_bench(bench_server, tmp_path, "--models", f"{base},ad1,ad2",
                          "--selection", "round-robin", "--num-prompts", "12",
                          "--input-len", "24", "--output-len", "7", "--max-concurrency", "4")
    assert code == 0
    table = capsys.readouterr().out
    assert "Serving Benchmark Result" in table and "Median TTFT (ms):" in table

    assert doc["num_requests"] == doc["completed"] == 12 and doc["failed"] == 0
    requests = doc["requests"]
    assert sorted(r["index"] for r in requests) == list(range(12))
    for r in requests:
        assert r["success"] and r["error"] is None
        assert 0 < r["ttft_s"] <= r["e2el_s"]
        assert r["output_tokens"] == 7 and r["finish_reason"] == "length"
        assert r["prompt_tokens"] == r["expected_prompt_tokens"] == 24
        assert len(r["itl_s"]) <= r["output_tokens"] - 1
        assert all(gap >= 0 for gap in r["itl_s"])
        assert r["tpot_s"] == pytest.approx((r["e2el_s"] - r["ttft_s"]) / 6)
    assert doc["prompt_token_mismatches"] == []
    assert doc["ttft"]["median"] <= doc["e2el"]["median"]
    assert doc["ttft"]["p99"] >= doc["ttft"]["median"]

    # The server's own counters saw exactly these requests and tokens.
    after = bench_server.metrics()
    assert after["loraplex:generation_tokens_total"] - before.get("loraplex:generation_tokens_total", 0) \
        == doc["total_output_tokens"] == 12 * 7
    assert after["loraplex:prompt_tokens_total"] - before.get("loraplex:prompt_tokens_total", 0) \
        == doc["total_input_tokens"] == 12 * 24
    seen = counter_by_model(bench_server) - by_model_before
    assert seen == Counter({base: 4, "ad1": 4, "ad2": 4})
    assert [r["model"] for r in requests] == [[base, "ad1", "ad2"][i % 3] for i in range(12)]
    assert {m: v["completed"] for m, v in doc["per_model"].items()} == {base: 4, "ad1": 4, "ad2": 4}
    assert doc["output_throughput"] == pytest.approx(doc["total_output_tokens"] / doc["duration_s"])


def test_failed_requests_are_counted_not_lost(bench_server, tmp_path):
    code, doc = run_bench(bench_server, tmp_path, "--models", "ad1,no-such-adapter",
                          "--num-prompts", "6", "--input-len", "8", "--output-len", "3")
    assert code == 1  # a run with failures says so in its exit status
    assert doc["num_requests"] == 6 and doc["completed"] == 3 and doc["failed"] == 3
    failed = [r for r in doc["requests"] if not r["success"]]
    assert {r["model"] for r in failed} == {"no-such-adapter"}
    assert all(r["status_code"] == 404 and "no-such-adapter" in r["error"] for r in failed)
    assert sum(doc["errors"].values()) == 3
    assert doc["per_model"]["no-such-adapter"]["failed"] == 3


def test_chat_zipf_poisson(bench_server, tmp_path):
    base = bench_server.base_id
    code, doc = run_bench(bench_server, tmp_path, "--models", f"ad2,ad1,{base}", "--endpoint", "chat",
                          "--selection", "zipf", "--num-prompts", "10", "--request-rate", "40",
                          "--input-len", "12", "--output-len", "4", "--seed", "3")
    assert code == 0 and doc["completed"] == 10
    expected = select_models(["ad2", "ad1", base], 10, "zipf", 3)
    assert [r["model"] for r in doc["requests"]] == expected
    starts = [r["start_s"] for r in doc["requests"]]
    assert starts == sorted(starts) and starts[-1] > 0  # Poisson arrivals, not all at once
    for r in doc["requests"]:
        # The chat template wraps the prompt; the client counts the same way as the server.
        assert r["prompt_tokens"] == r["expected_prompt_tokens"] > 12
        assert r["output_tokens"] == 4 and r["ttft_s"] <= r["e2el_s"]


def test_jsonl_dataset(bench_server, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "The river runs past the mill", "max_tokens": 5}\n\n'
                    '{"prompt": "Name three colours", "max_tokens": 2}\n')
    code, doc = run_bench(bench_server, tmp_path, "--models", "ad1", "--dataset", str(data),
                          "--num-prompts", "3")
    assert code == 0
    assert [r["output_tokens"] for r in doc["requests"]] == [5, 2, 5]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt field"}\n')
    assert main(["bench", "--url", bench_server.url, "--models", "ad1", "--dataset", str(bad)]) == 2


def test_random_prompts_are_real_words_of_exact_length(default_model_path):
    tokenizer = Tokenizer(default_model_path)
    prompts = random_word_prompts(tokenizer, 20, 50, seed=1)
    assert len(set(prompts)) == 20
    for text in prompts:
        ids = tokenizer.encode(text)
        assert len(ids) == 50 and len(set(ids)) > 25
        assert all(word.isalpha() and word.islower() for word in text.split())


def test_selection():
    models = ["a", "b", "c", "d"]
    assert select_models(models, 8, "round-robin", 0) == models * 2
    zipf = Counter(select_models(models, 4000, "zipf", 0))
    assert zipf["a"] > zipf["b"] > zipf["c"] > zipf["d"] > 0
    assert zipf["a"] / zipf["b"] == pytest.approx(2, rel=0.15)  # weights 1, 1/2, 1/3, 1/4
    uniform = Counter(select_models(models, 4000, "random", 0))
    assert all(900 < n < 1100 for n in uniform.values())
    with pytest.raises(ValueError, match="selection"):
        select_models(models, 4, "weighted", 0)
