"""``mergekit-expo demo`` and the tiny but real checkpoints it builds (also used by the tests,
examples and benchmarks): a real tokenizer, a small Llama, safetensors, nothing from a hub."""
