"""The model card written with every merge: what a model hub shows, and never a user's README lost."""

import yaml

from merge_core.layer_plan import LayerPlan
from merge_core.model_card import CardFacts, Score, base_licence, card_path, write_card
from merge_core.model_shape import ModelShape

from conftest import run_cli


def test_merge_writes_a_card_a_hub_can_show(base_gguf, tmp_path):
    out = tmp_path / "m" / "merged.gguf"
    run_cli("merge", "bundled", "--plan", "0-16,8-30", "--out", str(out), cwd=tmp_path, check=True)
    card = (out.parent / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == ["HuggingFaceTB/SmolLM2-135M-Instruct"] and front["license"] == "apache-2.0"
    shape = ModelShape.of(base_gguf)
    params = shape.params_of(LayerPlan.parse("0-16,8-30"))
    assert "| plan | `0-16,8-30` | `0-30` |" in card and "| layers | 38 | 30 |" in card
    assert f"{params / 1e6:,.1f}M ({params / shape.n_params:.2f}x)" in card
    assert "layer_range: [8, 30]" in card and "selfmerge merge bundled --plan 0-16,8-30 --out merged.gguf" in card


def test_a_users_readme_is_never_overwritten(base_gguf, tmp_path):
    (tmp_path / "README.md").write_text("my own notes\n")
    facts = CardFacts("org/base", LayerPlan.parse("0-16,8-30"), ModelShape.of(base_gguf), base_licence(base_gguf),
                      (Score("ppl", 12.5, 10.7),), "ppl on 4 windows")  # fmt: skip
    path = write_card(tmp_path / "merged.gguf", facts)
    assert path == tmp_path / "merged.gguf.README.md" and (tmp_path / "README.md").read_text() == "my own notes\n"
    assert "| ppl | 12.5 | 10.7 |" in path.read_text()
    (tmp_path / "README.md").unlink()
    assert card_path(tmp_path / "merged.gguf") == tmp_path / "README.md"  # ours, or none: written beside
    folder = tmp_path / "folder"
    folder.mkdir()
    assert write_card(folder, facts) == folder / "README.md"  # a safetensors folder holds its own card
