"""`wise-edit serve`: an edited model served over HTTP (OpenAI-shaped completions) while
edits stream in, with a durable SQLite edit log, checkpoints, retraction and a
dashboard. Needs the ``serve`` extra (starlette, uvicorn)."""

from .app import create_app
from .schema import Limits
from .service import EditService, Question

__all__ = ["EditService", "Limits", "Question", "create_app"]
