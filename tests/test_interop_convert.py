"""``vlkit convert`` writes its output folder whole: ``--force`` replaces an earlier export
instead of mixing old files with new ones, and a folder that holds the source is refused."""

from __future__ import annotations

import pytest
import torch

import vlkit
from vlkit.cli import main
from vlkit.errors import VlkitError
from vlkit.interop.export import to_hf

from _interop_util import tiny_clip_folder

PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_force_replaces_an_earlier_export(tmp_path, capsys):
    a, b = tiny_clip_folder(tmp_path / "a", seed=0), tiny_clip_folder(tmp_path / "b", seed=1)
    dst = tmp_path / "dst"
    assert main(["convert", "--to", "hf", str(a), str(dst)]) == 0
    assert main(["convert", "--to", "open_clip", "--force", str(b), str(dst)]) == 0
    assert "config.json" not in {p.name for p in dst.iterdir()}  # the hf export's files are gone
    want = vlkit.load(b).encode_image(PIXELS)
    assert torch.allclose(vlkit.load(dst).encode_image(PIXELS), want, atol=1e-6)
    assert f"wrote {dst}" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dst")]  # no temporary folders left


def test_non_empty_destination_needs_force(tmp_path):
    a = tiny_clip_folder(tmp_path / "a")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("x")
    assert main(["convert", "--to", "hf", str(a), str(tmp_path / "dst")]) == 2
    with pytest.raises(VlkitError, match="not empty.*overwrite=True"):
        to_hf(vlkit.load(a), tmp_path / "dst")
    assert (tmp_path / "dst" / "keep.txt").read_text() == "x"


@pytest.mark.parametrize("where", ["same", "parent"])
def test_destination_holding_the_source_is_refused(tmp_path, capsys, where):
    run = tmp_path / "run"
    a = tiny_clip_folder(run / "model")
    dst = a if where == "same" else run
    assert main(["convert", "--to", "hf", "--force", str(a), str(dst)]) == 2
    assert "holds the source" in capsys.readouterr().err
    assert (a / "model.safetensors").is_file()


def test_failed_export_leaves_the_old_folder(tmp_path, monkeypatch, capsys):
    a, b = tiny_clip_folder(tmp_path / "a", seed=0), tiny_clip_folder(tmp_path / "b", seed=1)
    dst = tmp_path / "dst"
    assert main(["convert", "--to", "hf", str(a), str(dst)]) == 0
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    from vlkit.interop import export

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "_write_json", broken)  # fails after the new weights are written
    assert main(["convert", "--to", "hf", "--force", str(b), str(dst)]) == 2
    assert "disk full" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dst")]
