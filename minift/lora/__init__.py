"""LoRA / DoRA layers, their config and name matching, base-layer weights, and PEFT-format adapter files."""
