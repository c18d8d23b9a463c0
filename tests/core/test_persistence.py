"""The save format: fixed file names for every method, dispatch on the method key, saves
in the old layout; a save never goes over what is not ours, and a save killed anywhere
leaves a complete one."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import EDITS, fast_config, tiny_model, tiny_tokenizer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from wise_edit import WiseEditor, load_editor
from wise_edit.baselines import GraceConfig, GraceEditor
from wise_edit.core.persistence import (
    CONFIG_FILE,
    STATE_FILE,
    TENSOR_FILE,
    CorruptSaveError,
    ForeignFolderError,
    SaveFolder,
    read_save,
    saved_method,
)
from wise_edit.migrate import FORMAT_VERSION

LEGACY = Path(__file__).parents[1] / "fixtures" / "legacy-v1"
BUDGET_S = 90  # wall time for the kill trials of one test


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_a_save_from_the_old_layout_loads_and_computes_the_same():
    model = AutoModelForCausalLM.from_pretrained(LEGACY / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(LEGACY / "model")
    expected = json.loads((LEGACY / "expected.json").read_text())
    assert saved_method(LEGACY / "save") == "WISE"
    editor = load_editor(model, tokenizer, LEGACY / "save")
    assert isinstance(editor, WiseEditor) and editor.num_edits == expected["num_edits"]
    assert editor.config.memory.mode == "retrieve" and len(editor.memories) == 2
    # made before these settings existed: it keeps editing as it was made
    assert editor.config.memory.rehearse_rows == 0 and editor.config.prompt_format == "raw"
    assert editor.routed(expected["prompts"]) == expected["route"]
    batch = tokenizer(expected["prompts"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = editor(**batch).logits[:, -1]
    # equal up to float summation order (the fixture was computed with one CPU thread)
    expected_logits = load_file(str(LEGACY / "expected.safetensors"))["logits"]
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    editor.edit(*EDITS[3])  # and it continues
    assert editor.num_edits == expected["num_edits"] + 1


def test_saves_use_fixed_names_and_name_their_method(tokenizer, tmp_path):
    editor = GraceEditor(tiny_model(), tokenizer, GraceConfig(layer=2, max_steps=3))
    editor.edit(*EDITS[0])
    editor.save_pretrained(tmp_path / "g")
    names = sorted(p.name for p in (tmp_path / "g").iterdir())
    assert names == sorted([CONFIG_FILE, STATE_FILE, TENSOR_FILE])
    config = json.loads((tmp_path / "g" / CONFIG_FILE).read_text())
    state = json.loads((tmp_path / "g" / STATE_FILE).read_text())
    assert config["method"] == "GRACE" and config["epsilon_init"] == 1.0
    assert state["format_version"] == FORMAT_VERSION and state["edit_log"][0]["action"] == "add"
    loaded = load_editor(tiny_model(), tokenizer, tmp_path / "g")
    assert isinstance(loaded, GraceEditor) and loaded.routed([EDITS[0][0]]) == [0]


def test_a_save_that_names_no_method_is_refused(tokenizer, tmp_path):
    editor = WiseEditor(tiny_model(), tokenizer, fast_config(max_steps=2))
    editor.edit(*EDITS[0])
    editor.save_pretrained(tmp_path / "w")
    config_file = tmp_path / "w" / CONFIG_FILE
    config = json.loads(config_file.read_text())
    config["method"] = "SERAC"
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown method 'SERAC'"):
        load_editor(tiny_model(), tokenizer, tmp_path / "w")


SAVER = """
import sys, torch
sys.path.insert(0, {tests!r})
from conftest import tiny_model, tiny_tokenizer, fast_config, EDITS
from wise_edit import WiseEditor
editor = WiseEditor(tiny_model(), tiny_tokenizer(), fast_config(max_steps=2))
editor.edit_many(EDITS[:2])
print("ready", flush=True)
n = 0
while True:
    editor.edit_log[0]["meta"] = {{"save": n}}
    editor.save_pretrained({out!r})
    n += 1
"""


def test_a_save_killed_anywhere_leaves_a_complete_save(tmp_path):
    out = tmp_path / "saves"
    script = SAVER.format(tests=str(Path(__file__).parents[1]), out=str(out))
    rng = random.Random(1)
    started, kills = time.monotonic(), 0
    while time.monotonic() - started < BUDGET_S / 2 and kills < 5:
        proc = subprocess.Popen([sys.executable, "-c", script], env=_env(), stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        saved = read_save(out)  # complete: JSON readable, tensors match their checksum
        assert saved.method == "WISE" and len(saved.state["edit_log"]) == 2
    print("save kill trials:", kills)
    assert kills >= 3
    # a writer killed while writing its lock's owner file leaves it under a side name
    (tmp_path / ".saves.lock.owner.tmp-999999").write_text("pid 999999 on gone\n")
    editor = load_editor(tiny_model(), tiny_tokenizer(), out)  # the next writer cleans up
    editor.save_pretrained(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".saves.lock", "saves"]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _saved_editor(tokenizer, folder: Path, edits=EDITS[:2]) -> WiseEditor:
    editor = WiseEditor(tiny_model(), tokenizer, fast_config(max_steps=3))
    editor.edit_many(edits)
    editor.save_pretrained(folder)
    return editor


# ---------------------------------------------------------------------- never destroy
def test_a_save_never_goes_over_a_foreign_folder(tokenizer, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("my thesis")
    (foreign / "sub").mkdir()
    (foreign / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = _tree(foreign)
    editor = WiseEditor(tiny_model(), tokenizer, fast_config(max_steps=2))
    with pytest.raises(ForeignFolderError, match="holds no wise-edit save"):
        editor.save_pretrained(foreign)
    file = tmp_path / "a-file"
    file.write_text("x")
    with pytest.raises(ForeignFolderError, match="is a file"):
        editor.save_pretrained(file)
    assert _tree(foreign) == before and file.read_text() == "x"


def test_another_methods_save_is_replaced_only_when_asked(tokenizer, tmp_path):
    _saved_editor(tokenizer, tmp_path / "s")
    grace = GraceEditor(tiny_model(), tokenizer, GraceConfig(layer=2, max_steps=2))
    with pytest.raises(ForeignFolderError, match="holds a WISE save"):
        grace.save_pretrained(tmp_path / "s")
    grace.save_pretrained(tmp_path / "s", replace=True)
    assert isinstance(load_editor(tiny_model(), tokenizer, tmp_path / "s"), GraceEditor)


def test_wise_edit_imports_and_locks_a_save_without_fcntl(tmp_path):
    """No `fcntl` (Windows): importing works and a save folder still locks."""
    code = (
        "import sys; sys.modules['fcntl'] = None\n"
        "import warnings; warnings.simplefilter('ignore')\n"
        "import wise_edit\n"
        "from wise_edit.core.persistence import SaveFolder, SaveLockedError\n"
        f"with SaveFolder({str(tmp_path / 's')!r}):\n"
        "    try:\n"
        f"        SaveFolder({str(tmp_path / 's')!r}).__enter__()\n"
        "    except SaveLockedError:\n"
        "        print('locked')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "locked"


# ---------------------------------------------------------------------- the user's files
def _users_files(folder: Path) -> dict[str, bytes]:
    (folder / "notes.txt").write_text("my notes")
    (folder / "README.txt").write_text("what this save is")
    (folder / "sub").mkdir()
    (folder / "sub" / "data.bin").write_bytes(b"\x00\x01")
    return {k: v for k, v in _tree(folder).items() if not k.startswith("editor_")}


def test_a_second_save_keeps_the_users_files(tokenizer, tmp_path):
    folder = tmp_path / "s"
    editor = _saved_editor(tokenizer, folder, EDITS[:1])
    mine = _users_files(folder)
    editor.edit_many(EDITS[1:2])
    editor.save_pretrained(folder)
    assert {k: v for k, v in _tree(folder).items() if k in mine} == mine
    assert len(json.loads((folder / STATE_FILE).read_text())["edit_log"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".s.lock", "s"]  # no leftovers


def test_a_crash_after_the_swap_keeps_the_users_files(tokenizer, tmp_path):
    """Killed between the swap and moving the user's files over: the next writer moves
    them before the old folder goes."""
    folder = tmp_path / "s"
    _saved_editor(tokenizer, folder, EDITS[:1])
    mine = _users_files(folder)
    old = tmp_path / ".s.old-12345"
    folder.rename(old)
    folder.mkdir()
    for name in (CONFIG_FILE, STATE_FILE, TENSOR_FILE):
        (folder / name).write_bytes((old / name).read_bytes())
    with SaveFolder(folder):
        pass
    assert {k: v for k, v in _tree(folder).items() if k in mine} == mine
    assert not old.exists()


@pytest.mark.parametrize("name", [".s.lock", ".s.lock.owner"])
def test_a_lock_file_that_is_a_link_is_refused_not_written_through(name, tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("my thesis")
    (tmp_path / name).symlink_to(precious)
    with pytest.raises(ForeignFolderError, match="is a symbolic link"), SaveFolder(tmp_path / "s"):
        pass
    assert precious.read_text() == "my thesis"


def test_a_state_nested_too_deeply_is_a_corrupt_save(tokenizer, tmp_path):
    folder = tmp_path / "s"
    _saved_editor(tokenizer, folder, EDITS[:1])
    (folder / STATE_FILE).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CorruptSaveError, match="nested too deeply"):
        read_save(folder)
