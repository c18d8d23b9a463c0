"""Edit datasets: the three WISE benchmark settings (ZsRE, hallucination, temporal) and
user-written JSONL edits, all as `EditRecord`s.

The benchmark files are read in place from the shared data folder (never copied into the
project). Every loader validates what it reads and fails with the file and record/line
number: a silently skipped or mangled edit would distort a benchmark without any sign.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .core.rows import check_text

logger = logging.getLogger(__name__)

DATASETS = ("zsre", "counterfact", "hallucination", "temporal")
"""Names `load_dataset` accepts (beside the path of a JSONL file)."""

COUNTERFACT_POOL = 1000
"""The last this many CounterFact records are the unrelated-prompt pool, never edited."""

SPLITS = ("edit", "train")
"""`edit`: the records to edit; `train`: same layout, used as irrelevant prompts."""

JSONL_REQUIRED = ("prompt", "target")
JSONL_OPTIONAL = ("rephrase", "loc", "loc_ans")
JSONL_EXTRA = ("subject",)
"""Known keys kept in `EditRecord.extra`: ``subject`` is what the prompt is about, which
WISE routes on (`EditRecord.subject`)."""

_DATA_DIR_HINT = "--data-dir (or $WISE_EDIT_DATA) should point at the `shared/data` folder"


@dataclass(frozen=True)
class EditRecord:
    """One edit: make the model answer `prompt` with `target`.

    `rephrase` is a paraphrase that should also get `target` (generalisation), and
    `loc`/`loc_ans` a probe whose answer must not change (locality). `extra` keeps the
    source's other fields (e.g. `subject`, `ood_rephrase`, `locality_prompt`) for metrics
    that need them; it is left out of hashing so records stay usable in sets."""

    prompt: str
    target: str
    rephrase: str | None = None
    loc: str | None = None
    loc_ans: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @property
    def subject(self) -> str | None:
        """The source's ``subject`` (what the prompt is about), when it names one."""
        value = self.extra.get("subject")
        return value if isinstance(value, str) and value.strip() else None

    def request(self) -> dict[str, Any]:
        """The record as `edit_many` takes it: prompt, target and, if named, subject."""
        out = {"prompt": self.prompt, "target": self.target}
        return out if self.subject is None else {**out, "subject": self.subject}


def default_data_dir() -> Path:
    """Where the benchmark data is looked for when none is given: `$WISE_EDIT_DATA`, else
    `../shared/data` or `shared/data` relative to the working directory (the project
    root sits beside `shared/`), else `../shared/data` so the error names that path."""
    explicit = os.environ.get("WISE_EDIT_DATA")
    if explicit:
        return Path(explicit).expanduser()
    for candidate in (Path.cwd() / ".." / "shared" / "data", Path.cwd() / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return Path("../shared/data")


def _check_limit(limit: int | None) -> None:
    """Reject negative limits instead of letting Python slicing drop records from the end."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or a non-negative int, got {limit!r}")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def _data_file(data_dir: str | os.PathLike[str], relative: str) -> Path:
    """Resolve a benchmark file, failing with the path and how to fix `--data-dir`."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {root} does not exist; {_DATA_DIR_HINT}")
    path = root / relative
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file {path} not found; {_DATA_DIR_HINT}")
    return path


def _read_records(path: Path, limit: int | None) -> list[Mapping[str, Any]]:
    """Read a JSON array of objects, truncated to `limit` before validation."""
    _check_limit(limit)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    records = data if limit is None else data[:limit]
    for index, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: record {index} is not a JSON object")
    return records


def _required_text(record: Mapping[str, Any], key: str, where: str) -> str:
    """A field that must be a non-blank string: an edit without it is meaningless."""
    value = record.get(key)
    if not isinstance(value, str):
        kind = "missing" if value is None else f"not a string ({type(value).__name__})"
        raise ValueError(f"{where}: field {key!r} is {kind}")
    try:
        check_text(value, f"field {key!r}")
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    return value


def _optional_text(record: Mapping[str, Any], key: str | None, where: str) -> str | None:
    """A field that may be absent or null, but is a string when given."""
    value = None if key is None else record.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{where}: field {key!r} is not a string ({type(value).__name__})")
    return value


def _to_record(
    raw: Mapping[str, Any],
    where: str,
    *,
    prompt: str,
    target: str,
    rephrase: str | None = None,
    loc: str | None = None,
    loc_ans: str | None = None,
) -> EditRecord:
    """Map a source record's field names onto `EditRecord`; fields whose source name is
    not already a core field name go to `extra`, so nothing from the source is lost."""
    core = {prompt, target, "rephrase", "loc", "loc_ans"}
    return EditRecord(
        prompt=_required_text(raw, prompt, where),
        target=_required_text(raw, target, where),
        rephrase=_optional_text(raw, rephrase, where),
        loc=_optional_text(raw, loc, where),
        loc_ans=_optional_text(raw, loc_ans, where),
        extra={k: v for k, v in raw.items() if k not in core},
    )


def load_zsre(data_dir: str | os.PathLike[str], limit: int | None = None) -> list[EditRecord]:
    """The ZsRE edit set (`zsre/zsre_edit.json`, 1037 records): prompt=`src`,
    target=`alt`, paraphrase and locality probe as given.

    `loc` keeps its raw text, including the "nq question: " prefix the WISE set carries:
    the published WISE/EasyEdit evaluation feeds it to the model verbatim, so stripping it
    would change locality numbers. `extra` holds `subject`, `pred`, `answers`, `cond`,
    `portability`."""
    path = _data_file(data_dir, "zsre/zsre_edit.json")
    return _load_mapped(
        path,
        limit,
        prompt="src",
        target="alt",
        rephrase="rephrase",
        loc="loc",
        loc_ans="loc_ans",
    )


def load_zsre_train(data_dir: str | os.PathLike[str], limit: int | None = None) -> list[EditRecord]:
    """MEND's ZsRE train subset (`zsre/zsre_loc_1k.json`, 1000 records, disjoint from the
    edit set), mapped as `load_zsre` maps the edit set: what MEND's editor network is
    trained on (edit `src` -> `alt`, generalise to `rephrase`, keep `loc` unchanged).
    Records without all five texts are skipped (two of the 1000 have an empty `alt`):
    a training set needs usable records, not every record."""
    path = _data_file(data_dir, "zsre/zsre_loc_1k.json")
    keys = {"prompt": "src", "target": "alt", "rephrase": "rephrase", "loc": "loc"}
    records = []
    for i, raw in enumerate(_read_records(path, limit), start=1):
        texts = [raw.get(k) for k in (*keys.values(), "loc_ans")]
        if all(isinstance(t, str) and t.strip() for t in texts):
            records.append(_to_record(raw, f"{path}: record {i}", loc_ans="loc_ans", **keys))
    return records


def load_zsre_irrelevant(data_dir: str | os.PathLike[str], limit: int | None = None) -> list[str]:
    """Unrelated prompts for the router's margin loss (`zsre/zsre_loc_1k.json`): each is
    `loc + " " + loc_ans`, an NQ question with its answer, as WISE builds them."""
    path = _data_file(data_dir, "zsre/zsre_loc_1k.json")
    prompts = []
    for i, raw in enumerate(_read_records(path, limit), start=1):
        where = f"{path}: record {i}"
        question = _required_text(raw, "loc", where)
        prompts.append(f"{question} {_required_text(raw, 'loc_ans', where)}")
    return prompts


def load_zsre_same_form(data_dir: str | os.PathLike[str], limit: int | None = None) -> list[str]:
    """ZsRE questions about other subjects (`src` of `zsre/zsre_loc_1k.json`, MEND's train
    split, disjoint from the edit set): unrelated prompts in the edits' own sentence form,
    the negatives a router confuses with edits (NQ questions are easy ones)."""
    path = _data_file(data_dir, "zsre/zsre_loc_1k.json")
    return [
        _required_text(raw, "src", f"{path}: record {i}")
        for i, raw in enumerate(_read_records(path, limit), start=1)
    ]


def load_counterfact(
    data_dir: str | os.PathLike[str], limit: int | None = None
) -> list[EditRecord]:
    """CounterFact (`counterfact/counterfact-train.json`, 10000 records, ROME's
    counterfactual completions): prompt, `target_new`, paraphrase `rephrase_prompt`,
    locality probe `locality_prompt` / `locality_ground_truth`, which shares the edit's
    relation and sentence form ("Michel Rocard is a native speaker of"). The last
    `COUNTERFACT_POOL` records are the unrelated-prompt pool and are kept out, unless
    ``limit`` asks for more records than the rest: a stream that long takes them too, and
    `load_counterfact_pool` then draws its prompts from elsewhere."""
    path = _data_file(data_dir, "counterfact/counterfact-train.json")
    records = _load_mapped(
        path,
        None,
        prompt="prompt",
        target="target_new",
        rephrase="rephrase_prompt",
        loc="locality_prompt",
        loc_ans="locality_ground_truth",
    )
    kept = len(records) - COUNTERFACT_POOL
    if limit is None or limit <= kept:
        return records[:kept] if limit is None else records[:limit]
    return records[:limit]


def load_counterfact_pool(data_dir: str | os.PathLike[str], edited: int = 0) -> list[str]:
    """Unrelated prompts for the router from CounterFact's last `COUNTERFACT_POOL`
    records, never edited: their prompts and locality prompts (the edits' own forms). A
    stream of ``edited`` records that reaches into them keeps only the ones it leaves
    unedited, and takes the rest of the pool from ZsRE's (NQ questions and ZsRE questions,
    `load_zsre_irrelevant` and `load_zsre_same_form`): no CounterFact edit uses those."""
    path = _data_file(data_dir, "counterfact/counterfact-train.json")
    records = _read_records(path, None)
    first = max(len(records) - COUNTERFACT_POOL, edited)
    out = []
    for i, raw in enumerate(records[first:], start=first + 1):
        where = f"{path}: record {i}"
        out += [_required_text(raw, "prompt", where), _required_text(raw, "locality_prompt", where)]
    if first > len(records) - COUNTERFACT_POOL:
        out += load_zsre_irrelevant(data_dir) + load_zsre_same_form(data_dir)
    return out


def load_hallucination(
    data_dir: str | os.PathLike[str], split: str = "edit", limit: int | None = None
) -> list[EditRecord]:
    """The hallucination set (`hallucination/hallucination-{split}.json`): long-form
    edits; prompt and `target_new`, locality probe from `locality_prompt` /
    `locality_ground_truth` (also kept in `extra` under those names). No paraphrase."""
    _check_split(split)
    path = _data_file(data_dir, f"hallucination/hallucination-{split}.json")
    return _load_mapped(
        path,
        limit,
        prompt="prompt",
        target="target_new",
        loc="locality_prompt",
        loc_ans="locality_ground_truth",
    )


def load_temporal(
    data_dir: str | os.PathLike[str], split: str = "edit", limit: int | None = None
) -> list[EditRecord]:
    """The temporal set (`temporal/temporal-{split}.json`): OOD generalisation. The
    `ood_rephrase` is both `rephrase` and `extra["ood_rephrase"]` so generic metrics and
    the temporal-specific one (loss of `ood_rephrase` below -log 0.8) both find it."""
    _check_split(split)
    path = _data_file(data_dir, f"temporal/temporal-{split}.json")
    return _load_mapped(
        path,
        limit,
        prompt="prompt",
        target="target_new",
        rephrase="ood_rephrase",
        loc="locality_prompt",
        loc_ans="locality_ground_truth",
    )


def _load_mapped(path: Path, limit: int | None, **fields: str) -> list[EditRecord]:
    """Records of a benchmark file, each mapped field by field (see `_to_record`)."""
    return [
        _to_record(raw, f"{path}: record {i}", **fields)
        for i, raw in enumerate(_read_records(path, limit), start=1)
    ]


def _jsonl_record(line: str, where: str) -> tuple[EditRecord, list[str]]:
    """Parse one JSONL line; returns the record and its unknown keys (kept in `extra`)."""
    try:
        raw = json.loads(line)
    except ValueError as error:
        raise ValueError(f"{where}: invalid JSON ({error.args[0]})") from error
    except RecursionError:  # nested deeper than the parser's stack
        raise ValueError(f"{where}: invalid JSON (nested too deeply)") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(JSONL_REQUIRED) - set(JSONL_OPTIONAL) - set(JSONL_EXTRA))
    subject = _optional_text(raw, "subject", where)
    if subject is not None and not subject.strip():
        raise ValueError(f"{where}: field 'subject' is blank (leave it out, or name the subject)")
    record = EditRecord(
        prompt=_required_text(raw, "prompt", where),
        target=_required_text(raw, "target", where),
        rephrase=_optional_text(raw, "rephrase", where),
        loc=_optional_text(raw, "loc", where),
        loc_ans=_optional_text(raw, "loc_ans", where),
        extra={key: raw[key] for key in (*unknown, *JSONL_EXTRA) if key in raw},
    )
    return record, unknown


@dataclass(frozen=True)
class JsonlLine:
    """A record of a JSONL file with where it stands: its 1-based line number and the
    sha256 of its content (canonical JSON, so re-formatting a line does not change it)."""

    number: int
    sha256: str
    record: EditRecord


def read_jsonl(path: str | os.PathLike[str]) -> list[JsonlLine]:
    """`load_jsonl` with each record's line number and content hash (for streams that
    resume)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"edits file {file} not found")
    out: list[JsonlLine] = []
    unknown: set[str] = set()
    try:
        with file.open(encoding="utf-8-sig") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                record, extra_keys = _jsonl_record(line, f"{file}: line {number}")
                canonical = json.dumps(json.loads(line), sort_keys=True, ensure_ascii=False)
                digest = hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()
                out.append(JsonlLine(number, digest, record))
                unknown.update(extra_keys)
    except UnicodeDecodeError as err:
        raise ValueError(f"{file}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if unknown:
        logger.warning(
            "%s: unknown key(s) %s kept in `extra` (known: %s)",
            file,
            ", ".join(sorted(unknown)),
            ", ".join(JSONL_REQUIRED + JSONL_OPTIONAL + JSONL_EXTRA),
        )
    return out


def load_jsonl(path: str | os.PathLike[str]) -> list[EditRecord]:
    """User edits, one JSON object per line: "prompt" and "target" (non-empty strings)
    required, "rephrase", "loc", "loc_ans", "subject" optional (string or null). Blank lines are
    allowed. Any malformed line raises `ValueError` naming the file and its 1-based line
    number; nothing is skipped. Other keys are kept in `extra`, with a warning, since
    they are more often a typo ("rephase") than intended."""
    return [line.record for line in read_jsonl(path)]


def load_dataset(
    name: str, data_dir: str | os.PathLike[str], limit: int | None = None
) -> list[EditRecord]:
    """The edit split of a benchmark by name (see `DATASETS`), or the records of a JSONL
    file (`load_jsonl`) when ``name`` ends in ``.jsonl``."""
    _check_limit(limit)
    if name.endswith(".jsonl"):
        records = load_jsonl(name)
        return records if limit is None else records[:limit]
    if name == "counterfact":
        return load_counterfact(data_dir, limit)
    if name == "zsre":
        return load_zsre(data_dir, limit)
    if name == "hallucination":
        return load_hallucination(data_dir, "edit", limit)
    if name == "temporal":
        return load_temporal(data_dir, "edit", limit)
    raise ValueError(
        f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)} or a .jsonl file"
    )
