"""The trained demo adapters in examples/adapters (what ``make demo`` serves), on the real
default model: each beats the base on held-out prompts of its task, and loraplex's greedy
output with one equals PEFT's."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex import LoRARequest, SamplingParams
from loraplex.train.demo_data import TASKS, get_task, make_examples

ADAPTERS = Path(__file__).resolve().parents[2] / "examples" / "adapters"
NUM_HELD_OUT = 8


def test_every_task_has_a_small_shipped_adapter() -> None:
    for task in TASKS:
        weights = ADAPTERS / task / "adapter_model.safetensors"
        assert (ADAPTERS / task / "adapter_config.json").is_file() and weights.is_file()
        assert weights.stat().st_size < 5_000_000


@pytest.mark.parametrize("task", sorted(TASKS))
def test_demo_adapter_beats_the_base_on_held_out_prompts(llm_f32, task: str) -> None:
    examples = make_examples(task, NUM_HELD_OUT, "eval", seed=11)  # prompts never trained on
    prompts = [llm_f32.tokenizer.apply_chat_template(e["messages"][:1]) for e in examples]
    answers = [e["messages"][1]["content"] for e in examples]
    # Room for the whole answer (~30 tokens of JSON, ~8 of a date) and its end token.
    params = SamplingParams(max_tokens={"json-record": 36, "iso-date": 12}[task], temperature=0)
    adapter = LoRARequest(task, str(ADAPTERS / task))
    base_outs = llm_f32.generate(prompts, params)
    tuned_outs = llm_f32.generate(prompts, params, lora=adapter)
    check = get_task(task).is_correct
    base_correct = sum(check(o.text, a) for o, a in zip(base_outs, answers))
    tuned_correct = sum(check(o.text, a) for o, a in zip(tuned_outs, answers))
    print(f"{task}: base {base_correct}/{NUM_HELD_OUT}, adapter {tuned_correct}/{NUM_HELD_OUT}")
    assert tuned_correct >= NUM_HELD_OUT - 2 and tuned_correct > base_correct


def test_demo_adapter_greedy_output_equals_peft(llm_f32, default_model_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    task = "iso-date"
    examples = make_examples(task, 2, "eval", seed=12)
    prompts = [llm_f32.tokenizer.apply_chat_template(e["messages"][:1]) for e in examples]
    outs = llm_f32.generate(prompts, SamplingParams(max_tokens=16, temperature=0),
                            lora=LoRARequest(task, str(ADAPTERS / task)))
    # A fresh base: PeftModel injects its layers into the model it wraps.
    base = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, ADAPTERS / task).eval()
    for prompt, out in zip(prompts, outs):
        generated = peft_model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=16,
                                        do_sample=False)[0, len(prompt):].tolist()
        assert list(out.token_ids) == generated
        assert out.finish_reason == "stop"  # the whole answer, up to the end-of-turn token
