"""``loraplex explain --quick`` on a tiny model and a real PEFT adapter: it writes report.md,
results.json and readable PNG plots, and the report carries every scenario's numbers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraplex.bench.markdown import fmt, x
from loraplex.cli import main

SCENARIOS = {"ttft", "concurrency", "adapters", "registered", "shared", "merged", "speculative", "peer"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def explained(bench_base: Path, bench_adapters: dict[str, Path],
              tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    import torch

    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("explain")
    code = main(["explain", "--model", str(bench_base), "--adapter", str(bench_adapters["ad1"]),
                 "--quick", "--out", str(out), "--dtype", "float32", "--num-threads", "1"])
    torch.set_num_threads(threads)  # the engines set it for the whole process
    assert code == 0
    return out, json.loads((out / "results.json").read_text()), (out / "report.md").read_text()


def test_every_scenario_is_reported_with_its_numbers(explained):
    _, doc, report = explained
    scenarios = {s["key"]: s for s in doc["scenarios"]}
    assert set(scenarios) == SCENARIOS
    for key, s in scenarios.items():
        assert s["title"] in report
        assert s["measured"], f"{key}: {s['reason']}"
        assert s["rows"], key
        for row in s["rows"]:
            assert list(row) == s["columns"]
            line = "| " + " | ".join(fmt(row[c], c) for c in s["columns"]) + " |"
            assert line in report, f"{key}: {line} missing from report.md"
            for column, value in row.items():
                if "tok/s" in column and "vs" not in column:
                    assert value > 0
                if column.endswith(" ms") or column.startswith("TTFT ms"):
                    assert value > 0


def test_ratios_pair_each_arm_with_its_reference(explained):
    _, doc, report = explained
    scenarios = {s["key"]: s for s in doc["scenarios"]}
    plan = doc["plan"]
    conc = scenarios["concurrency"]
    assert [(r["concurrency"], r["arm"]) for r in conc["rows"]] == [
        (c, arm) for c in plan["concurrencies"] for arm in ("base", "unmerged")]
    for row in conc["rows"]:
        if row["arm"] == "base":  # every pairwise ratio of an arm with itself is exactly 1
            assert row["tok/s vs base"] == 1.0 and row["TPOT vs base"] == 1.0
    assert set(conc["headline"]) == {f"unmerged/base c{c}" for c in plan["concurrencies"]}
    merged = scenarios["merged"]  # LLM(model, merge=PATH): a dedicated merged deployment
    assert [(r["concurrency"], r["arm"]) for r in merged["rows"]] == [
        (c, arm) for c in plan["concurrencies"] for arm in ("base", "unmerged", "merged")]
    assert {f"merged/unmerged c{c}" for c in plan["concurrencies"]} <= set(merged["headline"])
    assert "Merged into the base, your model runs at" in report
    spec = scenarios["speculative"]  # n-gram prompt lookup (no --draft)
    assert [r["arm"] for r in spec["rows"]] == ["base", "unmerged", "unmerged + speculative"] * len(
        plan["concurrencies"])
    assert "With speculative decoding your adapter runs at" in report
    adapters = scenarios["adapters"]
    assert [r["arm"] for r in adapters["rows"]] == ["base"] + [
        f"{k} adapter{'s' if k > 1 else ''}" for k in plan["adapter_counts"]]
    ttft = {r["arm"]: r for r in scenarios["ttft"]["rows"]}
    assert set(ttft) == {"base", "adapter, warm", "adapter, cold"}
    # The answers quote the measured ratios.
    for c in plan["concurrencies"]:
        assert x(conc["headline"][f"unmerged/base c{c}"]) + f" at {c}" in report
    for question in ("Why is my LoRA slower?", "Does concurrency change it?",
                     "Does the number of adapters change it?", "What would merging buy?",
                     "What would speculative decoding buy?"):
        assert question in report
    assert "| use case |" in report and "| concurrency |" in report and "## Recommendation" in report


def test_plots_are_valid_png_images(explained):
    from PIL import Image

    out, _, report = explained
    for name in ("ttft.png", "concurrency.png", "adapters.png"):
        path = out / name
        assert path.read_bytes()[:8] == PNG_MAGIC
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] >= 300 and image.size[1] >= 200
        assert f"]({name})" in report


def test_a_scenario_whose_api_is_missing_is_reported_not_measured(bench_base, bench_adapters, tmp_path):
    """--draft naming a folder that is no model: the speculative engine refuses it, and the
    report says so instead of failing (the same path a missing API takes)."""
    from loraplex.bench.explain import ExplainConfig, ExplainContext
    from loraplex.bench.scenarios import speculative

    (tmp_path / "not-a-model").mkdir()
    config = ExplainConfig(model=str(bench_base), adapter=str(bench_adapters["ad1"]), quick=True,
                           draft=str(tmp_path / "not-a-model"), out=str(tmp_path / "out"),
                           dtype="float32", num_threads=1)
    import torch
    threads = torch.get_num_threads()
    ctx = ExplainContext(config, log=lambda line: None)
    try:
        result = speculative(ctx)
    finally:
        ctx.close()
        torch.set_num_threads(threads)
    assert not result.measured and "not-a-model" in result.reason


def test_bad_adapter_is_refused_before_any_work(tmp_path, capsys):
    assert main(["explain", "--adapter", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "adapter:" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
