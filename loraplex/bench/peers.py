"""The peer a user would otherwise run: transformers + PEFT (``PeftModel``, unmerged), timed
on the same prompts and lengths as the engine. Imported only when ``explain`` measures it."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any


class PeftPeer:
    """The base model in transformers with the user's adapter attached by PEFT, unmerged."""

    def __init__(self, model_path: Path, adapter_path: Path, dtype: Any) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
        # Adapter weights in the base's dtype, as the engine computes them.
        self.model = PeftModel.from_pretrained(base, str(adapter_path),
                                               autocast_adapter_dtype=False).eval()
        self.model.to(dtype)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id

    def generate(self, prompts: list[str], max_tokens: int) -> dict[str, float]:
        """One batched greedy ``generate`` of exactly ``max_tokens`` tokens per prompt
        (left-padded). Same keys as ``measure.run_batch``."""
        import torch
        from transformers.generation.streamers import BaseStreamer

        class StepTimes(BaseStreamer):  # generate() puts the prompt first, then one put per step
            def __init__(self) -> None:
                self.times: list[float] = []
                self.seen_prompt = False

            def put(self, value: Any) -> None:
                if self.seen_prompt:
                    self.times.append(time.perf_counter())
                self.seen_prompt = True

            def end(self) -> None:
                pass

        ids = [self.tokenizer.encode(p) for p in prompts]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, x in enumerate(ids):
            input_ids[row, width - len(x):] = torch.tensor(x)
            mask[row, width - len(x):] = 1
        timer = StepTimes()
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                      max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                      pad_token_id=self.pad_id, streamer=timer)
        end = time.perf_counter()
        if out.shape[1] - width != max_tokens:
            raise RuntimeError(f"peer: generated {out.shape[1] - width} tokens, expected {max_tokens}")
        # TTFT: start -> first step, the same for every row of the batch.
        ttft = timer.times[0] - start
        tpot = (timer.times[-1] - timer.times[0]) / (max_tokens - 1) if max_tokens > 1 else float("nan")
        return {"tok_s": len(prompts) * max_tokens / (end - start), "ttft_s": ttft,
                "tpot_s": tpot, "e2el_s": end - start, "wall_s": end - start}
