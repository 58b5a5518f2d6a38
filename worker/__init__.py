"""llm-worker-rbee: one llama.cpp model behind HTTP + SSE (DESIGN.md §4)."""
