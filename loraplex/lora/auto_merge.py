"""Merge when it pays: which adapter, if any, should be merged into the base weights now.

Plain Python book-keeping over the tokens each step scheduled; the engine executes the
decisions (lora/merge.py ``LiveMerge``, and the runner's unmerge mapping).

Why the thresholds: with adapter X merged, X's tokens cost nothing extra and every other
token pays one extra shrink/expand to take X's delta out; unmerged, X's tokens pay one.
So merging saves work while X holds more than half of the tokens. It is merged only above
``share`` (> 0.5) so that a merge is not undone at once, unmerged below 0.5, and no switch
comes sooner than ``window`` steps after the last one: a merge costs a pass over the
targeted weights, which a few steps of savings must pay back.
"""
from __future__ import annotations

from collections import Counter, deque

BREAK_EVEN_SHARE = 0.5


class AutoMergePolicy:
    def __init__(self, share: float, window: int) -> None:
        assert BREAK_EVEN_SHARE < share <= 1 and window >= 1
        self.share = share
        self.window = window
        self._steps: deque[Counter[str | None]] = deque(maxlen=window)
        self._steps_since_switch = 0

    def observe(self, tokens: Counter[str | None]) -> None:
        """Tokens one step computed, by adapter content hash (None = the base model)."""
        self._steps.append(tokens)
        self._steps_since_switch += 1

    def wanted(self, merged: str | None) -> str | None:
        """The adapter that should be merged, given the one that is (None = none)."""
        if self._steps_since_switch < self.window:
            return merged
        totals: Counter[str | None] = sum(self._steps, Counter())
        num_tokens = sum(totals.values())
        if not num_tokens:
            return merged
        shares = {h: n / num_tokens for h, n in totals.items() if h is not None}
        top = max(shares, key=shares.__getitem__, default=None)
        if top is not None and shares[top] >= self.share:
            return top
        if merged is not None and shares.get(merged, 0.0) >= BREAK_EVEN_SHARE:
            return merged
        return None

    def switched(self) -> None:
        self._steps_since_switch = 0
