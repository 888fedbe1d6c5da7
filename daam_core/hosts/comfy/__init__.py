"""The ComfyUI host: the tracing session behind its public hook points, and its token replay (pure Python)."""
