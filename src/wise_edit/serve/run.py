"""Starting a server: the settings of `wise-edit serve`, checked before the model loads,
then model, editor (new or from the checkpoint), service and uvicorn."""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import models
from ..methods import editor_class, load_editor, make_config
from .app import create_app
from .schema import Limits
from .service import EditService

logger = logging.getLogger(__name__)

TOKEN_ENV = "WISE_EDIT_TOKEN"


@dataclass(frozen=True)
class ServeSettings:
    """What `wise-edit serve` was asked for."""

    model: str
    state_dir: Path
    method: str = "wise"
    device: str = "auto"
    overrides: dict[str, Any] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    checkpoint_every: int = 10
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint-every must be >= 1, got {self.checkpoint_every}")
        if self.token is not None and not self.token.strip():
            raise ValueError("token must not be empty")
        if self.token is None and not is_loopback(self.host):
            raise ValueError(
                f"refusing to serve on {self.host} without a token: edits could be written "
                f"by anyone who can reach it; give --token or ${TOKEN_ENV}"
            )
        editor_class(self.method)  # an unknown method fails here, before the model loads


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def token_from(flag: str | None) -> str | None:
    """``--token``, else the environment variable, else none."""
    return flag if flag is not None else os.environ.get(TOKEN_ENV) or None


def build_service(settings: ServeSettings) -> EditService:
    """The editor from the state directory's checkpoint when there is one (its method
    and config win over the flags), else a new one from the flags."""
    model, tokenizer = models.load(settings.model, device=settings.device)
    checkpoint = EditService.checkpoint_path(settings.state_dir)
    if checkpoint is not None:
        editor = load_editor(model, tokenizer, checkpoint)
        logger.info(
            "resuming %s with %d edits from %s", editor.method, editor.num_edits, checkpoint
        )
    else:
        cls = editor_class(settings.method)
        editor = cls(model, tokenizer, make_config(cls, model, settings.overrides))
    return EditService(settings.state_dir, editor, settings.checkpoint_every)


def serve(settings: ServeSettings) -> None:
    """Run until interrupted; the service (worker, lock, checkpoint) stops with it."""
    import uvicorn

    service = build_service(settings)
    service.start()
    try:
        app = create_app(service, settings.model, settings.token, settings.limits)
        print(f"wise-edit serve: http://{settings.host}:{settings.port}/ ", flush=True)
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
    finally:
        service.stop()
