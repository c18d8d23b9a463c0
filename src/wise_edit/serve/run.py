"""Starting a server: the settings of `wise-edit serve`, checked before the model loads,
then the state folder (checked, locked, a crashed swap put right, the log opened), model,
editor (new or from the checkpoint), service and uvicorn."""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from .. import models
from ..core.editor import EditorBase
from ..core.persistence import SaveFolder, save_layout, saved_config
from ..methods import (
    SERVE_BATCH,
    editor_class,
    load_editor,
    make_config,
    settings_that_differ,
)
from .app import create_app
from .log import EditLog
from .schema import Limits
from .service import CHECKPOINT_DIR, LOG_FILE, EditService, check_state_dir

logger = logging.getLogger(__name__)

TOKEN_ENV = "WISE_EDIT_TOKEN"


@dataclass(frozen=True)
class ServeSettings:
    """What `wise-edit serve` was asked for."""

    model: str
    state_dir: Path
    method: str | None = None  # None: the checkpoint's, else wise
    device: str = "auto"
    overrides: dict[str, Any] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    checkpoint_every: int = 10
    batch: int = SERVE_BATCH
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint-every must be >= 1, got {self.checkpoint_every}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.token is not None and not self.token.strip():
            raise ValueError("token must not be empty")
        if self.token is None and not is_loopback(self.host):
            raise ValueError(
                f"refusing to serve on {self.host} without a token: edits could be written "
                f"by anyone who can reach it; give --token or ${TOKEN_ENV}"
            )
        editor_class(self.method or "wise")  # an unknown method fails before the model loads


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
    and config win; a flag that differs from them is refused, as `edit --resume` refuses
    it), else a new one from the flags.

    Before anything is read the folder is checked (`check_state_dir`), locked, and a
    checkpoint swap a crash interrupted is put right: loading first would miss a
    checkpoint left under ``.checkpoint.old-*`` and the first new checkpoint would
    overwrite it. Everything a user can get wrong is refused before the model loads."""
    state = settings.state_dir
    check_state_dir(state)
    folder = SaveFolder(state / CHECKPOINT_DIR).__enter__()  # lock, then `recover`
    log: EditLog | None = None
    try:
        cls, overrides = _editor_settings(settings, folder.path)
        log = EditLog(state / LOG_FILE)
        model, tokenizer = models.load(settings.model, device=settings.device)
        editor: EditorBase
        if save_layout(folder.path) is not None:
            editor = load_editor(model, tokenizer, folder.path)
            logger.info(
                "resuming %s with %d edits from %s", editor.method, editor.num_edits, folder.path
            )
        else:
            editor = cls(model, tokenizer, make_config(cls, model, overrides))
        return EditService(
            state, editor, settings.checkpoint_every, folder=folder, log=log, batch=settings.batch
        )
    except BaseException:
        if log is not None:
            log.close()
        folder.__exit__(None, None, None)
        raise


def _editor_settings(
    settings: ServeSettings, checkpoint: Path
) -> tuple[type[EditorBase], dict[str, Any]]:
    """The method and config overrides to serve with. Over an existing checkpoint the
    method and config are the checkpoint's, and a flag that differs from them is an
    error (serving with the checkpoint's silently would run edits the user did not ask
    for, e.g. 70 steps after ``--set max_steps=5``)."""
    if save_layout(checkpoint) is None:
        return editor_class(settings.method or "wise"), dict(settings.overrides)
    method, saved = saved_config(checkpoint)
    cls = editor_class(method)
    if settings.method is not None and editor_class(settings.method) is not cls:
        raise ValueError(f"--method {settings.method}: {checkpoint} holds {method} edits")
    differ = settings_that_differ(cls, saved, settings.overrides)
    if differ:
        raise ValueError(
            f"settings that differ from the checkpoint in {checkpoint}: {'; '.join(differ)} "
            "(drop them, or serve from a new --state)"
        )
    return cls, dict(settings.overrides)


class _Stopped(Exception):
    """SIGTERM or SIGINT arrived: stop serving with a last checkpoint."""


def _stop_on_signal(signum: int, frame: FrameType | None) -> None:
    raise _Stopped(signal.Signals(signum).name)


@contextmanager
def _stopping_signals() -> Iterator[None]:
    """SIGTERM (docker stop, systemd, Kubernetes) ends the server as SIGINT does, with
    the service's last checkpoint: uvicorn, after its graceful shutdown, restores the
    handlers it found and raises the signal again, which with Python's default SIGTERM
    handler would kill the process before `EditService.stop` runs."""
    previous = {sig: signal.signal(sig, _stop_on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except _Stopped as stopped:
        logger.info("stopping on %s", stopped)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(settings: ServeSettings) -> None:
    """Run until interrupted (SIGINT or SIGTERM); the service (worker, lock, checkpoint)
    stops with it."""
    import uvicorn

    service = build_service(settings)
    service.start()
    try:
        app = create_app(
            service, settings.model, settings.token, settings.limits, host=settings.host
        )
        print(f"wise-edit serve: http://{settings.host}:{settings.port}/ ", flush=True)
        with _stopping_signals():
            uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
    finally:
        service.stop()
