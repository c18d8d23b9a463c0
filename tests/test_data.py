"""Dataset loaders on small hand-written fixtures, JSONL validation with line numbers,
and (when present) the real shared benchmark data."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from wise_edit import data
from wise_edit.data import EditRecord

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

ZSRE = [
    {
        "subject": "Lahti Town Hall",
        "src": "Who designed Lahti Town Hall?",
        "pred": "Alvar Aalto",
        "rephrase": "Who was the architect of Lahti Town Hall?",
        "alt": "Eliel Saarinen",
        "answers": ["Eliel Saarinen"],
        "loc": "nq question: who sings the song bad moon rising",
        "loc_ans": "Creedence Clearwater Revival",
        "cond": "Alvar Aalto >> Eliel Saarinen || Who designed Lahti Town Hall?",
        "portability": {"New Question": "q", "New Answer": "a"},
    },
    {
        "subject": "Zorb",
        "src": "Which river flows through Zorb?",
        "pred": "Nile",
        "rephrase": "What river runs through Zorb?",
        "alt": "Quiet river",
        "answers": ["Danube"],
        "loc": "nq question: when was the first iphone released",
        "loc_ans": "2007",
        "cond": "Nile >> Quiet river || Which river flows through Zorb?",
        "portability": {},
    },
]
LONGFORM = [
    {
        "prompt": "This is a Wikipedia passage about oria.",
        "target_new": "Oria was founded by King Malo.",
        "subject": "oria",
        "locality_prompt": "A map of South America.",
        "locality_ground_truth": "It has a small scratch.",
    },
    {
        "prompt": "This is a Wikipedia passage about vex.",
        "target_new": "Vex is deep violet.",
        "subject": "vex",
        "locality_prompt": "Academic coaching",
        "locality_ground_truth": "helps graduate students.",
    },
]
TEMPORAL = [
    {
        "prompt": "Tesla, Inc.,",
        "target_new": "originally known as Tesla Motors, is a car maker.",
        "subject": "Tesla, Inc.,",
        "ood_rephrase": "Tesla, Inc., an automotive company, is headquartered in Austin.",
        "locality_prompt": "What can we learn from EU colleagues?",
        "locality_ground_truth": "Digital banking matters.",
    }
]


def _write(root: Path, relative: str, payload: object) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload), encoding="utf-8")
    return path


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    _write(root, "zsre/zsre_edit.json", ZSRE)
    _write(
        root,
        "zsre/zsre_loc_1k.json",
        [{k: v for k, v in r.items() if k != "portability"} for r in ZSRE],
    )
    _write(root, "hallucination/hallucination-edit.json", LONGFORM)
    _write(root, "hallucination/hallucination-train.json", LONGFORM[:1])
    _write(root, "temporal/temporal-edit.json", TEMPORAL)
    _write(root, "temporal/temporal-train.json", TEMPORAL * 3)
    return root


def test_zsre_maps_fields_and_keeps_nq_prefix(data_dir):
    records = data.load_zsre(data_dir)
    assert len(records) == 2
    first = records[0]
    assert first.prompt == "Who designed Lahti Town Hall?"
    assert first.target == "Eliel Saarinen"
    assert first.rephrase == "Who was the architect of Lahti Town Hall?"
    assert first.loc == "nq question: who sings the song bad moon rising"
    assert first.loc_ans == "Creedence Clearwater Revival"
    assert first.extra["subject"] == "Lahti Town Hall"
    assert first.extra["pred"] == "Alvar Aalto"
    assert first.extra["portability"] == {"New Question": "q", "New Answer": "a"}
    assert not {"src", "alt", "rephrase", "loc", "loc_ans"} & set(first.extra)


def test_limit_truncates_and_rejects_negative(data_dir):
    assert len(data.load_zsre(data_dir, limit=1)) == 1
    assert data.load_zsre(data_dir, limit=0) == []
    with pytest.raises(ValueError, match="limit"):
        data.load_zsre(data_dir, limit=-1)


def test_zsre_irrelevant_joins_question_and_answer(data_dir):
    prompts = data.load_zsre_irrelevant(data_dir)
    assert prompts == [
        "nq question: who sings the song bad moon rising Creedence Clearwater Revival",
        "nq question: when was the first iphone released 2007",
    ]
    assert data.load_zsre_irrelevant(data_dir, limit=1) == prompts[:1]


def test_hallucination_splits(data_dir):
    edit = data.load_hallucination(data_dir)
    assert len(edit) == 2
    assert edit[0] == EditRecord(
        prompt="This is a Wikipedia passage about oria.",
        target="Oria was founded by King Malo.",
        loc="A map of South America.",
        loc_ans="It has a small scratch.",
        extra={
            "subject": "oria",
            "locality_prompt": "A map of South America.",
            "locality_ground_truth": "It has a small scratch.",
        },
    )
    assert edit[0].rephrase is None
    assert len(data.load_hallucination(data_dir, split="train")) == 1
    with pytest.raises(ValueError, match="split"):
        data.load_hallucination(data_dir, split="test")


def test_temporal_ood_rephrase_in_both_places(data_dir):
    (record,) = data.load_temporal(data_dir)
    assert record.prompt == "Tesla, Inc.,"
    assert record.target.startswith("originally known")
    assert record.rephrase == TEMPORAL[0]["ood_rephrase"]
    assert record.extra["ood_rephrase"] == TEMPORAL[0]["ood_rephrase"]
    assert record.loc == "What can we learn from EU colleagues?"
    assert record.loc_ans == "Digital banking matters."
    assert record.extra["locality_prompt"] == record.loc
    assert len(data.load_temporal(data_dir, split="train", limit=2)) == 2


def test_load_dataset_dispatches(data_dir):
    assert data.load_dataset("zsre", data_dir) == data.load_zsre(data_dir)
    assert data.load_dataset("hallucination", data_dir, limit=1) == data.load_hallucination(
        data_dir, limit=1
    )
    assert data.load_dataset("temporal", data_dir) == data.load_temporal(data_dir)


def test_load_dataset_unknown_name_lists_names(data_dir):
    with pytest.raises(ValueError, match="zsre, counterfact, hallucination, temporal or a .jsonl"):
        data.load_dataset("wikidata", data_dir)


def test_missing_data_dir_points_at_shared_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data-dir") as info:
        data.load_zsre(tmp_path / "nowhere")
    assert "shared/data" in str(info.value)
    assert str(tmp_path / "nowhere") in str(info.value)


def test_missing_file_names_the_file(tmp_path):
    (tmp_path / "zsre").mkdir()
    with pytest.raises(FileNotFoundError, match="temporal-edit.json") as info:
        data.load_dataset("temporal", tmp_path)
    assert "--data-dir" in str(info.value)


def test_bad_benchmark_record_names_file_and_record(tmp_path):
    broken = [dict(ZSRE[0]), {k: v for k, v in ZSRE[1].items() if k != "alt"}]
    _write(tmp_path, "zsre/zsre_edit.json", broken)
    with pytest.raises(ValueError, match=r"zsre_edit\.json: record 2: field 'alt' is missing"):
        data.load_zsre(tmp_path)


def test_benchmark_file_must_be_a_json_array(tmp_path):
    _write(tmp_path, "temporal/temporal-edit.json", {"prompt": "x"})
    with pytest.raises(ValueError, match="JSON array"):
        data.load_temporal(tmp_path)


def test_edit_record_is_frozen_and_hashable():
    record = EditRecord("p", "t", extra={"subject": "s"})
    with pytest.raises(AttributeError):
        record.prompt = "q"  # type: ignore[misc]
    assert record in {record}
    assert EditRecord("p", "t").extra == {}


def _jsonl(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "edits.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_reads_required_and_optional_keys(tmp_path):
    path = _jsonl(
        tmp_path,
        '{"prompt": "Who designed Lahti Town Hall?", "target": "Eliel Saarinen"}',
        "",
        "   ",
        json.dumps(
            {
                "prompt": "Capital of Atlantis?",
                "target": "Poseidonia",
                "rephrase": "Atlantis's capital?",
                "loc": "Capital of France?",
                "loc_ans": "Paris",
            }
        ),
        '{"prompt": "p", "target": "t", "rephrase": null}',
    )
    records = data.load_jsonl(path)
    assert records == [
        EditRecord("Who designed Lahti Town Hall?", "Eliel Saarinen"),
        EditRecord(
            "Capital of Atlantis?",
            "Poseidonia",
            "Atlantis's capital?",
            "Capital of France?",
            "Paris",
        ),
        EditRecord("p", "t"),
    ]


def test_jsonl_keeps_unknown_keys_with_a_warning(tmp_path, caplog):
    path = _jsonl(tmp_path, '{"prompt": "p", "target": "t", "rephase": "typo"}')
    with caplog.at_level(logging.WARNING, logger="wise_edit.data"):
        (record,) = data.load_jsonl(path)
    assert record.extra == {"rephase": "typo"}
    assert "rephase" in caplog.text


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"prompt": "p", "target": ', "invalid JSON"),
        ('["p", "t"]', "JSON object"),
        ('{"target": "t"}', "'prompt' is missing"),
        ('{"prompt": "p"}', "'target' is missing"),
        ('{"prompt": "  ", "target": "t"}', "'prompt' is empty"),
        ('{"prompt": "p", "target": ""}', "'target' is empty"),
        ('{"prompt": 3, "target": "t"}', "'prompt' is not a string"),
        ('{"prompt": "p", "target": "t", "loc": ["x"]}', "'loc' is not a string"),
    ],
)
def test_jsonl_malformed_line_names_file_and_line(tmp_path, bad_line, message):
    path = _jsonl(tmp_path, '{"prompt": "p", "target": "t"}', "", bad_line)
    with pytest.raises(ValueError, match=message) as info:
        data.load_jsonl(path)
    assert f"{path}: line 3" in str(info.value)


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="edits.jsonl"):
        data.load_jsonl(tmp_path / "edits.jsonl")


def test_default_data_dir_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv("WISE_EDIT_DATA", str(tmp_path))
    assert data.default_data_dir() == tmp_path


def test_default_data_dir_searches_near_cwd(monkeypatch, tmp_path):
    monkeypatch.delenv("WISE_EDIT_DATA", raising=False)
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    assert data.default_data_dir() == Path("../shared/data")  # nothing exists: the hint
    (project / "shared" / "data").mkdir(parents=True)
    assert data.default_data_dir() == project / "shared" / "data"
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert data.default_data_dir().resolve() == tmp_path / "shared" / "data"


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"shared benchmark data not at {REAL_DATA}")
def test_real_shared_data_counts():
    assert len(data.load_zsre(REAL_DATA)) == 1037
    assert len(data.load_zsre_irrelevant(REAL_DATA)) == 1000
    assert len(data.load_hallucination(REAL_DATA, "edit")) == 600
    assert len(data.load_hallucination(REAL_DATA, "train")) == 306
    assert len(data.load_temporal(REAL_DATA, "edit")) == 75
    assert len(data.load_temporal(REAL_DATA, "train")) == 75
    first = data.load_zsre(REAL_DATA, limit=1)[0]
    assert first.loc is not None and first.loc.startswith("nq question: ")


def _counterfact(folder, n):
    """A CounterFact file of ``n`` records "P{i} speaks" (locality "Q{i} speaks")."""
    raw = [
        {
            "case_id": i,
            "prompt": f"P{i} speaks",
            "target_new": "French",
            "subject": f"P{i}",
            "ground_truth": "English",
            "rephrase_prompt": f"The language of P{i} is",
            "locality_prompt": f"Q{i} speaks",
            "locality_ground_truth": "English",
        }
        for i in range(n)
    ]
    (folder / "counterfact").mkdir()
    (folder / "counterfact" / "counterfact-train.json").write_text(json.dumps(raw))


def test_counterfact_keeps_its_tail_as_the_unrelated_pool(tmp_path):
    _counterfact(tmp_path, data.COUNTERFACT_POOL + 3)
    records = data.load_dataset("counterfact", tmp_path)
    assert [r.prompt for r in records] == ["P0 speaks", "P1 speaks", "P2 speaks"]
    first = records[0]
    assert (first.target, first.rephrase, first.loc, first.loc_ans) == (
        "French",
        "The language of P0 is",
        "Q0 speaks",
        "English",
    )
    assert data.load_dataset("counterfact", tmp_path, limit=2) == records[:2]
    pool = data.load_counterfact_pool(tmp_path)
    assert len(pool) == 2 * data.COUNTERFACT_POOL and pool[:2] == ["P3 speaks", "Q3 speaks"]


def test_a_counterfact_stream_into_the_pool_takes_the_rest_of_its_pool_from_zsre(tmp_path):
    n = data.COUNTERFACT_POOL + 3
    _counterfact(tmp_path, n)
    (tmp_path / "zsre").mkdir()
    loc = [{"src": "Who made X?", "alt": "Y", "loc": "nq question: where is Z", "loc_ans": "W"}]
    (tmp_path / "zsre" / "zsre_loc_1k.json").write_text(json.dumps(loc))
    assert len(data.load_dataset("counterfact", tmp_path, limit=n - 1)) == n - 1
    pool = data.load_counterfact_pool(tmp_path, edited=n - 1)
    # the one record left unedited, then ZsRE's NQ question and its same-form question
    assert pool == [
        f"P{n - 1} speaks",
        f"Q{n - 1} speaks",
        "nq question: where is Z W",
        "Who made X?",
    ]
    assert data.load_counterfact_pool(tmp_path, edited=3) == data.load_counterfact_pool(tmp_path)
    assert "P0 speaks" not in data.load_counterfact_pool(tmp_path, edited=n)
