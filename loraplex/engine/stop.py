"""When a sequence stops, and how much of its text may be shown yet.

Stop strings are matched on the detokenized text. While a sequence runs, text that could
be the start of a stop string is held back from the stream, so a client never sees text
that the final output removes.
"""
from __future__ import annotations

from loraplex.engine.sequence import Sequence, SequenceStatus


def is_stop_token(seq: Sequence, token_id: int) -> bool:
    return ((not seq.params.ignore_eos and token_id in seq.eos_token_ids)
            or token_id in seq.params.stop_token_ids)


def check_stop(seq: Sequence, new_text: str) -> SequenceStatus | None:
    """The finish status after ``seq``'s newest token (whose text was ``new_text``), or
    None. A matched stop string is cut from ``seq.output_text`` here."""
    if is_stop_token(seq, seq.output_token_ids[-1]):
        return SequenceStatus.FINISHED_STOPPED
    if new_text and seq.params.stop:
        found = _find_stop_string(seq.output_text, new_text, seq.params.stop)
        if found is not None:
            index, stop = found
            keep = index + len(stop) if seq.params.include_stop_str_in_output else index
            seq.output_text = seq.output_text[:keep]
            return SequenceStatus.FINISHED_STOPPED
    if len(seq.output_token_ids) >= seq.params.max_tokens or seq.num_tokens >= seq.max_model_len:
        return SequenceStatus.FINISHED_LENGTH
    return None


def take_streamable_text(seq: Sequence) -> str:
    """Text not yet streamed that is safe to show; marks it as streamed."""
    end = len(seq.output_text)
    if not seq.status.is_finished:
        end -= _held_back(seq.output_text, seq.params.stop)
    text = seq.output_text[seq.num_streamed_chars:end]
    seq.num_streamed_chars = max(seq.num_streamed_chars, end)
    return text


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that begins some stop string."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


def _find_stop_string(text: str, new_text: str, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """Earliest stop string that ends inside the newest text: (index in text, stop)."""
    best = None
    for stop in stops:
        # Only a match that overlaps the new text can be new.
        start = max(0, len(text) - len(new_text) - len(stop) + 1)
        index = text.find(stop, start)
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop)
    return best
