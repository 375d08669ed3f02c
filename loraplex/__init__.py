"""loraplex: one base model, many LoRA adapters, base-model speed."""
from loraplex.engine.sequence import RequestOutput
from loraplex.llm import LLM
from loraplex.sampling import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
