"""Training checkpoints: one file, written atomically, resumed only by the same run.

``checkpoint.pt`` in the output folder holds the LoRA weights, the optimizer state, the
step reached, the eval history and a fingerprint of the run (the flags that shape it and
the hashes of the data files). It is written to a temp file and renamed over the old one,
so an interrupt (Ctrl-C, a kill) at any moment leaves the previous checkpoint whole.
It is loaded with ``weights_only=True``: tensors and plain values, nothing unpickled
that could run code.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from loraplex.train.files import atomic_write

CHECKPOINT_FILE = "checkpoint.pt"
_FORMAT = 1


def save_checkpoint(out: Path, step: int, fingerprint: dict[str, Any],
                    lora_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                    history: list[dict[str, Any]]) -> None:
    state = {"format": _FORMAT, "step": step, "fingerprint": fingerprint,
             "lora_state": lora_state, "optimizer_state": optimizer_state, "history": history}
    atomic_write(out / CHECKPOINT_FILE, lambda tmp: torch.save(state, tmp))


def load_checkpoint(out: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint in ``out`` if there is one; ValueError if it belongs to another run."""
    path = out / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a file this code did not write (renames are atomic)
        raise ValueError(f"out: {str(path)!r} is not a readable checkpoint ({e}); delete it "
                         f"to start over") from e
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise ValueError(f"out: {str(path)!r} is not a loraplex checkpoint (format "
                         f"{state.get('format') if isinstance(state, dict) else None!r})")
    saved = state["fingerprint"]
    for key in sorted(set(saved) | set(fingerprint)):
        if saved.get(key) != fingerprint.get(key):
            raise ValueError(f"out: {str(out)!r} holds a checkpoint of another run ({key}: "
                             f"{saved.get(key)!r} there, {fingerprint.get(key)!r} now); run "
                             f"with the same flags and data to resume it, or choose another --out")
    return state
