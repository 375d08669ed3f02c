"""What a request says about its adapter."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """Serve a request with the PEFT adapter in ``path``; ``name`` is only a label
    (the adapter's identity for every cache is the hash of its content)."""

    name: str
    path: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"lora.name: expected a non-empty string, got {self.name!r}")
        object.__setattr__(self, "path", str(self.path))
