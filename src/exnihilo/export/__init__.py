"""Export a trained model to formats other runtimes read (GGUF for llama.cpp, Ollama, LM Studio)."""

from exnihilo.export.gguf import QTYPES, ExportResult, export_gguf

__all__ = ["QTYPES", "ExportResult", "export_gguf"]
