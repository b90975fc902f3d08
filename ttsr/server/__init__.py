"""A local web page and HTTP API for x4 reference-based super-resolution (``ttsr-serve``)."""

from ttsr.server.app import ServerSettings, create_app

__all__ = ["ServerSettings", "create_app"]
