"""Model adapters: how a model becomes a loss over a dict of fast weights. `Learner` (the
contract, fast-weight selection, data checks), regression/classification heads, `CausalLMLearner`
for Hugging Face causal LMs (LoRA via peft) and `EncoderLearner` for encoders. Builds on `data`."""
