"""The app `wise-edit serve` runs, for the serve tests: in this process behind Starlette's
`TestClient` (`InProcess`, most tests), on uvicorn in a thread (`Threaded`, for a
browser), or as a real `wise-edit serve` process on a free loopback port (`Server`, for
starting as a user does and for kill -9)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest import mock

import httpx
import uvicorn
from conftest import tiny_model, tiny_tokenizer
from starlette.testclient import TestClient

from wise_edit import WiseEditor
from wise_edit.cli import build_parser, main, parse_overrides
from wise_edit.methods import make_config
from wise_edit.serve.app import create_app
from wise_edit.serve.run import ServeSettings, build_service

SRC = str(Path(__file__).resolve().parents[1] / "src")
TOKEN = "test-token"
# a WISE config that edits the tiny test model in a fraction of a second
FAST = [
    "--layer", "2", "--mode", "retrieve", "--set", "max_steps=12", "--set", "prefix_count=2",
    "--set", "prefix_lengths=[3]", "--set", "mask_ratio=1.0", "--set", "shard_size=2",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env() -> dict[str, str]:
    """The test's environment, with this tree first on the path (CI installs it too)."""
    out = dict(os.environ, OMP_NUM_THREADS="1")
    out["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p)
    return out


def flags(model: str, state: Path, port: int, checkpoint_every: int, *extra: str) -> list[str]:
    """The `wise-edit serve` arguments every serve test starts with."""
    args = ["--model", model, "--state", str(state), "--port", str(port)]
    return [*args, "--token", TOKEN, "--checkpoint-every", str(checkpoint_every), *FAST, *extra]


def settings(model: str, state: Path, *extra: str, checkpoint_every: int = 2) -> ServeSettings:
    """What `wise-edit serve` makes of `flags` (through the CLI itself), without serving."""
    given: list[ServeSettings] = []
    with mock.patch("wise_edit.serve.run.serve", given.append):
        assert main(["serve", *flags(model, state, 0, checkpoint_every, *extra)]) == 0
    return given[0]


class Client:
    """Requests the serve tests make: `edit`, `wait_for`, `complete`; ``client`` is an
    `httpx.Client` on the app (its base URL is ``url``), ``auth`` the write header."""

    url: str
    client: httpx.Client
    auth = {"Authorization": f"Bearer {TOKEN}"}

    def edit(self, *records: dict[str, str]) -> list[int]:
        body = records[0] if len(records) == 1 else list(records)
        response = self.client.post("/v1/edits", json=body, headers=self.auth)
        assert response.status_code == 202, response.text
        return response.json()["ids"]

    def wait_for(self, edit_id: int, status: str, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            edit = self.client.get(f"/v1/edits/{edit_id}").json()
            if edit["status"] == status and not (status == "applied" and edit["retract_requested"]):
                return edit
            time.sleep(0.1)
        raise AssertionError(f"edit {edit_id} never became {status}: {edit}")

    def complete(self, prompt: str, **extra: object) -> dict:
        body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, **extra}
        response = self.client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]


class InProcess(Client):
    """The app `wise-edit serve` would run with `flags`, built in this process (model,
    editor, service, app) and driven by Starlette's `TestClient`: no socket, no process."""

    def __init__(self, model: str, state: Path, *extra: str, checkpoint_every: int = 2) -> None:
        given = settings(model, state, *extra, checkpoint_every=checkpoint_every)
        self.service = build_service(given)
        self.service.start()
        app = create_app(self.service, given.model, given.token, given.limits)
        self.url = "http://testserver"
        self.client = TestClient(app, base_url=self.url)
        self.client.__enter__()  # one event loop for every request, from any thread

    def stop(self) -> None:
        self.client.__exit__(None, None, None)
        self.service.stop()


class Threaded(Client):
    """The same app on uvicorn in a thread of this process, on a free loopback port: a
    real HTTP server for a browser, without a process of its own."""

    def __init__(self, model: str, state: Path, *extra: str, checkpoint_every: int = 2) -> None:
        given = settings(model, state, *extra, checkpoint_every=checkpoint_every)
        self.service = build_service(given)
        self.service.start()
        app = create_app(self.service, given.model, given.token, given.limits)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def stop(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.service.stop()


class Server(Client):
    """``python -m wise_edit.cli serve`` (or ``launcher``, a command taking the same
    arguments) on a free port; `url`, `client`, `kill`, `stop`."""

    def __init__(
        self,
        model: str,
        state: Path,
        *extra: str,
        checkpoint_every: int = 2,
        launcher: list[str] | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = flags(model, state, self.port, checkpoint_every, *extra)
        head = launcher or [sys.executable, "-m", "wise_edit.cli"]
        self.log = state.parent / f"server-{self.port}.log"
        self.proc = subprocess.Popen(
            [*head, "serve", *args],
            env={**env(), **(extra_env or {})},
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
        )
        self.client = httpx.Client(base_url=self.url, timeout=60)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()}")
            try:
                if self.client.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready: {self.log.read_text()}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.client.close()

    def stop(self) -> int:
        """Interrupt the server as Ctrl-C does; its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.client.close()
        return self.proc.returncode


def library_answers(
    edits, prompts, retract: int | None = None, max_tokens: int = 8
) -> dict[str, str]:
    """What the library answers after ``edits`` (and retracting one), with the server's
    flags."""
    model, tokenizer = tiny_model(), tiny_tokenizer()
    args = build_parser().parse_args(["serve", "--state", "x", *FAST])
    editor = WiseEditor(
        model, tokenizer, make_config(WiseEditor, model, parse_overrides(args, WiseEditor))
    )
    editor.edit_many(edits)
    if retract is not None:
        editor.retract(retract)
    out = {}
    for prompt in prompts:
        batch = tokenizer([prompt], return_tensors="pt")
        ids = editor.generate(**batch, max_new_tokens=max_tokens, do_sample=False)
        out[prompt] = tokenizer.decode(
            ids[0, batch["input_ids"].shape[1] :], skip_special_tokens=True
        )
    return out
