"""Request bodies, checked field by field: a bad one is a `BadRequest` naming the field,
raised before anything changes. Limits are a `Limits` object given at start."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from ..neutral import check_subject


class BadRequest(ValueError):
    """A 4xx answer: ``status``, a message, and the request field at fault."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_body_bytes: int = field(default=256 * 1024, metadata={"help": "request body size"})
    max_prompt_chars: int = field(default=4000, metadata={"help": "prompt, target, message"})
    max_tokens: int = field(default=256, metadata={"help": "largest max_tokens a request gets"})
    max_edits_per_request: int = field(default=100, metadata={"help": "edits in one POST"})
    max_stops: int = field(default=4, metadata={"help": "stop strings (OpenAI's limit)"})

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


# the deepest JSON a request may nest (a real request nests 3 levels)
MAX_DEPTH = 32
# the smallest temperature that samples: below it logits / temperature overflow
MIN_TEMPERATURE = 0.01


def parse_json(body: bytes, limits: Limits) -> Any:
    """The body's JSON. What `json` cannot take in its stride is a 400 on ``body`` too:
    nesting past the interpreter's recursion limit (RecursionError), an integer past
    Python's 4300-digit limit (ValueError); and a string holding a lone surrogate
    (valid JSON, but no UTF-8 text: neither the tokenizer nor SQLite takes it) is one
    naming its field."""
    if len(body) > limits.max_body_bytes:
        raise BadRequest(f"body is over {limits.max_body_bytes} bytes", "body", 413)
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadRequest(f"body is not valid JSON: {err}", "body") from None
    except RecursionError:
        raise BadRequest("body is nested too deeply", "body") from None
    except ValueError as err:  # e.g. "Exceeds the limit (4300 digits) for integer string"
        raise BadRequest(f"body is not acceptable JSON: {err}", "body") from None
    _check_tree(value)
    return value


def _check_tree(value: Any) -> None:
    """At most `MAX_DEPTH` levels of nesting, and every string (keys too) UTF-8 text;
    walked without recursion, so that no body can exhaust the stack."""
    todo: list[tuple[Any, str, int]] = [(value, "", 0)]
    while todo:
        item, path, depth = todo.pop()
        if depth > MAX_DEPTH:
            raise BadRequest(f"body is nested over {MAX_DEPTH} levels deep", "body")
        if isinstance(item, str):
            _utf8(item, path or "body")
        elif isinstance(item, dict):
            for key, child in item.items():
                where = f"{path}.{key}" if path else str(key)
                _utf8(key, path or "body")
                todo.append((child, where, depth + 1))
        elif isinstance(item, list):
            todo.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(item))


def _utf8(value: str, param: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        shown = param.encode("utf-8", "backslashreplace").decode("ascii", "replace")
        raise BadRequest(f"{shown} holds a lone surrogate (not UTF-8 text)", shown) from None


def json_object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{where} must be a JSON object", where)
    return value


def text(body: dict[str, Any], name: str, limits: Limits, where: str = "") -> str:
    """A required non-blank string of at most ``max_prompt_chars``."""
    param = f"{where}{name}"
    if name not in body:
        raise BadRequest(f"{param} is required", param)
    value = body[name]
    if not isinstance(value, str):
        raise BadRequest(f"{param} must be a string", param)
    if not value.strip():
        raise BadRequest(f"{param} must not be empty", param)
    if len(value) > limits.max_prompt_chars:
        raise BadRequest(f"{param} is over {limits.max_prompt_chars} characters", param)
    return value


def edits(payload: Any, limits: Limits) -> list[dict[str, str]]:
    """One ``{prompt, target, rephrase?, subject?}`` or a non-empty list of them; a
    ``subject`` must occur in its prompt (as the library's `edit` requires)."""
    many = isinstance(payload, list)
    items = payload if many else [json_object(payload, "body")]
    if not items:
        raise BadRequest("the list of edits is empty", "body")
    if len(items) > limits.max_edits_per_request:
        raise BadRequest(f"over {limits.max_edits_per_request} edits in one request", "body")
    out = []
    for i, item in enumerate(items):
        where = f"[{i}]." if many else ""
        item = json_object(item, where.rstrip(".") or "body")
        record = {"prompt": text(item, "prompt", limits, where)}
        record["target"] = text(item, "target", limits, where)
        if item.get("rephrase") is not None:
            record["rephrase"] = text(item, "rephrase", limits, where)
        if item.get("subject") is not None:
            record["subject"] = text(item, "subject", limits, where)
            try:
                check_subject(record["prompt"], record["subject"])
            except ValueError as err:
                raise BadRequest(str(err), f"{where}subject") from None
        unknown = sorted(set(item) - {"prompt", "target", "rephrase", "subject"})
        if unknown:
            raise BadRequest(f"unknown field {unknown[0]!r}", f"{where}{unknown[0]}")
        out.append(record)
    return out


@dataclass(frozen=True)
class Sampling:
    """What the OpenAI endpoints share: how much and how to generate."""

    model: str
    max_tokens: int
    temperature: float
    stop: list[str]
    stream: bool
    unedited: bool  # wise-edit's own field: answer with the edits switched off


def sampling(body: dict[str, Any], limits: Limits, default_model: str) -> Sampling:
    model = body.get("model", default_model)
    if not isinstance(model, str) or len(model) > 256:
        raise BadRequest("model must be a string of at most 256 characters", "model")
    max_tokens = body.get("max_tokens", 16)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
        raise BadRequest("max_tokens must be an integer", "max_tokens")
    if not 1 <= max_tokens <= limits.max_tokens:
        raise BadRequest(f"max_tokens must be between 1 and {limits.max_tokens}", "max_tokens")
    return Sampling(
        model,
        max_tokens,
        _temperature(body.get("temperature")),
        _stops(body.get("stop"), limits),
        _flag(body, "stream"),
        _flag(body, "unedited"),
    )


def _temperature(value: Any) -> float:
    """0 (greedy, also for null) or `MIN_TEMPERATURE`..2: a tinier one divides the
    logits into infinities and sampling fails; an integer too large for a float is out
    of range, not an OverflowError."""
    if value is None:
        return 0.0
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise BadRequest("temperature must be a number", "temperature")
    if isinstance(value, int) and not 0 <= value <= 2:
        raise BadRequest("temperature must be between 0 and 2", "temperature")
    temperature = float(value)
    if not math.isfinite(temperature) or not 0 <= temperature <= 2:
        raise BadRequest("temperature must be between 0 and 2", "temperature")
    if 0 < temperature < MIN_TEMPERATURE:
        raise BadRequest(
            f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}", "temperature"
        )
    return temperature


def _stops(value: Any, limits: Limits) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise BadRequest("stop must be a non-empty string or a list of them", "stop")
    if len(stops) > limits.max_stops:
        raise BadRequest(f"at most {limits.max_stops} stop strings", "stop")
    if any(len(s) > limits.max_prompt_chars for s in stops):
        raise BadRequest(f"a stop string is over {limits.max_prompt_chars} characters", "stop")
    return stops


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be true or false", name)
    return value


def completion_prompt(body: dict[str, Any], limits: Limits) -> str:
    """/v1/completions: ``prompt`` is one string (or a list holding one)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise BadRequest("prompt must be one string (batches are not served)", "prompt")
        body = {"prompt": prompt[0]}
    return text(body, "prompt", limits)


def messages(body: dict[str, Any], limits: Limits) -> list[dict[str, str]]:
    """/v1/chat/completions: a non-empty list of ``{role, content}``."""
    value = body.get("messages")
    if not isinstance(value, list) or not value:
        raise BadRequest("messages must be a non-empty list", "messages")
    out = []
    for i, message in enumerate(value):
        message = json_object(message, f"messages[{i}]")
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise BadRequest("role must be system, user or assistant", f"messages[{i}].role")
        out.append({"role": role, "content": text(message, "content", limits, f"messages[{i}].")})
    return out
