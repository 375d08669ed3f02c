"""Turns a scheduled batch into tensors, runs the model, samples.

The only engine module that touches tensors. Per step it copies newly activated adapters
into their slots, then builds: the flat token ids and positions, the KV slot of each new
token, the attention metadata (decodes first, then prefill chunks) and the LoRA mapping
(token -> adapter slot); after the forward pass it computes logits only for the
sequences whose last token was in this step, and samples from them.
"""
from __future__ import annotations

import torch

from loraplex.engine.sampler import sample
from loraplex.engine.scheduler import ScheduledBatch
from loraplex.engine.sequence import Sequence
from loraplex.lora.adapter import LoRAAdapter
from loraplex.lora.layers import attach_lora_stacks, load_into_slot
from loraplex.lora.merge import LiveMerge
from loraplex.lora.ops import LoRAMapping
from loraplex.models.attention import AttentionMetadata, PrefillChunk
from loraplex.models.llama import LlamaModel
from loraplex.models.loader import CheckpointReader
from loraplex.sampling import TokenLogprob


class ModelRunner:
    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype, max_loras: int = 0,
                 max_lora_rank: int = 16) -> None:
        arch = model.arch
        self.model = model
        self.block_size = block_size
        self.device = device
        self.lora_stacks = attach_lora_stacks(model, max_loras, max_lora_rank) if max_loras else []
        self.slot_ranks: dict[int, int] = {}
        # The adapter merged into the weights (auto-merge): its slot stays loaded so its
        # delta can be taken out for every other token.
        self.merged_slot = -1
        self._live_merge: LiveMerge | None = None
        # [layers, k|v, slots, kv_heads, head_dim]
        self.kv_caches = torch.zeros(arch.num_layers, 2, num_blocks * block_size,
                                     arch.num_kv_heads, arch.head_dim, dtype=dtype, device=device)

    @staticmethod
    def kv_bytes_per_block(model: LlamaModel, block_size: int, dtype: torch.dtype) -> int:
        a = model.arch
        return a.num_layers * 2 * block_size * a.num_kv_heads * a.head_dim * dtype.itemsize

    @torch.inference_mode()
    def load_adapters(self, loads: list[tuple[int, LoRAAdapter]]) -> None:
        for slot, adapter in loads:
            load_into_slot(self.lora_stacks, slot, adapter)
            self.slot_ranks[slot] = adapter.max_rank

    def merge_adapter(self, slot: int, adapter: LoRAAdapter, checkpoint: CheckpointReader) -> None:
        """Merge the adapter in ``slot`` (already loaded there) into the weights."""
        assert self._live_merge is None and self.slot_ranks.get(slot) == adapter.max_rank
        self._live_merge = LiveMerge(self.model, checkpoint, [adapter])
        self.merged_slot = slot

    def unmerge_adapter(self) -> None:
        assert self._live_merge is not None
        self._live_merge.unmerge()
        self._live_merge, self.merged_slot = None, -1

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> list[tuple[Sequence, int, TokenLogprob | None]]:
        """Run one step; returns (sequence, sampled token, logprobs) for each that samples."""
        order = sorted(range(len(batch.seqs)), key=lambda i: batch.num_new_tokens[i] != 1)
        seqs = [batch.seqs[i] for i in order]
        counts = [batch.num_new_tokens[i] for i in order]
        input_ids, positions, meta = self._prepare(seqs, counts)
        lora = None
        if self.merged_slot >= 0 or any(seq.lora_slot >= 0 for seq in seqs):
            token_slots = [seq.lora_slot for seq, n in zip(seqs, counts) for _ in range(n)]
            lora = LoRAMapping.build(token_slots, self.slot_ranks, self.device, self.merged_slot)
        hidden = self.model(input_ids, positions, self.kv_caches, meta, lora)

        # The last row of each sequence that is now fully computed predicts its next token.
        sampling, rows, end = [], [], 0
        for seq, n in zip(seqs, counts):
            end += n
            if seq.num_computed_tokens + n == seq.num_tokens:
                sampling.append(seq)
                rows.append(end - 1)
        if not sampling:
            return []
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])
        token_ids, logprobs = sample(logits, sampling)
        return list(zip(sampling, token_ids, logprobs))

    def _prepare(self, seqs: list[Sequence], counts: list[int]
                 ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        bs, dev = self.block_size, self.device
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        num_decodes = sum(1 for n in counts if n == 1)
        decode_tables, decode_lens, prefills = [], [], []
        for seq, n in zip(seqs, counts):
            start = seq.num_computed_tokens
            input_ids += seq.token_slice(start, start + n)
            positions += range(start, start + n)
            table = seq.block_ids
            slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
            if n == 1:
                decode_tables.append(table)
                decode_lens.append(start + 1)
            else:
                prefills.append((len(input_ids) - n, len(input_ids), table, start))

        decode_slots = decode_mask = None
        if num_decodes:
            max_len = max(decode_lens)
            width = -(-max_len // bs)
            tables = torch.tensor([t[:width] + [0] * (width - len(t[:width])) for t in decode_tables],
                                  device=dev)  # [B, blocks]
            pos = torch.arange(max_len, device=dev)
            decode_slots = tables[:, pos // bs] * bs + pos % bs  # [B, T]
            lens = torch.tensor(decode_lens, device=dev)
            decode_mask = (pos[None, :] < lens[:, None])[:, None, None, :]  # [B, 1, 1, T]

        chunks = []
        for start, end, table, num_cached in prefills:
            num_context = num_cached + (end - start)
            pos = torch.arange(num_context, device=dev)
            context_slots = torch.tensor(table, device=dev)[pos // bs] * bs + pos % bs
            mask = None
            if num_cached:
                queries = torch.arange(num_cached, num_context, device=dev)
                mask = pos[None, :] <= queries[:, None]  # [Q, T]
            chunks.append(PrefillChunk(start, end, context_slots, mask))

        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=dev),
            num_decode_tokens=num_decodes,
            decode_slots=decode_slots,
            decode_mask=decode_mask,
            prefills=chunks,
        )
        return (torch.tensor(input_ids, device=dev), torch.tensor(positions, device=dev), meta)
