"""Per-request sampling parameters, validated on creation."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops.

    ``temperature`` below 1e-5 is greedy (dividing logits by less overflows them). ``seed`` makes one request reproducible whatever else
    runs in its batch: each seeded request draws from its own generator.
    ``logprobs=N`` returns the sampled token's log-probability and the N most likely
    alternatives, taken from the model's raw distribution (before temperature, top-k, top-p).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and frozen into tuples.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1,
               "max_tokens", self.max_tokens, "an integer >= 1")
        _check(_is_number(self.temperature) and self.temperature >= 0, "temperature",
               self.temperature, "a number >= 0")
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p,
               "a number in (0, 1]")
        _check(_is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 1),
               "top_k", self.top_k, "-1 (off) or an integer >= 1")
        _check(self.seed is None or _is_int(self.seed), "seed", self.seed, "None or an integer")
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", self.ignore_eos, "a boolean")
        _check(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= 20),
               "logprobs", self.logprobs, "None or an integer in [0, 20]")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop,
               "non-empty strings")
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids", self.stop_token_ids, "non-negative integers")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def needs_filtering(self) -> bool:
        return self.top_k != -1 or self.top_p < 1


GREEDY_TEMPERATURE = 1e-5


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


@dataclass(slots=True)
class TokenLogprob:
    """Log-probability of one generated token and the most likely alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
