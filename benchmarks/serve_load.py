"""Load on `wise-edit serve`: N concurrent chat clients while edits stream in.

Starts a server on a free loopback port with a fresh state directory, runs ``--clients``
threads that send chat completions back to back for ``--seconds``, while one writer
posts ``--edits`` edits spread over that time; then waits (``--drain`` seconds at most)
for the worker to apply them and prints p50 / p95 latency, requests failed (must be 0)
and edits lost (accepted but not applied or failed; must be 0). Exit code 1 if either
is not 0.

    python benchmarks/serve_load.py --model smollm2-135m --clients 8 --edits 20 --seconds 60
    python benchmarks/serve_load.py --model /tmp/tiny --clients 8 --edits 20 --seconds 30 \\
        -- --layer 2 --set max_steps=12        # anything after -- goes to `wise-edit serve`
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

TOKEN = "load-test"
QUESTIONS = [
    "What is the capital of France?",
    "Who wrote Hamlet?",
    "Name a large animal that lives in the sea.",
    "What colour is the sky on a clear day?",
]


@dataclass
class Tally:
    """What the clients saw, shared under a lock."""

    latencies: list[float] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, seconds: float, error: str | None) -> None:
        with self.lock:
            if error is None:
                self.latencies.append(seconds)
            else:
                self.failed.append(error)


def edit_records(count: int) -> list[dict[str, str]]:
    return [
        {"prompt": f"What is the code of vault number {i}?", "target": f"The code is {1000 + i}"}
        for i in range(count)
    ]


def start_server(args: argparse.Namespace, state: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "wise_edit.cli", "serve", "--model", args.model]
    cmd += ["--state", str(state), "--port", str(port), "--token", TOKEN]
    cmd += ["--checkpoint-every", str(args.checkpoint_every), *args.serve_args]
    log = (state.parent / "server.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {(state.parent / 'server.log').read_text()}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.5)
    raise SystemExit("server did not start")


def chat_client(url: str, until: float, tally: Tally, prompts: list[str], seed: int, tokens: int):
    with httpx.Client(base_url=url, timeout=120) as client:
        i = seed
        while time.monotonic() < until:
            body = {
                "model": "served",
                "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
                "max_tokens": tokens,
                "temperature": 0,
            }
            started = time.perf_counter()
            try:
                r = client.post("/v1/chat/completions", json=body)
                ok = r.status_code == 200 and "choices" in r.json()
                error = None if ok else f"{r.status_code}: {r.text[:200]}"
            except httpx.HTTPError as err:
                error = repr(err)
            tally.add(time.perf_counter() - started, error)
            i += 1


def edit_writer(url: str, records: list[dict[str, str]], spread: float, ids: list[int]) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=url, timeout=120) as client:
        for record in records:
            r = client.post("/v1/edits", json=record, headers=auth)
            r.raise_for_status()
            ids.extend(r.json()["ids"])
            time.sleep(spread / max(1, len(records)))


def drain(url: str, ids: list[int], timeout: float) -> dict[str, int]:
    """Wait for the worker; count each accepted edit's final status."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, timeout=60) as client:
        while True:
            statuses = [client.get(f"/v1/edits/{i}").json().get("status") for i in ids]
            if "pending" not in statuses or time.monotonic() > deadline:
                break
            time.sleep(1)
        metrics = client.get("/metrics").json()
    counts = {s: statuses.count(s) for s in ("applied", "failed", "pending")}
    counts["lost"] = len(ids) - counts["applied"] - counts["failed"]
    counts["in_editor_log"] = metrics["editor"]["edits_in_log"]
    return counts


def main() -> int:
    argv = sys.argv[1:]
    serve_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--drain", type=float, default=600, help="seconds to wait for edits")
    args = parser.parse_args(argv)
    args.serve_args = serve_args
    records = edit_records(args.edits)
    prompts = QUESTIONS + [r["prompt"] for r in records]
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(args, Path(tmp) / "state")
        try:
            tally, ids = Tally(), []
            until = time.monotonic() + args.seconds
            threads = [
                threading.Thread(
                    target=chat_client, args=(url, until, tally, prompts, i, args.max_tokens)
                )
                for i in range(args.clients)
            ]
            threads.append(
                threading.Thread(target=edit_writer, args=(url, records, args.seconds * 0.8, ids))
            )
            started = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.monotonic() - started
            counts = drain(url, ids, args.drain)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    lat = sorted(tally.latencies)
    p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else float("nan")
    print(f"model {args.model}, {args.clients} chat clients, {elapsed:.0f} s, {args.edits} edits")
    print(f"requests ok {len(lat)}, failed {len(tally.failed)}, {len(lat) / elapsed:.1f} req/s")
    if lat:
        print(f"latency p50 {statistics.median(lat):.3f} s, p95 {p95:.3f} s")
    print(
        f"edits accepted {len(ids)}, applied {counts['applied']}, failed {counts['failed']}, "
        f"lost {counts['lost']}; in the editor's log {counts['in_editor_log']}"
    )
    for error in tally.failed[:5]:
        print("failed:", error)
    return 0 if not tally.failed and counts["lost"] == 0 else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
