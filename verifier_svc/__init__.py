"""The verifier: target model, paged KV cache, continuous-batching engine, Generation service."""
