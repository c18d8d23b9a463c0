"""Starting a server: `wise-edit serve` checks its settings before the model loads."""

from wise_edit.cli import main


def test_refuses_a_public_address_without_a_token(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WISE_EDIT_TOKEN", raising=False)
    argv = ["serve", "--model", model_dir, "--state", str(tmp_path / "s"), "--host", "0.0.0.0"]
    assert main(argv) == 2
    assert "without a token" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
