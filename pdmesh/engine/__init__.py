"""The inference engine: paged KV cache, continuous batching, sampling (token ids in and out)."""
