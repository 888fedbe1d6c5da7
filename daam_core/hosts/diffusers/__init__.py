"""The diffusers host: ``trace(pipe)``, long/weighted prompt encoding, tiny test pipelines."""
