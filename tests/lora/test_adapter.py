"""loraplex.lora.adapter against real PEFT: ``b @ a`` must be PEFT's delta weight per module."""
from __future__ import annotations

import dataclasses
import json
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.lora import adapter as adapter_module
from loraplex.lora.adapter import (CONFIG_FILE, WEIGHTS_FILE, AdapterError, LoRAAdapter,
                                   load_adapter)
from loraplex.models.llama import ModelArch

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PREFIX = "base_model.model.model.layers"


def peft_lora_layers(peft_model: Any) -> dict[tuple[int, str], Any]:
    """(layer, projection) -> PEFT's lora layer, for every module PEFT adapted."""
    found = {}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            m = re.fullmatch(r"model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)", name)
            assert m is not None, name
            found[(int(m[1]), m[2])] = module
    return found


def assert_matches_peft(adapter: LoRAAdapter, peft_model: Any) -> None:
    layers = peft_lora_layers(peft_model)
    assert set(adapter.modules) == set(layers)
    with torch.no_grad():
        for key, w in adapter.modules.items():
            lora = layers[key]
            assert w.a.dtype == w.b.dtype == torch.float32
            assert w.rank == lora.r["default"] and w.scaling == lora.scaling["default"]
            delta = lora.get_delta_weight("default").to(torch.float32)
            torch.testing.assert_close((w.b @ w.a) * w.scaling, delta, atol=1e-6, rtol=0)
    assert adapter.max_rank == max(w.rank for w in adapter.modules.values())
    assert adapter.target_modules == frozenset(m for _, m in layers)
    num_floats = sum(w.a.numel() + w.b.numel() for w in adapter.modules.values())
    assert adapter.num_bytes == 4 * num_floats


CASES: dict[str, dict[str, Any]] = {
    "list": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "regex": dict(r=4, lora_alpha=16, target_modules=r".*\.(k_proj|o_proj|up_proj)"),
    "all_linear": dict(r=2, lora_alpha=4, target_modules="all-linear"),
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "gate_proj"],
                   rank_pattern={"gate_proj": 4}),
    "patterns": dict(r=4, lora_alpha=8, target_modules=ALL_PROJ,
                     rank_pattern={"q_proj": 8, r"layers\.1\.mlp\.down_proj": 2},
                     alpha_pattern={"self_attn.v_proj": 32, r"layers\.0\.mlp\.up_proj": 3}),
    "layers_to_transform": dict(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
                                layers_pattern="layers"),
    "layers_to_transform_int": dict(r=4, target_modules=["o_proj"], layers_to_transform=0),
    "exclude_modules": dict(r=4, target_modules=["q_proj", "o_proj"],
                            exclude_modules=["model.layers.0.self_attn.o_proj"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_peft_delta_weight(case: str, make_peft_adapter: Callable,
                                   tiny_arch: ModelArch) -> None:
    folder, peft_model = make_peft_adapter(**CASES[case])
    adapter = load_adapter(folder, tiny_arch, max_lora_rank=8)
    assert adapter.name == folder.name and adapter.path == folder
    assert_matches_peft(adapter, peft_model)


def test_target_modules_as_saved_by_peft(make_peft_adapter: Callable, tiny_arch: ModelArch) -> None:
    # PEFT keeps a regex as a string but expands "all-linear" into full module names on save;
    # a hand-written "all-linear" must select the same modules.
    folder, _ = make_peft_adapter("regex", **CASES["regex"])
    assert isinstance(json.loads((folder / CONFIG_FILE).read_text())["target_modules"], str)
    folder, peft_model = make_peft_adapter("all_linear", **CASES["all_linear"])
    edit_config(folder, target_modules="all-linear")
    adapter = load_adapter(folder, tiny_arch, max_lora_rank=8)
    assert adapter.target_modules == frozenset(ALL_PROJ)
    assert_matches_peft(adapter, peft_model)


def test_fan_in_fan_out_is_ignored_for_linear_like_peft(make_peft_adapter: Callable,
                                                        new_tiny_llama: Callable,
                                                        tiny_arch: ModelArch) -> None:
    # PEFT resets fan_in_fan_out for nn.Linear bases and never transposes lora_A/lora_B,
    # so a Llama adapter with the flag set means exactly what it means without it.
    from peft import PeftModel

    folder, peft_model = make_peft_adapter(**CASES["list"])
    edit_config(folder, fan_in_fan_out=True)
    adapter = load_adapter(folder, tiny_arch, max_lora_rank=8)
    assert_matches_peft(adapter, peft_model)
    assert_matches_peft(adapter, PeftModel.from_pretrained(new_tiny_llama(seed=1), folder))
    # Tensors stored transposed are not what PEFT writes (it cannot load them): refused.
    edit_tensors(folder, lambda t: t.update({k: v.T.contiguous() for k, v in t.items()}))
    with pytest.raises(AdapterError, match="shapes"):
        load_adapter(folder, tiny_arch, max_lora_rank=8)


def test_content_hash_is_identity_not_name(good_adapter: Path, tmp_path: Path,
                                           tiny_arch: ModelArch) -> None:
    copy = shutil.copytree(good_adapter, tmp_path / "other_name")
    first = load_adapter(good_adapter, tiny_arch, 8, name="alpha")
    second = load_adapter(copy, tiny_arch, 8, name="beta")
    assert (first.name, second.name) == ("alpha", "beta")
    assert first.content_hash == second.content_hash
    assert re.fullmatch(r"[0-9a-f]{64}", first.content_hash)
    key = f"{PREFIX}.0.self_attn.q_proj.lora_B.weight"
    edit_tensors(copy, lambda t: t[key].__setitem__((0, 0), t[key][0, 0] + 1.0))
    assert load_adapter(copy, tiny_arch, 8).content_hash != first.content_hash
    changed_config = shutil.copytree(good_adapter, tmp_path / "changed_config")
    edit_config(changed_config, lora_alpha=16)
    assert load_adapter(changed_config, tiny_arch, 8).content_hash != first.content_hash


def test_content_hash_is_taken_over_the_files_as_stored(good_adapter: Path,
                                                        tiny_arch: ModelArch) -> None:
    """The hash is of the bytes as stored, and lora_B keeps the file's values: its scaling
    is applied where the weights are used (the delta is PEFT's: test_matches_peft_delta_weight)."""
    from blake3 import blake3

    digest = blake3()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        data = (good_adapter / name).read_bytes()
        digest.update(len(data).to_bytes(8, "little") + data)
    adapter = load_adapter(good_adapter, tiny_arch, 8)
    assert adapter.content_hash == digest.hexdigest()
    stored = load_file(good_adapter / WEIGHTS_FILE)
    w = adapter.modules[(0, "q_proj")]
    assert w.scaling == 2.0 and torch.equal(w.b, stored[Q_B])


# ---- refusals: each names the adapter path, the field and the value -------------------

def edit_config(folder: Path, **updates: Any) -> None:
    path = folder / CONFIG_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **updates}))


def edit_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], Any]) -> None:
    tensors = load_file(folder / WEIGHTS_FILE)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})


def refused(folder: Path, arch: ModelArch, *expected: str, max_lora_rank: int = 8) -> str:
    with pytest.raises(AdapterError) as info:
        load_adapter(folder, arch, max_lora_rank)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    for text in (str(folder), *expected):
        assert text in message, f"{text!r} not in {message!r}"
    return message


READ_PATHS = ["page cache", "disk, direct", "disk, buffered", "half cached, then direct",
              "direct refused on read"]


@pytest.mark.parametrize("path", READ_PATHS)
def test_every_read_path_gives_the_same_adapter(path: str, good_adapter: Path, tmp_path: Path,
                                                tiny_arch: ModelArch,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The weights file is copied from the page cache as far as it holds the file's start,
    read with O_DIRECT into a page-aligned buffer from there, and through the page cache
    where direct reads cannot be used (a bytearray buffer; a read refused with EINVAL): the
    bytes, and so the hash and the tensors, are the same on every path."""
    import mmap
    import os

    from loraplex.bench.measure import drop_from_page_cache

    folder = shutil.copytree(good_adapter, tmp_path / "adapter")
    size = (folder / WEIGHTS_FILE).stat().st_size
    assert size > 3 * 4096  # several blocks: the half-cached case starts mid-file
    direct_flag = getattr(os, "O_DIRECT", 0)
    try:
        os.close(os.open(folder / WEIGHTS_FILE, os.O_RDONLY | direct_flag))
    except OSError:
        direct_flag = 0
    if path != "page cache" and not direct_flag:
        pytest.skip("no O_DIRECT on this filesystem")
    if path != "page cache":
        drop_from_page_cache(folder)
    if path == "half cached, then direct":
        with open(folder / WEIGHTS_FILE, "rb", buffering=0) as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)  # no readahead
            f.read(size // 2 + 100)  # a cached prefix that ends inside a block

    opened_direct, refusals = [], []
    real_open, real_preadv = os.open, os.preadv

    def spy_open(file: Any, flags: int, *args: Any) -> int:
        fd = real_open(file, flags, *args)
        if flags & direct_flag:
            opened_direct.append(fd)
        return fd

    buffered_reads, direct_reads = [], []  # bytes each successful read returned

    def spy_preadv(fd: int, buffers: Any, offset: int, *flags: Any) -> int:
        if path == "direct refused on read" and fd in opened_direct and not refusals:
            refusals.append(offset)
            raise OSError(22, "Invalid argument")
        got = real_preadv(fd, buffers, offset, *flags)
        (direct_reads if fd in opened_direct else buffered_reads).append(got)
        return got

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "preadv", spy_preadv)
    # A file this small would come in whole with the header's first read: read 8 bytes
    # there instead, so the header and the rest (on the reading thread) are reads of their own.
    monkeypatch.setattr(adapter_module, "_HEADER_GUESS", 8)
    buffer_for = bytearray if path == "disk, buffered" else (lambda n: memoryview(mmap.mmap(-1, n)))
    adapter = load_adapter(folder, tiny_arch, 8, buffer_for=buffer_for)

    assert bool(opened_direct) == (path not in ("page cache", "disk, buffered"))
    assert bool(refusals) == (path == "direct refused on read")
    direct, buffered = sum(direct_reads), sum(buffered_reads)
    assert direct + buffered >= size
    if path == "half cached, then direct":  # whole pages: up to one past the prefix read
        assert size // 2 + 100 <= buffered < size and direct > 0
    else:
        assert direct == (size if path == "disk, direct" else 0)
    reference = load_adapter(good_adapter, tiny_arch, 8)
    assert adapter.content_hash == reference.content_hash
    for key, w in reference.modules.items():
        assert torch.equal(adapter.modules[key].a, w.a) and torch.equal(adapter.modules[key].b, w.b)


@pytest.fixture
def bad(good_adapter: Path, tmp_path: Path) -> Path:
    return shutil.copytree(good_adapter, tmp_path / "bad_adapter")


CONFIG_REFUSALS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "dora": ({"use_dora": True}, ("use_dora", "True", "DoRA")),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, ("modules_to_save", "['lm_head']")),
    "embed_tokens_target": ({"target_modules": ["q_proj", "embed_tokens"]},
                            ("target_modules", "'embed_tokens'")),
    "lm_head_regex_target": ({"target_modules": r".*\.(q_proj|lm_head)|lm_head"},
                             ("target_modules", "lm_head")),
    "bias": ({"bias": "lora_only"}, ("bias", "'lora_only'")),
    "lora_bias": ({"lora_bias": True}, ("lora_bias", "True")),
    "unknown_target": ({"target_modules": ["q_proj", "fc1"]}, ("target_modules", "'fc1'")),
    "layer_index_out_of_range": ({"layers_to_transform": [0, 5]}, ("layers_to_transform", "5")),
    "peft_type": ({"peft_type": "LOHA"}, ("peft_type", "'LOHA'")),
    "rank_above_max": ({"r": 16}, ("r", "16", "max_lora_rank 8")),
    "rank_pattern_above_max": ({"rank_pattern": {"q_proj": 16}}, ("rank_pattern['q_proj']", "16")),
    "r_disagrees_with_tensors": ({"r": 2}, ("r: 2", "rank 4")),
    "tensors_not_targeted": ({"target_modules": ["q_proj"]}, ("target_modules", "does not target")),
    "regex_selects_nothing": ({"target_modules": r".*\.fc\d"},
                              ("target_modules", "selects no module")),
    "bad_rank_pattern_regex": ({"rank_pattern": {"q_proj(": 2}}, ("rank_pattern", "q_proj(")),
}


@pytest.mark.parametrize("case", list(CONFIG_REFUSALS))
def test_refuses_config(case: str, bad: Path, tiny_arch: ModelArch) -> None:
    updates, expected = CONFIG_REFUSALS[case]
    edit_config(bad, **updates)
    refused(bad, tiny_arch, *expected)


def test_refuses_rank_above_max_lora_rank(good_adapter: Path, tiny_arch: ModelArch) -> None:
    refused(good_adapter, tiny_arch, "r: 4", "max_lora_rank 2", max_lora_rank=2)


def _set(name: str, value: Callable[[dict[str, torch.Tensor]], torch.Tensor]) -> Callable:
    return lambda t: t.__setitem__(name, value(t))


Q_A = f"{PREFIX}.0.self_attn.q_proj.lora_A.weight"
Q_B = f"{PREFIX}.0.self_attn.q_proj.lora_B.weight"
TENSOR_REFUSALS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "lm_head_tensor": (_set("base_model.model.lm_head.lora_A.weight", lambda t: torch.zeros(4, 64)),
                       ("lm_head.lora_A.weight", "lm_head target")),
    "embed_tokens_tensor": (_set("base_model.model.model.embed_tokens.lora_embedding_A",
                                 lambda t: torch.zeros(4, 256)), ("embed_tokens",)),
    "dora_magnitude": (_set(f"{PREFIX}.0.self_attn.q_proj.lora_magnitude_vector",
                            lambda t: torch.ones(64)), ("lora_magnitude_vector", "DoRA")),
    "in_features": (_set(Q_A, lambda t: t[Q_A][:, :32].contiguous()),
                    ("shapes", "(4, 32)", "[r, 64]")),
    "ab_rank_mismatch": (_set(Q_B, lambda t: t[Q_B][:, :3].contiguous()),
                         ("rank", "(4, 3)", "differs")),
    "nan": (_set(Q_A, lambda t: t[Q_A].index_fill(1, torch.tensor([3]), float("nan"))),
            (Q_A, "NaN")),
    "inf": (_set(Q_B, lambda t: t[Q_B].index_fill(0, torch.tensor([1]), float("inf"))),
            (Q_B, "Inf")),
    "integer_dtype": (_set(Q_A, lambda t: t[Q_A].to(torch.int32)), (Q_A, "float")),
    "layer_out_of_range": (_set(f"{PREFIX}.7.self_attn.q_proj.lora_A.weight",
                                lambda t: t[Q_A].clone()),
                           ("layers.7.self_attn.q_proj", "num_layers 2")),
    "unknown_module": (_set(f"{PREFIX}.0.mlp.fc1.lora_A.weight", lambda t: t[Q_A].clone()),
                       ("mlp.fc1", "does not have")),
    "missing_lora_b": (lambda t: t.pop(Q_B), (Q_B.removeprefix("base_model.model."), "missing")),
    "targeted_without_tensors": (lambda t: [t.pop(k) for k in list(t) if ".1.mlp.down_proj." in k],
                                 ("model.layers.1.mlp.down_proj", "no tensors")),
}


@pytest.mark.parametrize("case", list(TENSOR_REFUSALS))
def test_refuses_tensors(case: str, bad: Path, tiny_arch: ModelArch) -> None:
    edit, expected = TENSOR_REFUSALS[case]
    edit_tensors(bad, edit)
    refused(bad, tiny_arch, *expected)


def test_refuses_adapter_for_another_base(good_adapter: Path, tiny_arch: ModelArch) -> None:
    wider = dataclasses.replace(tiny_arch, intermediate_size=256)
    refused(good_adapter, wider, "shapes", "do not fit the base", "[r, 256]")


def test_refuses_missing_config(bad: Path, tiny_arch: ModelArch) -> None:
    (bad / CONFIG_FILE).unlink()
    refused(bad, tiny_arch, CONFIG_FILE, "missing")


@pytest.mark.parametrize("text", ["{not json", "\xff\xfe", "[1, 2]"])
def test_refuses_config_that_is_not_a_json_object(text: str, bad: Path,
                                                  tiny_arch: ModelArch) -> None:
    (bad / CONFIG_FILE).write_bytes(text.encode("latin-1"))
    refused(bad, tiny_arch, CONFIG_FILE)


def test_refuses_missing_weights(bad: Path, tiny_arch: ModelArch) -> None:
    (bad / WEIGHTS_FILE).unlink()
    refused(bad, tiny_arch, WEIGHTS_FILE, "missing")


@pytest.mark.parametrize("damage", ["truncated", "tiny", "garbage_header"])
def test_refuses_truncated_or_corrupt_weights(damage: str, bad: Path, tiny_arch: ModelArch) -> None:
    path = bad / WEIGHTS_FILE
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "tiny": data[:5],
                      "garbage_header": b"\xff" * 8 + data[8:]}[damage])
    refused(bad, tiny_arch, WEIGHTS_FILE, "not a valid safetensors file")


def test_refuses_tensors_that_share_bytes(bad: Path, tiny_arch: ModelArch) -> None:
    """Two tensors over one byte range: safetensors forbids it; refused as a malformed file."""
    path = bad / WEIGHTS_FILE
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    header[Q_A.replace("layers.0.", "layers.1.")]["data_offsets"] = header[Q_A]["data_offsets"]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (header_len - len(text))  # same length: the offsets stay valid
    assert len(text) == header_len
    path.write_bytes(data[:8] + text + data[8 + header_len:])
    refused(bad, tiny_arch, WEIGHTS_FILE, "share bytes")


def test_refuses_pickled_bin_without_unpickling(bad: Path, tiny_arch: ModelArch,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    torch.save(load_file(bad / WEIGHTS_FILE), bad / "adapter_model.bin")
    (bad / WEIGHTS_FILE).unlink()

    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a pickle was opened")

    for module, attr in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(module, attr, forbidden)
    refused(bad, tiny_arch, "adapter_model.bin", "safetensors is required")


def test_half_precision_weights_load_as_float32(bad: Path, tiny_arch: ModelArch) -> None:
    # Adapters trained in bf16 are saved in bf16; the loader upcasts them once.
    edit_tensors(bad, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    stored = load_file(bad / WEIGHTS_FILE)
    adapter = load_adapter(bad, tiny_arch, max_lora_rank=8)
    w = adapter.modules[(0, "q_proj")]
    assert w.a.dtype == w.b.dtype == torch.float32
    assert torch.equal(w.a, stored[Q_A].float())
    assert torch.equal(w.b, stored[Q_B].float())
