"""LoRA fine-tuning (``loraplex finetune``) and the generated demo tasks (``loraplex demo-data``)."""
