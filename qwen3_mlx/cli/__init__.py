"""`qwen3-mlx` command line: thin typer commands over the library."""

from __future__ import annotations

import os

from ..errors import Qwen3MLXError
from .app import app, fail

# Each module registers its commands on `app` when imported.
# (command modules are imported below)
from . import bench  # noqa: E402,F401
from . import quantize  # noqa: E402,F401
from . import fit  # noqa: E402,F401
from . import generate  # noqa: E402,F401
from . import chat  # noqa: E402,F401
from . import serve  # noqa: E402,F401
from . import cache_prompt  # noqa: E402,F401
from . import retrieval  # noqa: E402,F401


def main() -> None:
    try:
        app()
    except Qwen3MLXError as e:
        fail(str(e))
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except RuntimeError as e:  # a rank of a distributed run gone mid-way
        from ..distributed.group import lost

        domain = lost(e, os.environ.get("MLX_RANK", 0))
        if domain is None:
            raise
        fail(str(domain))


__all__ = ["app", "main"]
