"""The text side: prompt syntax, token layouts, word queries and chunking rules (no tokenizer is loaded here)."""
