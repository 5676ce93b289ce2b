"""The OpenAI-compatible HTTP server (``camelid serve``): FastAPI app, schemas, routes, metrics.

Imported only by the serve command and its tests, so the core runs without FastAPI.
"""

from camelid.serve.app import create_app
from camelid.serve.routes import Limits

__all__ = ["Limits", "create_app"]
