"""``loraplex serve`` as a user runs it: a subprocess on 127.0.0.1 that serves, and on SIGTERM
stops taking connections, lets the in-flight stream finish, and exits 0."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from loraplex import cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_the_in_flight_stream_then_exits(server_base: Path, adapter_root: Path,
                                                        tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "loraplex", "serve", "--model", str(server_base),
         "--port", str(port), "--state-dir", str(tmp_path / "state"),
         "--adapter", f"alpha={adapter_root / 'alpha'}", "--drain-seconds", "60",
         "--dtype", "float32", "--kv-cache-gib", "0.01", "--num-threads", "1"],
        stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "the server did not come up in 120 s"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)

        body = {"model": "alpha", "prompt": "Hi", "max_tokens": 300, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        events: list[str] = []
        with httpx.Client(timeout=60) as http, http.stream("POST", url + "/v1/completions",
                                                           json=body) as response:
            lines = response.iter_lines()
            while len(events) < 2:
                line = next(lines)
                if line.startswith("data: "):
                    events.append(line[6:])
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30  # new connections are refused from now on
            while True:
                assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
                try:
                    httpx.get(url + "/health", timeout=2)
                except httpx.TransportError:
                    break
                time.sleep(0.05)
            events += [line[6:] for line in lines if line.startswith("data: ")]
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = (tmp_path / "server.log").read_text()
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    assert usage["completion_tokens"] == 300  # the in-flight request ran to its end
    finish = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-2]]
    assert finish[-1] == "length"
    assert "the server is open" in output  # no key file: said at start
    assert "Traceback" not in output


def test_serve_refuses_bad_flags_before_loading_anything(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import loraplex.engine.engine

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad flag was refused")

    monkeypatch.setattr(loraplex.engine.engine.LLMEngine, "__init__", no_load)
    assert cli.main(["serve", "--mode", "dedicated"]) == 2
    assert "dedicated" in capsys.readouterr().err
    assert cli.main(["serve", "--adapter", "no-equals-sign"]) == 2
    assert "NAME=PATH" in capsys.readouterr().err
    assert cli.main(["serve", "--adapter", "x=/no/such/folder"]) == 2
    assert "/no/such/folder" in capsys.readouterr().err
    assert cli.main(["serve", "--max-queue", "0"]) == 2
    assert "max_queue" in capsys.readouterr().err
    assert cli.main(["serve", "--api-keys", "/no/such/keys.json"]) == 2
    assert "api_keys" in capsys.readouterr().err


def test_serve_refuses_a_bad_command_line_adapter_before_listening(
        server_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    code = cli.main(["serve", "--model", str(server_base), "--dtype", "float32",
                     "--kv-cache-gib", "0.01", "--num-threads", "1", "--port", "0",
                     "--state-dir", str(tmp_path / "state"),
                     "--adapter", f"bad={tmp_path / 'empty'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "adapter: bad" in err and "adapter_config.json" in err
