"""The HTTP API in process (the app `wise-edit serve` builds from its flags, behind
Starlette's TestClient): edits over HTTP answer like the library, retraction, concurrent
requests, OpenAI shapes (streaming, the openai client), bad input."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import EDITS, tiny_model, tiny_tokenizer
from serving import InProcess, library_answers
from starlette.testclient import TestClient

from wise_edit.serve.app import create_app

UNRELATED = "Please remember to close the door when you leave the room."


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    served = InProcess(model_dir, tmp_path_factory.mktemp("serve") / "state")
    yield served
    served.stop()


def test_served_edits_answer_like_the_library_and_retract(server):
    prompts = [EDITS[0][0], EDITS[1][0], UNRELATED]
    unedited = {p: server.complete(p)["text"] for p in prompts}
    ids = server.edit(*({"prompt": p, "target": t} for p, t in EDITS[:2]))
    for i in ids:
        server.wait_for(i, "applied")
    expected = library_answers(EDITS[:2], prompts)
    for prompt in prompts:
        assert server.complete(prompt)["text"] == expected[prompt], prompt
        assert server.complete(prompt, unedited=True)["text"] == unedited[prompt]
    assert server.complete(EDITS[0][0])["wise_memory"] == 0
    assert server.complete(UNRELATED)["wise_memory"] is None
    assert expected[EDITS[0][0]] != unedited[EDITS[0][0]]  # the edit changed the answer

    response = server.client.delete(f"/v1/edits/{ids[0]}", headers=server.auth)
    assert response.status_code == 202, response.text
    server.wait_for(ids[0], "retracted")
    expected = library_answers(EDITS[:2], prompts, retract=0)
    for prompt in prompts:
        assert server.complete(prompt)["text"] == expected[prompt], prompt
    metrics = server.client.get("/metrics").json()
    assert metrics["edits"]["retracted"] == 1 and metrics["editor"]["live_edits"] == 1
    assert metrics["latency"]["served"] > 0


def test_concurrent_requests_answer_as_sequential_ones(server):
    for i in server.edit(*({"prompt": p, "target": t} for p, t in EDITS[2:4])):
        server.wait_for(i, "applied")
    prompts = [p for p, _ in EDITS] + [UNRELATED]
    sequential = {p: server.complete(p) for p in prompts}
    assert len({c["wise_memory"] for c in sequential.values()}) >= 2  # different routes
    jobs = prompts * 3
    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(server.complete, jobs))
    for prompt, answer in zip(jobs, answers):
        assert answer == sequential[prompt], prompt


def test_chat_streams_what_it_answers_whole(server):
    body = {"messages": [{"role": "user", "content": EDITS[1][0]}], "max_tokens": 8}
    whole = server.client.post("/v1/chat/completions", json=body).json()
    content = whole["choices"][0]["message"]["content"]
    assert whole["object"] == "chat.completion" and "wise_memory" in whole["choices"][0]
    chunks = []
    with server.client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[len("data: ") :])
    assert chunks[-1] == "[DONE]"
    events = [json.loads(c) for c in chunks[:-1]]
    streamed = "".join(e["choices"][0].get("delta", {}).get("content", "") for e in events)
    assert streamed == content
    assert events[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


def test_stop_strings_cut_the_answer(server):
    full = server.complete(UNRELATED)["text"]
    stop = full[2:4]
    assert server.complete(UNRELATED, stop=[stop])["text"] == full[: full.index(stop)]


def test_the_openai_client_works_unchanged(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", http_client=server.client)
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": UNRELATED}], max_tokens=6
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].model_extra["wise_memory"] is None
    text = client.completions.create(model="tiny", prompt=UNRELATED, max_tokens=8, temperature=0)
    assert text.choices[0].text == server.complete(UNRELATED)["text"]


BAD = [
    ("POST", "/v1/edits", b"{not json", None, 400, "body"),
    ("POST", "/v1/edits", {"target": "x"}, None, 400, "prompt"),
    ("POST", "/v1/edits", {"prompt": "  ", "target": "x"}, None, 400, "prompt"),
    ("POST", "/v1/edits", {"prompt": "x" * 5000, "target": "x"}, None, 400, "prompt"),
    ("POST", "/v1/edits", [{"prompt": "a", "target": "b"}, {"prompt": "a"}], None, 400,
     "[1].target"),
    ("POST", "/v1/edits", {"prompt": "a", "target": "b", "extra": 1}, None, 400, "extra"),
    ("POST", "/v1/edits", [], None, 400, "body"),
    ("POST", "/v1/edits", b"x" * 300_000, None, 413, "body"),
    ("POST", "/v1/edits", {"prompt": "a", "target": "b"}, {"Authorization": "Bearer no"}, 401,
     "Authorization"),
    ("POST", "/v1/edits", {"prompt": "a", "target": "b"}, {"Authorization": ""}, 401,
     "Authorization"),
    ("DELETE", "/v1/edits/1", None, {"Authorization": "Bearer no"}, 401, "Authorization"),
    ("GET", "/v1/edits/999", None, None, 404, "id"),
    ("DELETE", "/v1/edits/999", None, None, 404, "id"),
    ("GET", "/v1/edits?limit=0", None, None, 400, "limit"),
    ("POST", "/v1/completions", {"prompt": ""}, None, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": "a", "max_tokens": 0}, None, 400, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "a", "temperature": "hot"}, None, 400, "temperature"),
    ("POST", "/v1/completions", {"prompt": "a", "stop": [1]}, None, 400, "stop"),
    ("POST", "/v1/completions", {"prompt": "a", "stream": "yes"}, None, 400, "stream"),
    ("POST", "/v1/chat/completions", {"messages": []}, None, 400, "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "x", "content": "a"}]}, None, 400,
     "messages[0].role"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user"}]}, None, 400,
     "messages[0].content"),
    # what the interpreter, the tokenizer, SQLite or torch would turn into a 500
    ("POST", "/v1/completions", b'{"prompt": "a\\ud800"}', None, 400, "prompt"),
    ("POST", "/v1/edits", b'{"prompt": "a", "target": "\\udc00b"}', None, 400, "target"),
    ("POST", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "\\ud83d"}]}', None, 400,
     "messages[0].content"),
    ("POST", "/v1/completions", b'{"prompt": "a", "model": "\\ud800"}', None, 400, "model"),
    ("POST", "/v1/completions", b"[" * 100_000 + b"]" * 100_000, None, 400, "body"),
    ("POST", "/v1/edits", b'{"prompt": "a", "target": "b", "x": ' + b"[" * 100 + b"]" * 100
     + b"}", None, 400, "body"),
    ("POST", "/v1/completions", b'{"prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}", None,
     400, "body"),
    ("POST", "/v1/completions", {"prompt": "a", "temperature": 1e-300}, None, 400,
     "temperature"),
    ("POST", "/v1/completions", b'{"prompt": "a", "temperature": ' + b"9" * 400 + b"}", None,
     400, "temperature"),
    ("GET", "/v1/edits/\u00b2", None, None, 404, "id"),
    ("DELETE", "/v1/edits/\u00b2", None, None, 404, "id"),
    ("GET", "/v1/edits/" + "9" * 30, None, None, 404, "id"),
    ("DELETE", "/v1/edits/" + "9" * 30, None, None, 404, "id"),
    ("GET", "/v1/edits?after=" + "9" * 30, None, None, 400, "after"),
    ("GET", "/v1/edits?after=\u00b2", None, None, 400, "after"),
    ("GET", "/v1/edits?limit=" + "9" * 5000, None, None, 400, "limit"),
]  # fmt: skip


def test_bad_input_is_a_4xx_naming_the_field_and_changes_nothing(server):
    before = (server.client.get("/v1/edits").json(), server.client.get("/metrics").json()["edits"])
    for method, path, body, headers, status, param in BAD:
        headers = server.auth if headers is None else headers
        content = body if isinstance(body, bytes) else None
        payload = None if isinstance(body, bytes) or body is None else body
        r = server.client.request(method, path, content=content, json=payload, headers=headers)
        assert r.status_code == status, (method, path, body, r.text)
        assert r.json()["error"]["param"] == param, (method, path, body, r.text)
    after = (server.client.get("/v1/edits").json(), server.client.get("/metrics").json()["edits"])
    assert after == before


def test_a_retraction_of_a_memory_s_only_edit_leaves_completions_working(model_dir, tmp_path):
    served = InProcess(model_dir, tmp_path / "state")
    try:
        (edit_id,) = served.edit({"prompt": EDITS[0][0], "target": EDITS[0][1]})
        served.wait_for(edit_id, "applied")
        response = served.client.delete(f"/v1/edits/{edit_id}", headers=served.auth)
        assert response.status_code == 202, response.text
        served.wait_for(edit_id, "retracted")
        answer = served.complete(EDITS[0][0])["text"]  # IndexError in the router before
        assert answer == served.complete(EDITS[0][0], unedited=True)["text"]
    finally:
        served.stop()


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny GPT-2: a hard context (its position table has 256 rows)."""
    folder = tmp_path_factory.mktemp("gpt2")
    tiny_model("gpt2").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def test_a_question_beyond_the_context_is_a_400_naming_the_field(gpt2_dir, tmp_path):
    served = InProcess(gpt2_dir, tmp_path / "state")
    try:
        asks = [
            ({"prompt": UNRELATED, "max_tokens": 256}, "max_tokens"),
            ({"prompt": UNRELATED * 50, "max_tokens": 1}, "prompt"),
        ]
        for body, param in asks:
            for stream in (False, True):
                response = served.client.post("/v1/completions", json={**body, "stream": stream})
                assert response.status_code == 400, (body, stream, response.text)
                assert response.json()["error"]["param"] == param
        assert served.complete(UNRELATED, max_tokens=16)["finish_reason"] == "length"
    finally:
        served.stop()


@pytest.fixture(scope="module")
def open_app(server):
    """The same service served without a token, as on 127.0.0.1:8000."""
    client = TestClient(create_app(server.service, "tiny"), base_url="http://127.0.0.1:8000")
    with client:
        yield client


EDIT = {"prompt": "Who is the mayor of Zorb?", "target": "Mallory"}
OWN = "http://127.0.0.1:8000"
HOSTILE = [
    ({"Content-Type": "text/plain"}, 415, "Content-Type"),
    ({"Content-Type": "application/x-www-form-urlencoded"}, 415, "Content-Type"),
    ({"Content-Type": "application/json", "Origin": "http://evil.example"}, 403, "Origin"),
    ({"Content-Type": "application/json", "Origin": "null"}, 403, "Origin"),
    ({"Content-Type": "application/json", "Origin": "http://127.0.0.1:9999"}, 403, "Origin"),
    ({"Content-Type": "application/json", "Host": "evil.example:8000"}, 400, None),
    ({"Content-Type": "application/json", "Host": "evil.example"}, 400, None),
]


def test_without_a_token_cross_origin_writes_are_refused(open_app):
    before = open_app.get("/v1/edits").json()
    for headers, status, param in HOSTILE:
        response = open_app.post("/v1/edits", content=json.dumps(EDIT), headers=headers)
        assert response.status_code == status, (headers, response.text)
        if param is not None:
            assert response.json()["error"]["param"] == param
    response = open_app.delete("/v1/edits/1", headers={"Origin": "http://evil.example"})
    assert response.status_code == 403
    assert open_app.get("/v1/edits", headers={"Host": "evil.example"}).status_code == 400
    assert open_app.get("/v1/edits").json() == before  # nothing was written
    for host in ("localhost:8000", "[::1]:8000", "127.0.0.1"):
        assert open_app.get("/health", headers={"Host": host}).status_code == 200, host
    same = {"Content-Type": "application/json; charset=utf-8", "Origin": OWN}
    body = {"prompt": UNRELATED, "max_tokens": 2}
    assert open_app.post("/v1/completions", json=body, headers=same).status_code == 200
