"""A fuzz test of the HTTP API: requests drawn from (and around) the schema of every
route, JSON and raw bytes, get no 5xx but the documented 503/507, and every error is in
the OpenAI shape. Bounded: a few hundred requests on a server whose limits keep each
cheap (3 edits a request, 4 tokens an answer)."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving import InProcess

# no example database: nothing written into the checkout, the same run everywhere
RUNS = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
ODD = ["", " ", "\ud800", "a\udc00", "\u00b2", "9" * 30, "\x00", "<eos>", "é" * 50]
texts = st.one_of(st.text(max_size=40), st.sampled_from(ODD))
numbers = st.one_of(
    st.integers(-3, 6), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e-300, 10**400, -0.0, 2, 2.0000001]),
)  # fmt: skip
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(texts, inner, max_size=4)),
    max_leaves=8,
)


def field(strategy):
    """A field's own kind of value most of the time, anything JSON now and then."""
    return st.one_of(strategy, values)


edit = st.fixed_dictionaries(
    {"prompt": field(texts), "target": field(texts)},
    optional={"rephrase": field(texts), "subject": field(texts), "extra": values},
)
sampling = {
    "max_tokens": field(numbers), "temperature": field(numbers), "stream": field(st.booleans()),
    "stop": field(st.one_of(texts, st.lists(texts, max_size=5))), "model": field(texts),
    "unedited": field(st.booleans()),
}  # fmt: skip
completion = st.fixed_dictionaries(
    {"prompt": field(st.one_of(texts, st.lists(texts)))}, optional=sampling
)
message = st.fixed_dictionaries(
    {
        "role": field(st.sampled_from(["system", "user", "assistant", "tool"])),
        "content": field(texts),
    }
)
chat = st.fixed_dictionaries({"messages": field(st.lists(message, max_size=3))}, optional=sampling)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    state = tmp_path_factory.mktemp("fuzz") / "state"
    limits = ["--max-edits-per-request", "3", "--max-tokens", "4"]
    served = InProcess(model_dir, state, *limits, checkpoint_every=50)
    yield served
    served.stop()


def _body(payload) -> bytes:
    """JSON as a client writes it: lone surrogates escaped, not encoded."""
    return json.dumps(payload, ensure_ascii=True).encode()


def check(response) -> None:
    status = response.status_code
    assert status < 500 or status in (503, 507), (status, response.text)
    if status >= 400:
        error = response.json()["error"]
        assert {"message", "type", "param", "code"} <= set(error), error
    elif response.headers.get("content-type", "").startswith("application/json"):
        response.json()


def post(server, path: str, content: bytes):
    headers = {**server.auth, "Content-Type": "application/json"}
    with server.client.stream("POST", path, content=content, headers=headers) as response:
        response.read()  # a streamed answer to its end
    return response


@RUNS
@given(payload=st.one_of(edit, st.lists(edit, max_size=4), values))
def test_post_edits(server, payload):
    check(post(server, "/v1/edits", _body(payload)))


@RUNS
@given(payload=st.one_of(completion, values))
def test_completions(server, payload):
    check(post(server, "/v1/completions", _body(payload)))


@RUNS
@given(payload=st.one_of(chat, values))
def test_chat_completions(server, payload):
    check(post(server, "/v1/chat/completions", _body(payload)))


@RUNS
@given(raw=st.binary(max_size=200), path=st.sampled_from(["/v1/edits", "/v1/completions"]))
def test_raw_bodies(server, raw, path):
    check(post(server, path, raw))


@RUNS
@given(
    edit_id=st.one_of(texts, st.integers().map(str)),
    after=st.one_of(texts, st.integers().map(str)),
    limit=st.one_of(texts, st.integers().map(str)),
    method=st.sampled_from(["GET", "DELETE"]),
)
def test_id_routes(server, edit_id, after, limit, method):
    check(server.client.request(method, f"/v1/edits/{_quoted(edit_id)}", headers=server.auth))
    check(server.client.get(f"/v1/edits?after={_quoted(after)}&limit={_quoted(limit)}"))


def _quoted(text: str) -> str:
    return quote(text.encode("utf-8", "surrogatepass"), safe="")
