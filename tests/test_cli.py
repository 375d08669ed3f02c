"""``python -m loraplex generate``: the real model from the command line, and bad flags."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

import loraplex.llm
from loraplex import cli


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loraplex", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_generate_prints_the_answer(default_model_path) -> None:
    result = run_cli("generate", "--model", "smollm2-135m", "--prompt", "The capital of France is",
                     "--max-tokens", "8", "--temperature", "0", "--dtype", "float32",
                     "--kv-cache-gib", "0.05")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "Traceback" not in result.stderr


def test_bad_flag_value_exits_non_zero_naming_it(default_model_path) -> None:
    result = run_cli("generate", "--model", "smollm2-135m", "--prompt", "hi", "--max-tokens", "0",
                     "--dtype", "float32", "--kv-cache-gib", "0.05")
    assert result.returncode != 0
    assert "max_tokens" in result.stderr and "0" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.strip() == ""


def test_bad_sampling_flag_is_refused_before_the_model_loads(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Checking a flag takes microseconds; loading the model takes seconds. A typo in a
    flag must not cost a model load before it is reported."""
    def no_load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded before the bad flag was refused")

    monkeypatch.setattr(loraplex.llm, "LLM", no_load)
    code = cli.main(["generate", "--prompt", "hi", "--max-tokens", "0"])
    assert code == 2
    assert "max_tokens" in capsys.readouterr().err


def test_bad_engine_flag_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["generate", "--prompt", "hi", "--block-size", "12"])
    assert code == 2
    err = capsys.readouterr().err
    assert "block_size" in err and "12" in err


def test_unparsable_flag_exits_with_usage() -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--prompt", "hi", "--max-tokens", "many"])
    assert exit_info.value.code == 2
