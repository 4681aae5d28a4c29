"""ExPO on PEFT LoRA adapters: an extrapolated adapter instead of a full model (docs/lora.md)."""
