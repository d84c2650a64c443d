import pytest

from merge_core import LayerPlan, SelfMergeError
from merge_core.mergekit_recipe import plan_from_mergekit_yaml, plan_to_mergekit_yaml


def test_parse_print_round_trip():
    for text in ["0-16,8-30", "0-10,6-16,12-22,18-30", "0-30", "5-6"]:
        assert str(LayerPlan.parse(text)) == text
    assert str(LayerPlan.parse(" 0 - 16 , 8-30 ")) == "0-16,8-30"


def test_derived_figures_of_the_four_slice_plan():
    plan = LayerPlan.parse("0-10,6-16,12-22,18-30")
    assert plan.n_layers == 42
    assert plan.slice_sizes == (10, 10, 10, 12)
    assert plan.backward_jumps == (4, 4, 4)
    assert plan.layer_indices[:12] == (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 6, 7)
    counts = plan.repeat_counts()
    assert counts[0] == 1 and counts[6] == 2 and counts[29] == 1 and len(counts) == 30
    assert plan.max_repeats == 2


def test_skipped_layers_give_negative_jump_and_are_absent():
    plan = LayerPlan.parse("0-10,12-30")
    assert plan.backward_jumps == (-2,)
    assert 10 not in plan.repeat_counts() and 11 not in plan.repeat_counts()


def test_identity():
    plan = LayerPlan.identity(30)
    assert str(plan) == "0-30" and plan.is_identity(30) and not LayerPlan.parse("0-16,8-30").is_identity(30)


def test_plans_are_immutable_values():
    a, b = LayerPlan.parse("0-16,8-30"), LayerPlan(((0, 16), (8, 30)))
    assert a == b and hash(a) == hash(b)
    with pytest.raises(AttributeError):
        a.slices = ()


def test_validation_names_the_bad_slice():
    with pytest.raises(SelfMergeError, match=r"slice 3 \(22-34\) ends past layer 30"):
        LayerPlan.parse("0-12,8-24,22-34").validate(30)
    assert LayerPlan.parse("0-16,8-30").validate(30).n_layers == 38


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty layer plan"),
        ("0-16;8-30", r"slice 1 \('0-16;8-30'\)"),
        ("0-16,abc", r"slice 2 \('abc'\) of plan"),
        ("0-16,20-20", r"slice 2 \(20-20\) is empty"),
        ("0-16,-3-5", r"slice 2 \('-3-5'\)"),
    ],
)
def test_bad_text_raises_clear_errors(text, message):
    with pytest.raises(SelfMergeError, match=message):
        LayerPlan.parse(text)


def test_mergekit_yaml_round_trip():
    plan = LayerPlan.parse("0-10,6-16,12-22,18-30")
    text = plan_to_mergekit_yaml(plan, "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert "merge_method: passthrough" in text and "layer_range: [6, 16]" in text
    back, model = plan_from_mergekit_yaml(text)
    assert back == plan and model == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_mergekit_yaml_written_by_hand():
    text = """
slices:
  - sources:
      - model: mistralai/Mistral-7B-v0.1
        layer_range: [0, 24]
  - sources:
      - model: mistralai/Mistral-7B-v0.1
        layer_range: [8, 32]
merge_method: passthrough
dtype: float16
"""
    plan, model = plan_from_mergekit_yaml(text)
    assert str(plan) == "0-24,8-32" and model == "mistralai/Mistral-7B-v0.1"


@pytest.mark.parametrize(
    "text, message",
    [
        ("slices: [}", "not valid YAML"),
        ("merge_method: passthrough", "no 'slices' list"),
        ("slices: []\nmerge_method: slerp", "only 'passthrough'"),
        ("slices:\n  - sources:\n      - model: a\n        layer_range: [0, 4]\n  - sources:\n      - model: b\n        layer_range: [2, 8]\n", "names \\['a', 'b'\\]"),
        ("slices:\n  - sources:\n      - model: a\n", "layer_range"),
    ],
)
def test_bad_mergekit_yaml(text, message):
    with pytest.raises(SelfMergeError, match=message):
        plan_from_mergekit_yaml(text)
