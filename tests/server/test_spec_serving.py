"""The server with speculative decoding: same answers as the offline engine without it,
a draft for one adapter (``--draft-for``) beside the shared one, and the per-adapter
acceptance metrics in /metrics."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from loraplex import LLM

from .conftest import RunningServer
from .test_openai_api import GREEDY, offline_text


def test_speculative_server_answers_like_the_plain_engine(
        start_server: Callable[..., RunningServer], server_base: Path, adapter_root: Path,
        offline: LLM) -> None:
    # Only alpha's requests have a draft (the base weights: the target without alpha);
    # the base model's and beta's requests decode plainly.
    server = start_server(
        adapters={"alpha": str(adapter_root / "alpha"), "beta": str(adapter_root / "beta")},
        engine={"method": "draft", "num_tokens": 3, "draft_for": (f"alpha={server_base}",)})
    try:
        client = server.client()
        for model, adapter in [(server.base_id, None), ("alpha", adapter_root / "alpha"),
                               ("beta", adapter_root / "beta")]:
            result = client.completions.create(model=model, prompt="Hello there", max_tokens=12,
                                               **GREEDY)
            assert result.choices[0].text == offline_text(offline, "Hello there", 12, adapter)
        stream = client.completions.create(model="alpha", prompt="Good morning",
                                           max_tokens=12, stream=True, **GREEDY)
        assert "".join(c.choices[0].text for c in stream if c.choices) == \
            offline_text(offline, "Good morning", 12, adapter_root / "alpha")
        metrics = server.metrics()
        steps = metrics['loraplex:spec_verify_steps_total{adapter="alpha"}']
        drafts = metrics['loraplex:spec_draft_tokens_total{adapter="alpha"}']
        accepted = metrics['loraplex:spec_accepted_tokens_total{adapter="alpha"}']
        assert steps > 0 and steps <= drafts <= 3 * steps and 0 <= accepted <= drafts
        assert metrics['loraplex:spec_acceptance_rate{adapter="alpha"}'] == accepted / drafts
        assert not any('adapter=""' in k or 'adapter="beta"' in k for k in metrics)
    finally:
        server.stop()
