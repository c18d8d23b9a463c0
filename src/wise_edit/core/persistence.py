"""The save format, Hugging Face style: JSON for everything readable, safetensors for
tensors, fixed file names for every method. Loading never unpickles anything.

A save is a folder with
- ``editor_config.json``: the method's config fields and a ``method`` key;
- ``editor_state.json``: format version, method, fingerprint of the wrapped weight, edit
  log, the sha256 of the tensor file, and what the method adds;
- ``editor_model.safetensors``: the method's tensors.

Writing never destroys what is not ours and never leaves a half-written save: a save
goes only into a missing or empty folder or over a save (of the same method unless
``replace``); it is written beside the old one and swapped in by two renames under an
advisory lock, and whatever a crash leaves behind (the old save under a side name, a
half-written temp folder) is put right by the next writer. Files a user put into a save
folder (notes, a README, a subfolder) move into the new save after the swap, and the
next writer moves them too if a crash came first. Readers take no lock: they read again
if a swap happened while they read. The lock is `filelock`'s, so that saving works
wherever Python does (no ``fcntl`` on Windows); neither it nor the owner file beside it
is ever opened through a symbolic link, so a link planted there cannot make a save
overwrite the file it points to.

This module knows files, not editors: `EditorBase.save_pretrained` hands it a `Saved`
and `from_pretrained` gets one back, upgraded to today's layout by `wise_edit.migrate`
whatever ``format_version`` wrote it (version 1: one set of file names per method).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..migrate import FORMAT_VERSION, upgrade_config, upgrade_state

CONFIG_FILE = "editor_config.json"
STATE_FILE = "editor_state.json"
TENSOR_FILE = "editor_model.safetensors"
# method -> (config, state, tensors) file names of format version 1
LEGACY_FILES = MappingProxyType(
    {
        "WISE": ("wise_config.json", "wise_state.json", "wise_memories.safetensors"),
        "FT-L": ("ft_l_config.json", "ft_l_state.json", "ft_l_delta.safetensors"),
        "FT-EWC": ("ft_ewc_config.json", "ft_ewc_state.json", "ft_ewc_delta.safetensors"),
        "GRACE": ("grace_config.json", "grace_state.json", "grace_codebook.safetensors"),
        "DEFER": ("defer_config.json", "defer_state.json", "defer_model.safetensors"),
    }
)
_LAYOUTS = ((CONFIG_FILE, STATE_FILE, TENSOR_FILE), *LEGACY_FILES.values())
# every name a save's own file may have: what a new save replaces; the rest is the user's
_SAVE_FILES = frozenset(name for layout in _LAYOUTS for name in layout)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # absent on Windows, which checks with lstat


class CorruptSaveError(ValueError):
    """A save whose files are unreadable or whose contents do not fit the model."""


class SaveLockedError(RuntimeError):
    """Another process is writing the save."""


class ForeignFolderError(ValueError):
    """The target folder holds something that is not a save we may replace."""


@dataclass
class Saved:
    """One save's contents: ``config`` holds the config fields (without ``method``),
    ``state`` the JSON state (fingerprint, edit log, the method's own fields)."""

    method: str
    config: dict[str, Any]
    state: dict[str, Any]
    tensors: dict[str, torch.Tensor]


# ---------------------------------------------------------------------- the folder
def _siblings(target: Path, kind: str) -> list[Path]:
    """Leftovers of earlier writes to ``target``: ``.NAME.tmp-*`` / ``.NAME.old-*``."""
    return sorted(target.parent.glob(f".{target.name}.{kind}-*"))


def save_layout(folder: Path) -> tuple[Path, Path, Path] | None:
    """The three files of the save in ``folder`` (current or old layout), or None."""
    for config, state, tensors in _LAYOUTS:
        if (folder / config).is_file():
            return folder / config, folder / state, folder / tensors
    return None


def _absolute(path: str | os.PathLike[str]) -> Path:
    """``path`` made absolute without resolving links: "." and "" get a name, so that the
    lock and the swap's side names lie beside the folder, not in it."""
    return Path(os.path.abspath(path))


def _refuse_working_folder(target: Path, given: str | os.PathLike[str]) -> None:
    """A save replaces its folder by renaming, so the working folder (or one holding it)
    cannot be one: the shell that ran the command would be left in a removed folder."""
    here = Path.cwd().resolve()
    if target.resolve() == here or target.resolve() in here.parents:
        raise ForeignFolderError(
            f"{given} is the current folder (or holds it): a save replaces its folder, which "
            "would leave this shell in a removed folder; choose a subfolder such as ./edits"
        )


def _open_plain(path: Path, flags: int) -> int:
    """``os.open`` that refuses a symbolic link as the last part of ``path``: the lock
    and owner files are wise-edit's own, and a link there (to a user's file, say) must
    not be written or truncated through."""
    if not _NOFOLLOW and path.is_symlink():  # Windows: no O_NOFOLLOW
        raise _link_error(path)
    try:
        return os.open(path, flags | _NOFOLLOW, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP or path.is_symlink():
            raise _link_error(path) from None
        raise


def _link_error(path: Path) -> ForeignFolderError:
    return ForeignFolderError(
        f"{path} is a symbolic link, not wise-edit's lock file; refusing to write through "
        "it (remove the link)"
    )


def check_target(path: str | os.PathLike[str], method: str, replace: bool = False) -> None:
    """Raise unless a save of ``method`` may be written to ``path``: a missing or empty
    folder, or a save of the same method (of any method with ``replace``). Called
    before any editing starts, so that nothing is computed for a save that would be
    refused."""
    target = _absolute(path)
    if not target.exists():
        if not target.parent.exists() or target.parent.is_dir():
            return
        raise ForeignFolderError(f"{target.parent} is not a folder")
    _refuse_working_folder(target, path)
    if not target.is_dir():
        raise ForeignFolderError(f"{target} is a file, not a folder for a save")
    if not any(target.iterdir()):
        return
    if save_layout(target) is None:
        raise ForeignFolderError(
            f"{target} is not empty and holds no wise-edit save; refusing to write there "
            "(choose a new or empty folder)"
        )
    found = saved_method(target)
    if found != method and not replace:
        raise ForeignFolderError(
            f"{target} holds a {found} save; refusing to replace it with {method} "
            "(use --force / replace=True)"
        )


class SaveFolder:
    """A save folder held under an exclusive lock (``.NAME.lock`` beside it; the owner's
    pid and host in ``.NAME.lock.owner``). Open it for as long as edits are being
    written to it: a second writer fails fast with `SaveLockedError`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = _absolute(path)
        self._lock: FileLock | None = None

    @property
    def lock_path(self) -> Path:
        return self.path.parent / f".{self.path.name}.lock"

    @property
    def owner_path(self) -> Path:
        return self.path.parent / f".{self.path.name}.lock.owner"

    def __enter__(self) -> SaveFolder:
        _refuse_working_folder(self.path, self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for own in (self.lock_path, self.owner_path):  # a clear refusal before filelock's
            if own.is_symlink():
                raise _link_error(own)
        lock = FileLock(self.lock_path, thread_local=False)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise SaveLockedError(
                f"{self.path} is being written by {self._owner()}; wait for it to finish"
            ) from None
        except OSError as err:  # filelock opens with O_NOFOLLOW: a link planted meanwhile
            if err.errno == errno.ELOOP or self.lock_path.is_symlink():
                raise _link_error(self.lock_path) from None
            raise
        try:
            # a writer killed while writing its owner file left it under a side name
            for stale in self.path.parent.glob(f"{self.owner_path.name}.tmp-*"):
                stale.unlink(missing_ok=True)
            _replace_text(self.owner_path, f"pid {os.getpid()} on {socket.gethostname()}\n")
            recover(self.path)
        except BaseException:
            lock.release()
            raise
        self._lock = lock
        return self

    def _owner(self) -> str:
        """Who holds the lock, as its owner file says (read without following a link,
        and at most a line of it)."""
        try:
            fd = _open_plain(self.owner_path, os.O_RDONLY)
        except (OSError, ForeignFolderError):
            return "another process"
        with os.fdopen(fd, "rb") as handle:
            text = handle.read(200).decode("utf-8", "replace").strip()
        return text.splitlines()[0] if text else "another process"

    def __exit__(self, *exc: object) -> None:
        if self._lock is not None:
            self.owner_path.unlink(missing_ok=True)
            self._lock.release()
            self._lock = None

    def write(self, saved: Saved) -> None:
        """Write ``saved`` beside the current save, then swap it in: at every instant a
        complete save exists, at ``path`` or (between the two renames) under
        ``.NAME.old-*``, where the next `recover` finds it. What else the old folder
        holds (the user's files) is moved into the new one after the swap."""
        if self._lock is None:
            raise RuntimeError("SaveFolder.write outside `with SaveFolder(...)`")
        target = self.path
        for stale in _siblings(target, "tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            _write_files(tmp, saved)
            if target.exists():
                old = target.parent / f".{target.name}.old-{os.getpid()}"
                target.rename(old)
                tmp.rename(target)
                _move_users_entries(old, target)
                shutil.rmtree(old)
            else:
                tmp.rename(target)
            _fsync_dir(target.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _replace_text(path: Path, text: str) -> None:
    """Put ``text`` at ``path`` by writing a new file and renaming it over: never written
    through a link or into a file another name shares (a hard link)."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    fd = _open_plain(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def _move_users_entries(old: Path, target: Path) -> None:
    """Move what is not a save file (what a user put beside the save) from the replaced
    save folder ``old`` into the save at ``target``."""
    for entry in sorted(old.iterdir()):
        if entry.name not in _SAVE_FILES and not os.path.lexists(target / entry.name):
            entry.rename(target / entry.name)


def recover(path: str | os.PathLike[str]) -> None:
    """Put right what a crash during a swap left: if the save itself is missing, the
    previous one (kept under ``.NAME.old-*``) is renamed back; if it is there, the
    user's files still in an old one are moved into it before the old one goes."""
    target = _absolute(path)
    olds = _siblings(target, "old")
    if not target.exists() and olds and save_layout(olds[-1]) is not None:
        olds[-1].rename(target)
        olds = olds[:-1]
    if target.exists():
        for old in olds:
            _move_users_entries(old, target)
            shutil.rmtree(old, ignore_errors=True)


def write_save(path: str | os.PathLike[str], saved: Saved, replace: bool = False) -> None:
    """Check the target, lock it, write: the whole of `EditorBase.save_pretrained`."""
    check_target(path, saved.method, replace)
    with SaveFolder(path) as folder:
        folder.write(saved)


# ---------------------------------------------------------------------- the files
def _write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=True, allow_nan=True) + "\n"
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _write_files(folder: Path, saved: Saved) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in saved.tensors.items()}
    save_file(
        tensors,
        str(folder / TENSOR_FILE),
        metadata={"format": "wise-edit", "method": saved.method, "version": str(FORMAT_VERSION)},
    )
    with open(folder / TENSOR_FILE, "rb") as handle:
        os.fsync(handle.fileno())
    state = {
        "format_version": FORMAT_VERSION,
        "method": saved.method,
        "tensor_sha256": _sha256(folder / TENSOR_FILE),
        **saved.state,
    }
    _write_json(folder / CONFIG_FILE, {"method": saved.method, **saved.config})
    _write_json(folder / STATE_FILE, state)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _located(folder: Path) -> Path:
    """Where the save at ``folder`` is: the folder itself, or while a writer swaps (or
    after one crashed mid-swap) the previous save under ``.NAME.old-*``."""
    for _ in range(40):
        if folder.exists() or not _siblings(folder, "old"):
            return folder
        time.sleep(0.05)
    olds = [old for old in _siblings(folder, "old") if save_layout(old) is not None]
    return olds[-1] if olds else folder


def _files(folder: Path) -> tuple[Path, Path, Path]:
    layout = save_layout(_located(folder))
    if layout is None:
        raise FileNotFoundError(f"{folder} is not a wise-edit save (no {CONFIG_FILE})")
    return layout


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptSaveError(f"{path}: unreadable JSON ({err})") from None
    except RecursionError:  # nested deeper than the parser's stack: not a save we wrote
        raise CorruptSaveError(f"{path}: unreadable JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise CorruptSaveError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def saved_config(path: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    """The method a save was written by and its config fields (reads only the small
    JSON files)."""
    config_file, state_file, _ = _files(Path(path))
    config = _read_json(config_file)
    method = config.pop("method", None)
    if method is None and state_file.is_file():  # format 1 kept it in the state only
        method = _read_json(state_file).get("method")
    if not isinstance(method, str):
        raise CorruptSaveError(f"{config_file}: the save does not say which method wrote it")
    version = _read_json(state_file).get("format_version", 1) if state_file.is_file() else 1
    return method, upgrade_config(method, config, version if isinstance(version, int) else 1)


def saved_method(path: str | os.PathLike[str]) -> str:
    """The method name a save was written by."""
    return saved_config(path)[0]


def read_save(path: str | os.PathLike[str], attempts: int = 3) -> Saved:
    """The save's contents, its files checked for completeness and integrity (the
    tensor file against its recorded sha256); what they hold is checked by the method.
    A read that overlapped a writer's swap is done again."""
    folder = Path(path)
    for attempt in range(attempts):
        before = _identity(folder)
        try:
            saved = _read_once(folder)
        except (CorruptSaveError, FileNotFoundError):
            if attempt + 1 == attempts or _identity(folder) == before:
                raise
            continue
        if _identity(folder) == before:
            return saved
    raise CorruptSaveError(f"{folder}: the save kept changing while it was read")


def _identity(folder: Path) -> tuple[int, int] | None:
    try:
        stat = folder.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _read_once(folder: Path) -> Saved:
    config_file, state_file, tensor_file = _files(folder)
    missing = [f.name for f in (state_file, tensor_file) if not f.is_file()]
    if missing:
        raise CorruptSaveError(f"{folder} is an incomplete save (missing {', '.join(missing)})")
    config = _read_json(config_file)
    state = _read_json(state_file)
    version = state.get("format_version")
    if version not in range(1, FORMAT_VERSION + 1):
        raise CorruptSaveError(
            f"{state_file}: unsupported format_version {state.get('format_version')!r}"
        )
    expected = state.get("tensor_sha256")
    if expected is not None and expected != _sha256(tensor_file):
        raise CorruptSaveError(
            f"{tensor_file}: contents do not match the sha256 recorded in {state_file.name} "
            "(the file was changed or damaged)"
        )
    try:
        tensors = load_file(str(tensor_file))
    except (SafetensorError, OSError, ValueError) as err:
        raise CorruptSaveError(f"{tensor_file}: unreadable ({err})") from None
    method = config.pop("method", None) or state.get("method")
    if not isinstance(method, str):
        raise CorruptSaveError(f"{config_file}: the save does not say which method wrote it")
    config = upgrade_config(method, config, version)
    state, tensors = upgrade_state(method, state, tensors, version)
    return Saved(method, config, state, tensors)
