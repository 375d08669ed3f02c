"""loraplex.lora.cache: adapters read through the spare buffer keep memory of their own."""
from __future__ import annotations

from collections.abc import Callable

import torch

from loraplex.config import LoRAConfig
from loraplex.lora.adapter import load_adapter
from loraplex.lora.cache import AdapterCache, SpareBuffer
from loraplex.lora.request import LoRARequest
from loraplex.models.llama import ModelArch


def test_spare_buffer_is_handed_out_once_and_only_when_it_fits() -> None:
    spare = SpareBuffer()
    spare.refill()  # no file seen yet: nothing to prepare
    first = spare.take(1000)
    assert len(first) == 1000 and first.obj is not None  # a fresh mapping, not the spare
    spare.refill()
    prepared = spare._buffer
    assert prepared is not None and len(prepared) == 1000 + SpareBuffer.SLACK
    view = spare.take(1010)  # a header a few bytes longer: the spare still fits
    assert len(view) == 1010 and view.obj is prepared
    view[:4] = b"data"
    assert spare.take(1010).obj is not prepared  # taken: the next one is new
    spare.refill()
    assert spare.take(10 * SpareBuffer.SLACK).obj is not spare._buffer  # too small: fresh
    assert len(spare.take(0)) == 0


def test_adapters_loaded_in_a_row_do_not_share_buffers(make_peft_adapter: Callable,
                                                      tiny_arch: ModelArch) -> None:
    folders = [make_peft_adapter(f"a{i}", seed=i, r=4, lora_alpha=8,
                                 target_modules=["q_proj", "down_proj"])[0] for i in range(3)]
    cache = AdapterCache(tiny_arch, LoRAConfig(max_loras=2, max_lora_rank=8))
    loaded = [cache.load_now(LoRARequest(f.name, str(f))) for f in folders]
    for folder, adapter in zip(folders, loaded):  # later loads left earlier ones intact
        truth = load_adapter(folder, tiny_arch, max_lora_rank=8)
        assert adapter.content_hash == truth.content_hash
        for key, w in truth.modules.items():
            assert torch.equal(adapter.modules[key].a, w.a)
            assert torch.equal(adapter.modules[key].b, w.b)
    starts = {a.modules[(0, "q_proj")].a.data_ptr() for a in loaded}
    assert len(starts) == 3
