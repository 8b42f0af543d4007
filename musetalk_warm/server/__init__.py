"""The warm HTTP server: ``uvicorn musetalk_warm.server:app`` or ``musetalk-warm serve``.

``app`` is built on first access from :func:`~musetalk_warm.config.load_settings`
(YAML < env), so importing this package loads nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .app import create_app

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["app", "create_app", "serve"]


def serve(settings: Settings) -> None:
    """Run the server with uvicorn on ``settings.server.host``/``port`` until interrupted."""
    import uvicorn

    uvicorn.run(create_app(settings), host=settings.server.host, port=settings.server.port, log_level="info")


def __getattr__(name: str) -> Any:
    if name == "app":
        from ..config import load_settings

        globals()["app"] = application = create_app(load_settings())
        return application
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
