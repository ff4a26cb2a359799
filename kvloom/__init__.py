"""kvloom: an LLM inference engine on JAX, embeddable in asyncio, served over HTTP.

The repository keeps its fixed top-level folders (`engine/`, `api/`, `kernels/`,
`tools/`); installed, they are `kvloom.engine`, `kvloom.api`, `kvloom.kernels`
and `kvloom.tools`, so a user's own `engine/` or `tools/` package never shadows
them. This package exports what an embedding program needs:

    from kvloom import Engine, EngineConfig, ResponseFormat, SamplingParams, create_app
"""

import os as _os

_here = _os.path.dirname(_os.path.abspath(__file__))
if not _os.path.isdir(_os.path.join(_here, "engine")):
    # A source checkout: the subpackages sit beside this folder, not inside it.
    __path__.append(_os.path.dirname(_here))  # noqa: F821 - the package's own __path__

from kvloom.engine.config import EngineConfig  # noqa: E402
from kvloom.engine.engine import Engine  # noqa: E402
from kvloom.engine.request import ResponseFormat, SamplingParams  # noqa: E402


def create_app(engine, **options):
    """The OpenAI-compatible aiohttp application for `engine` (see `kvloom.api.server.create_app`)."""
    from kvloom.api.server import create_app as _create_app

    return _create_app(engine, **options)


__all__ = ["Engine", "EngineConfig", "ResponseFormat", "SamplingParams", "create_app"]
