"""qwen3-mlx: run Qwen3 models locally on MLX."""

from .errors import ModelLoadError, Qwen3MLXError
from .generate import generate, stream_generate
from .loader import load, load_model
from .retrieval import embed, rerank

__version__ = "0.1.0"

__all__ = ["ModelLoadError", "Qwen3MLXError", "embed", "generate", "load", "load_model", "rerank", "stream_generate",
           "__version__"]
