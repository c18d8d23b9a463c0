"""The benchmark scripts, driven with stand-in commands on PATH so that no model runs."""

import os
from pathlib import Path


def with_stand_in(tmp_path: Path, name: str, script: str, **settings: str) -> dict[str, str]:
    """The environment of a script run where the command ``name`` is ``script`` (which
    may append its arguments to $CALLS), with OUT in ``tmp_path`` and ``settings``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / name
    fake.write_text(script)
    fake.chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "CALLS": str(tmp_path / "calls.txt"),
        "OUT": str(tmp_path / "out"),
        **settings,
    }
