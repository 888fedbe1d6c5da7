"""Host adapters: each host's hook into sampling and its token layouts, over the engine."""
