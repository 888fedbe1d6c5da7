"""The diffusers host: ``trace(pipe)`` (:mod:`.tracing`), UNet (:mod:`.adapter`) and joint-attention
(:mod:`.joint`) adapters, long/weighted prompt encoding (:mod:`.prompt`), local tokenizer files
(:mod:`.tokenizers`)."""
