"""The project's small "shapes" model: synthetic scenes with exact masks, architecture, loading, shipped weights."""
