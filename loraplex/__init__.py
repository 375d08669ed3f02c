"""loraplex: one base model, many LoRA adapters, base-model speed."""
from loraplex.config import SpecConfig
from loraplex.engine.sequence import RequestOutput
from loraplex.llm import LLM
from loraplex.lora.request import LoRARequest
from loraplex.sampling import SamplingParams

__all__ = ["LLM", "LoRARequest", "RequestOutput", "SamplingParams", "SpecConfig"]
__version__ = "0.1.0"
