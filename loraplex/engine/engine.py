"""The engine: requests in, one step at a time, outputs out.

``step()`` is schedule → run → postprocess. Everything a request can get wrong is checked
in ``add_request`` before it joins the queue, so a bad request never reaches a batch.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, wait

import torch

from loraplex.config import EngineConfig
from loraplex.engine.kv_cache import BlockManager
from loraplex.engine.model_runner import ModelRunner
from loraplex.engine.scheduler import ScheduledBatch, Scheduler
from loraplex.engine.sequence import RequestOutput, Sequence, SequenceStatus
from loraplex.engine.stop import check_stop, is_stop_token, take_streamable_text
from loraplex.lora.adapter import LoRAAdapter, load_adapter
from loraplex.lora.auto_merge import AutoMergePolicy
from loraplex.lora.cache import AdapterCache
from loraplex.lora.merge import LiveMerge
from loraplex.lora.request import LoRARequest
from loraplex.models.loader import CheckpointReader, load_model, read_arch
from loraplex.models.registry import resolve_model
from loraplex.models.tokenizer import Tokenizer
from loraplex.sampling import SamplingParams
from loraplex.spec.decoder import SpecDecoder

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        mc = config.model
        torch.set_num_threads(mc.resolved_num_threads())
        self.device, self.dtype = mc.resolved_device(), mc.resolved_dtype()
        self.model_path = resolve_model(mc.model)
        self.arch = read_arch(self.model_path)
        self.tokenizer = Tokenizer(self.model_path)
        model = load_model(self.model_path, self.dtype, self.device)
        self._checkpoint: CheckpointReader | None = None  # base values for merges, opened once
        self.merged_adapter: LoRAAdapter | None = None  # merged for good (dedicated)
        if mc.merge is not None:
            # Offline there are no slots, so no rank limit; the base copies are dropped.
            self.merged_adapter = load_adapter(mc.merge, self.arch, max_lora_rank=1 << 20)
            LiveMerge(model, self._checkpoint_reader(), [self.merged_adapter])
        model.pack_weights()

        cc = config.cache
        block_bytes = ModelRunner.kv_bytes_per_block(model, cc.block_size, self.dtype)
        num_blocks = int(cc.kv_cache_gib * 2**30) // block_bytes
        self.max_model_len = self._max_model_len(num_blocks * cc.block_size)
        self.block_manager = BlockManager(num_blocks, cc.block_size, cc.enable_prefix_caching)
        lc = config.lora
        self.adapters = AdapterCache(self.arch, lc) if lc.max_loras else None
        self.scheduler = Scheduler(config.scheduler, self.block_manager, self.adapters,
                                   lc.max_lora_wait_steps)
        self.runner = ModelRunner(model, num_blocks, cc.block_size, self.device, self.dtype,
                                  lc.max_loras, lc.max_lora_rank)
        self.spec = (SpecDecoder(config.spec, self.model_path, self.arch, self.device,
                                 self.dtype, num_blocks, cc.block_size)
                     if config.spec.is_enabled else None)
        self.sequences: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self.auto_merge = (AutoMergePolicy(lc.auto_merge_share, lc.auto_merge_window)
                           if lc.auto_merge else None)
        self.live_merged: LoRAAdapter | None = None  # merged at run time (merge_lora or auto-merge)
        logger.info("loaded %s (%s, %s) with %d KV blocks; max_model_len %d", self.model_path,
                    self.dtype, self.device, num_blocks, self.max_model_len)

    def _max_model_len(self, kv_capacity: int) -> int:
        limits = [self.arch.max_position_embeddings, kv_capacity]
        if self.arch.sliding_window:  # attention is exact only within the window
            limits.append(self.arch.sliding_window)
        wanted = self.config.model.max_model_len
        if wanted is not None and wanted > min(limits):
            raise ValueError(f"max_model_len: {wanted} exceeds what this model and KV cache "
                             f"hold ({min(limits)}); raise kv_cache_gib or lower it")
        return wanted or min(limits)

    # ---- requests -----------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], params: SamplingParams,
                    request_id: str | None = None, arrival_time: float | None = None,
                    lora: LoRARequest | None = None) -> Sequence:
        return self.add_sequence(self.make_sequence(prompt, params, request_id, arrival_time, lora))

    def add_sequence(self, seq: Sequence) -> Sequence:
        """Queue a sequence built by ``make_sequence``; its adapter starts loading now."""
        if seq.lora is not None:
            seq.lora_load = self.adapters.prefetch(seq.lora)
        self.sequences[seq.request_id] = seq
        self.scheduler.add(seq)
        return seq

    def make_sequence(self, prompt: str | list[int], params: SamplingParams,
                      request_id: str | None = None, arrival_time: float | None = None,
                      lora: LoRARequest | None = None) -> Sequence:
        """Validate a request and build its sequence, without queueing it."""
        if lora is not None and self.adapters is None:
            raise ValueError(f"lora: {lora.name!r} asked for, but this engine runs with "
                             "max_loras=0 (LoRA off)")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params: expected SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, token_ids = None, list(prompt)
            bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < self.arch.vocab_size]
            if bad:
                raise ValueError(f"prompt: token id {bad[0]!r} is outside the vocabulary "
                                 f"[0, {self.arch.vocab_size})")
        if not token_ids:
            raise ValueError("prompt: is empty")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt: {len(token_ids)} tokens leave no room to generate within "
                             f"max_model_len {self.max_model_len}")
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.sequences:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        seq = Sequence(request_id=request_id, prompt=text, prompt_token_ids=token_ids,
                       params=params, eos_token_ids=self.tokenizer.eos_token_ids,
                       max_model_len=self.max_model_len, lora=lora)
        if arrival_time is not None:
            seq.metrics.arrival_time = arrival_time
        if params.seed is not None:
            seq.generator = torch.Generator(self.device).manual_seed(params.seed)
        return seq

    def abort_request(self, request_id: str) -> None:
        seq = self.sequences.pop(request_id, None)
        if seq is not None and not seq.status.is_finished:
            self.scheduler.finish(seq, SequenceStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # ---- the step -----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        failed = self._collect_adapter_loads()
        if self.spec is not None:
            self.spec.propose(self.scheduler.running)
        batch = self.scheduler.schedule()
        if batch.is_empty:
            if failed or not self.has_unfinished_requests():
                return failed
            self._wait_for_adapter_loads()
            return failed
        if self.auto_merge is not None:
            self._auto_merge_step(batch)
        if self.adapters is not None:
            self.runner.load_adapters(self.adapters.take_pending_loads())
        sampled = self.runner.execute(batch)
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n - len(seq.draft_token_ids)  # drafts: once accepted
            self.block_manager.register_full_blocks(seq)
        now = time.monotonic()
        outputs = failed
        for seq, token_ids, logprobs in sampled:
            if seq.draft_token_ids:  # the KV of the accepted drafts is valid, the rest is not
                seq.num_computed_tokens += len(token_ids) - 1
                self.spec.record(seq, num_accepted=len(token_ids) - 1)
            outputs.append(self._append_tokens(seq, token_ids, logprobs, now))
        return outputs

    # ---- run-time merge ------------------------------------------------------------------

    def merge_lora(self, lora: LoRARequest) -> None:
        """Merge ``lora`` into the live weights: its requests then run at base speed, all
        others stay exact (its delta is taken out for them). Undo with ``unmerge_lora``;
        with ``auto_merge`` on, the policy may undo it too."""
        if self.adapters is None:
            raise ValueError("lora: run-time merging needs LoRA serving on (max_loras >= 1)")
        adapter = self.adapters.load_now(lora)
        if self.live_merged is not None and self.live_merged.content_hash == adapter.content_hash:
            return
        if not self.adapters.can_activate(adapter):
            raise ValueError(f"lora: {lora.name!r} cannot be merged now: every adapter slot "
                             "is held by running requests")
        self.unmerge_lora()
        self._merge(adapter)

    def unmerge_lora(self) -> None:
        """Restore the base weights bit for bit (no-op when nothing is merged)."""
        if self.live_merged is None:
            return
        slot = self.runner.merged_slot
        self.runner.unmerge_adapter()
        self.adapters.release(slot)
        self.adapters.stats.unmerges += 1
        logger.info("unmerged adapter %s", self.live_merged.name)
        self.live_merged = None

    def _merge(self, adapter: LoRAAdapter) -> None:
        slot = self.adapters.activate(adapter)  # held while merged: the unmerge path reads it
        self.runner.load_adapters(self.adapters.take_pending_loads())
        merged_for_good = [self.merged_adapter] if self.merged_adapter is not None else []
        self.runner.merge_adapter(slot, adapter, self._checkpoint_reader(), merged_for_good)
        self.live_merged = adapter
        self.adapters.stats.merges += 1
        logger.info("merged adapter %s into the weights", adapter.name)

    def _checkpoint_reader(self) -> CheckpointReader:
        if self._checkpoint is None:
            self._checkpoint = CheckpointReader(self.model_path)
        return self._checkpoint

    def _auto_merge_step(self, batch: ScheduledBatch) -> None:
        """Count this step's tokens by adapter; merge or unmerge when the policy says so."""
        tokens: Counter[str | None] = Counter()
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            tokens[seq.adapter.content_hash if seq.adapter is not None else None] += n
        self.auto_merge.observe(tokens)
        current = self.live_merged.content_hash if self.live_merged is not None else None
        wanted = self.auto_merge.wanted(current)
        if wanted == current:
            return
        adapter = self.adapters.host.get(wanted) if wanted is not None else None
        if wanted is not None and (adapter is None or not self.adapters.can_activate(adapter)):
            return  # evicted from host memory, or every slot is busy: try again later
        logger.info("auto-merge: %s (share threshold %.2f, window %d steps)",
                    f"merging {adapter.name}" if adapter else "unmerging",
                    self.auto_merge.share, self.auto_merge.window)
        self.unmerge_lora()
        if adapter is not None:
            self._merge(adapter)
        self.auto_merge.switched()

    def _wait_for_adapter_loads(self, timeout_s: float = 0.005) -> None:
        """Nothing to run but adapter loads: wait until one finishes (or ``timeout_s``, so
        a caller stepping in a loop still sees new requests soon), with the GIL let go.
        Polling instead took the GIL from the loading thread every millisecond."""
        loads = [seq.lora_load for seq in self.scheduler.waiting
                 if seq.lora_load is not None and not seq.lora_load.done()]
        if loads:
            wait(loads, timeout=timeout_s, return_when=FIRST_COMPLETED)
        else:
            time.sleep(0.001)

    def _collect_adapter_loads(self) -> list[RequestOutput]:
        """Hand finished adapter loads to their waiting sequences; fail those whose
        adapter was refused (only those: the rest of the batch never sees it)."""
        failed = []
        for seq in list(self.scheduler.waiting):
            if seq.adapter is not None or seq.lora_load is None or not seq.lora_load.done():
                continue
            error = seq.lora_load.exception()
            if error is None:
                seq.adapter = self.adapters.take_loaded(seq.lora_load.result())
                seq.cache_salt = bytes.fromhex(seq.adapter.content_hash)
                continue
            seq.error = str(error)
            seq.metrics.finished_time = time.monotonic()
            self.scheduler.finish(seq, SequenceStatus.FINISHED_ERROR)
            self.sequences.pop(seq.request_id, None)
            failed.append(self.output_of(seq))
        return failed

    def _append_tokens(self, seq: Sequence, token_ids: list[int], logprobs: list,
                       now: float) -> RequestOutput:
        """Append a step's tokens (more than one when drafts were accepted) until one stops."""
        if seq.metrics.first_token_time is None:
            seq.metrics.first_token_time = now
        for token_id, logprob in zip(token_ids, logprobs):
            seq.output_token_ids.append(token_id)
            if logprob is not None:
                seq.logprobs.append(logprob)
            new_text = ""
            if not is_stop_token(seq, token_id):  # a stop token's text is never shown
                new_text, seq.prefix_offset, seq.read_offset = self.tokenizer.detokenize_incrementally(
                    seq.output_token_ids, seq.prefix_offset, seq.read_offset,
                    seq.params.skip_special_tokens)
                seq.output_text += new_text
            status = check_stop(seq, new_text)
            if status is not None:
                seq.metrics.finished_time = now
                self.scheduler.finish(seq, status)
                self.sequences.pop(seq.request_id, None)
                break
        else:
            if len(token_ids) > 1:  # blocks now filled by accepted drafts
                self.block_manager.register_full_blocks(seq)
        return self.output_of(seq, take_streamable_text(seq))

    def output_of(self, seq: Sequence, new_text: str = "") -> RequestOutput:
        finish = seq.status.value if seq.status.is_finished else None
        return RequestOutput(
            request_id=seq.request_id, prompt=seq.prompt, prompt_token_ids=seq.prompt_token_ids,
            text=seq.output_text, token_ids=list(seq.output_token_ids), finish_reason=finish,
            logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
            metrics=seq.metrics, new_text=new_text,
            lora_name=seq.lora.name if seq.lora is not None else None, error=seq.error)

