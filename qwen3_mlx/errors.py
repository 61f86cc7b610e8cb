"""Domain errors: anything a user can cause (bad path, bad file, bad option).

The CLI prints these as one red line and exits 1; everything else is a bug and keeps its traceback.
"""


class Qwen3MLXError(Exception):
    """Base class for errors caused by the user's input, not by a bug."""


class ModelLoadError(Qwen3MLXError):
    """A model folder, config or weight file cannot be used."""


def read_json(path) -> object:
    """A user's JSON file (a saved chat, an MCP configuration); unreadable or not JSON is one domain error."""
    import json
    from pathlib import Path

    try:
        return json.loads(Path(path).expanduser().read_text())
    except OSError as e:
        raise Qwen3MLXError(f"cannot read {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise Qwen3MLXError(f"{path} is not JSON: {e}") from None
