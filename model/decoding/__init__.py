"""The base model and decoding: loading, the architecture adapter, the split forward pass, the sampler."""
