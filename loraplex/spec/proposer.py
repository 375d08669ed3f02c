"""Proposers: where the draft tokens of speculative decoding come from.

Both sit behind ``Proposer``. ``NgramProposer`` looks the sequence's newest tokens up in
its own prompt and output (prompt lookup decoding: no model at all, strong when the answer
copies from the prompt). ``DraftModelProposer`` runs a small Llama-family model with the
target's tokenizer, through the same model code and model runner as the target, with its
own paged KV cache: each target sequence has a shadow sequence in the draft's cache that
follows the target's accepted tokens.

A draft folder may carry a draft vocabulary (``loraplex_draft_vocab.json``, written by
``train-draft``): the token ids it may propose. Its head then keeps only those rows, so a
draft position costs a fraction of the full head (576 x 49152 weights for the default
model, more than the draft's layers together); the idea is FR-Spec's frequency-ranked
draft vocabulary. Losslessness does not depend on it: a token the draft cannot propose is
simply never accepted as a draft, and its draft distribution is zero outside the subset.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch

from loraplex.engine.kv_cache import BlockManager
from loraplex.engine.model_runner import ModelRunner
from loraplex.engine.sampler import _filtered_probs
from loraplex.engine.sequence import Sequence
from loraplex.models.linear import Linear
from loraplex.models.llama import ModelArch
from loraplex.models.loader import load_model, read_arch


DRAFT_VOCAB_FILE = "loraplex_draft_vocab.json"


def read_draft_vocab(folder: Path, vocab_size: int) -> list[int] | None:
    """The token ids a draft folder restricts its proposals to; None: the whole vocabulary."""
    file = folder / DRAFT_VOCAB_FILE
    if not file.is_file():
        return None
    try:
        ids = json.loads(file.read_text())["token_ids"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"draft_model: {str(file)!r} is not a JSON object with a "
                         f"'token_ids' list ({e})") from None
    if (not isinstance(ids, list) or not ids or len(set(ids)) != len(ids)
            or not all(isinstance(i, int) and 0 <= i < vocab_size for i in ids)):
        raise ValueError(f"draft_model: {str(file)!r}: token_ids must be a non-empty list of "
                         f"distinct ids in [0, {vocab_size})")
    return ids


class Proposer(ABC):
    """Proposes draft tokens for sequences whose next step is a decode.

    Invariant: ``propose`` sets each ``seqs[i].draft_token_ids`` to at most
    ``num_tokens[i]`` tokens (possibly none: then the sequence decodes as usual), and
    ``draft_probs`` to the distribution each was drawn from, [k, vocab], or None when the
    proposal is deterministic. It never changes anything else of a sequence.
    """

    @abstractmethod
    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> None: ...

    def release_finished(self) -> None:
        """Forget the state kept for sequences that have finished."""

    @property
    def is_model(self) -> bool:
        """Whether proposing runs a model (its cost then matters for the choice of k)."""
        return False


class NgramProposer(Proposer):
    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> None:
        for seq, k in zip(seqs, num_tokens):
            seq.draft_token_ids = ngram_lookup(seq.all_token_ids, k, self.min_n, self.max_n)
            seq.draft_probs = None


def ngram_lookup(tokens: list[int], num_tokens: int, min_n: int, max_n: int) -> list[int]:
    """The tokens that followed the latest earlier occurrence of the longest suffix
    n-gram (max_n down to min_n) of ``tokens``; [] when no suffix recurs."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = tokens[length - n:]
        # Latest start first: recent context predicts best.
        for start in range(length - n - 1, -1, -1):
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + num_tokens]
    return []


@dataclass(slots=True)
class _Shadow:
    """The draft model's copy of one target sequence."""

    target: Sequence
    seq: Sequence  # prompt + the target's accepted tokens + this step's drafts
    num_synced: int = 0  # leading output tokens known equal to the target's


class DraftModelProposer(Proposer):
    def __init__(self, path: Path, target_arch: ModelArch, target_path: Path,
                 device: torch.device, dtype: torch.dtype, num_blocks: int,
                 block_size: int) -> None:
        self.path = path
        self.arch = read_arch(path)
        check_same_vocab(path, self.arch, target_path, target_arch)
        model = load_model(path, dtype, device)
        vocab = read_draft_vocab(path, self.arch.vocab_size)
        # [V'] long: the token id of each row of the (restricted) head; None: all rows.
        self.vocab_ids = None if vocab is None else torch.tensor(vocab, device=device)
        if self.vocab_ids is not None:
            model.lm_head = restricted_head(model.lm_head, self.vocab_ids)
        model.pack_weights()
        self.model = model
        self.device = device
        self.runner = ModelRunner(model, num_blocks, block_size, device, dtype)
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        self.shadows: dict[str, _Shadow] = {}

    @property
    def is_model(self) -> bool:
        return True

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> None:
        active: list[tuple[Sequence, _Shadow, int]] = []
        for seq, k in zip(seqs, num_tokens):
            seq.draft_token_ids, seq.draft_probs = [], None
            shadow = self._sync(seq)
            # k forwards: the tokens it has not seen, then k - 1 drafts one at a time.
            num_to_compute = shadow.seq.num_uncomputed_tokens + k - 1
            if (shadow.seq.num_tokens + k > self.arch.max_position_embeddings
                    or self.blocks.blocks_needed(shadow.seq, num_to_compute) > self.blocks.num_free_blocks):
                continue  # the draft's own context or cache is full: no proposal
            self.blocks.allocate(shadow.seq, num_to_compute)
            active.append((seq, shadow, k))
        probs: dict[int, list[torch.Tensor]] = {id(seq): [] for seq, _, _ in active}
        for step in range(max((k for _, _, k in active), default=0)):
            running = [(seq, shadow) for seq, shadow, k in active if k > step]
            shadows = [shadow.seq for _, shadow in running]
            counts = [s.num_uncomputed_tokens for s in shadows]
            ordered, ordered_counts, hidden = self.runner.forward(shadows, counts)
            last_rows, end = {}, 0
            for s, n in zip(ordered, ordered_counts):
                end += n
                last_rows[id(s)] = end - 1
            rows = torch.tensor([last_rows[id(s)] for s in shadows], device=self.device)
            logits = self.model.compute_logits(hidden[rows])  # [B, V'] (V': the head's rows)
            for i, (seq, shadow) in enumerate(running):
                shadow.seq.num_computed_tokens += counts[i]
                if seq.params.is_greedy:
                    row = int(logits[i].argmax())
                else:
                    q = _filtered_probs(logits[i:i + 1], [seq])[0]
                    row = int(torch.multinomial(q, 1, generator=seq.generator)[0])
                    probs[id(seq)].append(q)
                token_id = row if self.vocab_ids is None else int(self.vocab_ids[row])
                shadow.seq.output_token_ids.append(token_id)
                seq.draft_token_ids.append(token_id)
        for seq, _, _ in active:
            if probs[id(seq)]:
                q = torch.stack(probs[id(seq)])  # [k, V']
                if self.vocab_ids is not None:  # zero for the ids the draft cannot propose
                    q = q.new_zeros(len(q), self.arch.vocab_size).index_copy_(1, self.vocab_ids, q)
                seq.draft_probs = q  # [k, vocab]

    def _sync(self, target: Sequence) -> _Shadow:
        """Bring the shadow up to the target's tokens; its KV stays valid as far as the
        drafts it computed were accepted."""
        shadow = self.shadows.get(target.request_id)
        if shadow is None or shadow.target is not target:
            if shadow is not None:
                self.blocks.free(shadow.seq)
            shadow = _Shadow(target, Sequence(
                request_id=target.request_id, prompt=None,
                prompt_token_ids=target.prompt_token_ids, params=target.params,
                eos_token_ids=target.eos_token_ids, max_model_len=target.max_model_len))
            self.shadows[target.request_id] = shadow
        mine, theirs = shadow.seq.output_token_ids, target.output_token_ids
        same = shadow.num_synced
        while same < min(len(mine), len(theirs)) and mine[same] == theirs[same]:
            same += 1
        num_prompt = len(target.prompt_token_ids)
        shadow.seq.num_computed_tokens = min(shadow.seq.num_computed_tokens, num_prompt + same)
        shadow.seq.output_token_ids = list(theirs)
        shadow.num_synced = len(theirs)
        return shadow

    def release_finished(self) -> None:
        for request_id, shadow in list(self.shadows.items()):
            if shadow.target.status.is_finished:
                self.blocks.free(shadow.seq)
                del self.shadows[request_id]


def restricted_head(head: Linear, vocab_ids: torch.Tensor) -> Linear:
    """A head that scores only ``vocab_ids`` ([V'] long): row j is token vocab_ids[j]."""
    restricted = Linear(head.weight.shape[1], len(vocab_ids))
    restricted.weight.data = head.weight.data.index_select(0, vocab_ids)
    return restricted


def check_same_vocab(draft_path: Path, draft: ModelArch, target_path: Path,
                     target: ModelArch) -> None:
    """A draft must share the target's tokenizer: same vocabulary size and, where both
    folders carry a tokenizer.json, the same token -> id table."""
    if draft.vocab_size != target.vocab_size:
        raise ValueError(f"draft_model: {str(draft_path)!r} has vocab_size {draft.vocab_size}, "
                         f"the target {target.vocab_size}; a draft must share the tokenizer")
    files = [p / "tokenizer.json" for p in (draft_path, target_path)]
    if all(f.is_file() for f in files):
        vocabs = [json.loads(f.read_text()).get("model", {}).get("vocab") for f in files]
        if vocabs[0] != vocabs[1]:
            raise ValueError(f"draft_model: {str(draft_path)!r} has a different tokenizer "
                             "vocabulary than the target; a draft must share the tokenizer")
