"""backburner: the slow lane for LLM inference."""

__version__ = "0.1.0"
