"""The shared adapter store and the scale-out config, without Ray."""
from __future__ import annotations

import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest

from loraplex.distributed.config import RayServeConfig
from loraplex.distributed.shared_store import SharedAdapterRegistry
from loraplex.lora.registry import AdapterEntry, AdapterRegistry


def test_a_change_through_one_replica_is_seen_by_the_others(tmp_path: Path) -> None:
    first, second = SharedAdapterRegistry(tmp_path), SharedAdapterRegistry(tmp_path)
    second.add(AdapterEntry("cli-only", str(tmp_path), None, "cli"))  # not in the file
    first.add(AdapterEntry("bot", str(tmp_path), "a", "upload"))
    assert second.resolve("bot", "a") is not None
    assert second.resolve("bot", "b") is None  # still tenant a's alone
    second.add(AdapterEntry("tool", str(tmp_path), None, "api"))
    assert {e.name for e in first.visible_to("a")} == {"bot", "tool"}
    first.remove("bot", "a")
    assert second.get("bot", "a") is None
    assert second.get("cli-only", None) is not None  # a re-read keeps command-line ones
    # A replica that starts later (or restarts) reads the same state.
    assert {e.name for e in AdapterRegistry(tmp_path).all()} == {"tool"}


def _add_many(state_dir: str, prefix: str, count: int) -> None:
    registry = SharedAdapterRegistry(Path(state_dir))
    for i in range(count):
        registry.add(AdapterEntry(f"{prefix}-{i}", state_dir, None, "api"))


def test_concurrent_writers_never_drop_each_others_entries(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_add_many, args=(str(tmp_path), p, 15)) for p in "xyz"]
    for w in writers:
        w.start()
    for w in writers:
        w.join(timeout=120)
        assert w.exitcode == 0
    names = {e.name for e in AdapterRegistry(tmp_path).all()}
    assert names == {f"{p}-{i}" for p in "xyz" for i in range(15)}


def test_config_names_the_bad_field() -> None:
    assert not RayServeConfig().is_distributed
    assert RayServeConfig(replicas=2).is_distributed
    assert RayServeConfig(ray_address="auto").is_distributed
    auto = RayServeConfig(replicas=2, min_replicas=1, max_replicas=4).deployment_options()
    assert auto["autoscaling_config"] == dict(min_replicas=1, max_replicas=4,
                                              initial_replicas=2, target_ongoing_requests=8.0)
    assert "num_replicas" not in auto
    for bad, field in ((dict(replicas=0), "replicas"),
                       (dict(replicas=5, max_replicas=4), "replicas"),
                       (dict(max_adapters_per_replica=0), "max_adapters_per_replica"),
                       (dict(target_ongoing_requests=0), "target_ongoing_requests"),
                       (dict(max_queued_requests=0), "max_queued_requests")):
        with pytest.raises(ValueError, match=f"^{field}:"):
            RayServeConfig(**bad)


def test_the_single_machine_path_does_not_import_ray() -> None:
    code = ("import sys, loraplex.cli, loraplex.server.api, loraplex.distributed, "
            "loraplex.distributed.config; sys.exit('ray' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_serve_flags_reach_the_config() -> None:
    from loraplex.cli import build_parser, config_from_args

    args = build_parser().parse_args(["serve", "--replicas", "3", "--ray-address", "auto",
                                      "--max-adapters-per-replica", "5", "--no-adapter-affinity"])
    config = config_from_args(RayServeConfig, args)
    assert (config.replicas, config.ray_address, config.max_adapters_per_replica,
            config.adapter_affinity) == (3, "auto", 5, False)
