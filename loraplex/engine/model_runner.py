"""Turns a scheduled batch into tensors, runs the model, samples.

The only engine module that touches tensors. Per step it copies newly activated adapters
into their slots, then builds: the flat token ids and positions, the KV slot of each new
token, the attention metadata (decodes first, then prefill chunks) and the LoRA mapping
(token -> adapter slot); after the forward pass it computes logits only for the
sequences whose last token was in this step, and samples from them. A sequence with draft
tokens (speculative decoding) runs as a short prefill chunk of its last token + drafts;
all its rows get logits, and spec/verify.py picks the tokens instead of the sampler.
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
from loraplex.spec.verify import verify_drafts


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

    def merge_adapter(self, slot: int, adapter: LoRAAdapter, checkpoint: CheckpointReader,
                      merged_for_good: list[LoRAAdapter]) -> None:
        """Merge the adapter in ``slot`` (already loaded there) into the weights.
        ``merged_for_good``: adapters merged at load (dedicated), whose deltas the rebuilt
        weights must keep, since they are built from the checkpoint."""
        assert self._live_merge is None and self.slot_ranks.get(slot) == adapter.max_rank
        self._live_merge = LiveMerge(self.model, checkpoint, [*merged_for_good, adapter])
        self.merged_slot = slot

    def unmerge_adapter(self) -> None:
        assert self._live_merge is not None
        self._live_merge.unmerge()
        self._live_merge, self.merged_slot = None, -1

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch
                ) -> list[tuple[Sequence, list[int], list[TokenLogprob | None]]]:
        """Run one step; returns, for each sequence that samples, its new tokens and their
        logprobs: one token, or with draft tokens the accepted ones plus one more."""
        seqs, counts, hidden = self.forward(batch.seqs, batch.num_new_tokens)
        # The last row of each sequence that is now fully computed predicts its next token;
        # a sequence with draft tokens has every row scored (last token + k drafts).
        sampling, plain_rows, spec, rows, end = [], [], [], [], 0
        for seq, n in zip(seqs, counts):
            end += n
            if seq.draft_token_ids:
                spec.append((seq, len(rows), n))
                rows += range(end - n, end)
            elif seq.num_computed_tokens + n == seq.num_tokens:
                sampling.append(seq)
                plain_rows.append(len(rows))
                rows.append(end - 1)
        if not rows:
            return []
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])
        results = []
        if sampling:
            token_ids, logprobs = sample(logits[plain_rows] if spec else logits, sampling)
            results += [(seq, [t], [lp]) for seq, t, lp in zip(sampling, token_ids, logprobs)]
        for seq, first, n in spec:
            results.append((seq, *verify_drafts(logits[first:first + n], seq)))
        return results

    def forward(self, seqs: list[Sequence], counts: list[int]
                ) -> tuple[list[Sequence], list[int], torch.Tensor]:
        """Compute ``counts[i]`` new tokens of each ``seqs[i]``; returns the sequences and
        counts in batch order (decodes first) and the hidden states [N, hidden]."""
        order = sorted(range(len(seqs)), key=lambda i: counts[i] != 1)
        seqs = [seqs[i] for i in order]
        counts = [counts[i] for i in order]
        input_ids, positions, meta = self._prepare(seqs, counts)
        lora = None
        if self.merged_slot >= 0 or any(seq.lora_slot >= 0 for seq in seqs):
            token_slots = [seq.lora_slot for seq, n in zip(seqs, counts) for _ in range(n)]
            lora = LoRAMapping.build(token_slots, self.slot_ranks, self.device, self.merged_slot)
        return seqs, counts, self.model(input_ids, positions, self.kv_caches, meta, lora)

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
            known = seq.token_slice(start, min(start + n, seq.num_tokens))
            input_ids += known + seq.draft_token_ids[:n - len(known)]  # drafts follow the last token
            positions += range(start, start + n)
            table = seq.block_ids
            slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
            if n == 1:
                decode_tables.append(table)
                decode_lens.append(start + 1)
            else:
                prefills.append((len(input_ids) - n, len(input_ids), table, start))

        decode_slots = decode_mask = lens = None
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
            decode_lens=lens,
            prefills=chunks,
        )
        return (torch.tensor(input_ids, device=dev), torch.tensor(positions, device=dev), meta)
