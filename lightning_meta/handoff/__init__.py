"""The hand-off: `export` (a Hugging Face folder with provenance from a meta-training checkpoint)
and `pretrain` (`CausalLMPretraining`, ordinary causal-LM training from an export or checkpoint)."""
