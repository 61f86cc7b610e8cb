"""Domain errors: anything a user can cause (bad path, bad file, bad option).

The CLI prints these as one red line and exits 1; everything else is a bug and keeps its traceback.
"""


class Qwen3MLXError(Exception):
    """Base class for errors caused by the user's input, not by a bug."""


class ModelLoadError(Qwen3MLXError):
    """A model folder, config or weight file cannot be used."""
