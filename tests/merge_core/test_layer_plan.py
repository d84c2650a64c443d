import pytest

from merge_core import LayerPlan, SelfMergeError
from merge_core.architectures import find
from merge_core.layer_plan import Scales
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


def test_scaled_plans_act_on_second_and_later_uses_only():
    plan = LayerPlan.parse("a:0-16,a:8-30,b:10-30@qk=0.7071,mlp_out=0.5")
    assert str(plan) == "a:0-16,a:8-30,b:10-30@qk=0.7071,mlp_out=0.5" and LayerPlan.parse(str(plan)) == plan
    assert plan.scales == Scales(qk=0.7071, attn_out=1.0, mlp_out=0.5)
    scaled = [position for position, scales in enumerate(plan.layer_scales) if not scales.is_identity]
    assert scaled == list(range(16, 24))  # a's 8-15 again; b's layers are other weights, first used
    assert str(LayerPlan.parse("0-16,8-30@attn_out=0.5,mlp_out=0.5")) == "0-16,8-30@out=0.5"
    assert LayerPlan.parse("0-16,8-30@qk=1,out=1") == LayerPlan.parse("0-16,8-30")  # factors of 1: today's plan
    assert plan.unscaled() == LayerPlan.parse("a:0-16,a:8-30,b:10-30") and plan.unscaled() != plan


@pytest.mark.parametrize(
    "text, message",
    [("0-16,8-30@qk=-0.5", r"scale qk=-0.5 is not a positive number"),
     ("0-16,8-30@qk=0", r"scale qk=0.0 is not a positive number"),
     ("0-16,8-30@qk=nan", r"scale qk=nan is not a positive number"),
     ("0-16,8-30@qk=half", r"scale qk='half' is not a number"),
     ("0-16,8-30@v=0.5", r"scale 'v=0.5' names no factor: use qk, out, attn_out, mlp_out"),
     ("0-16,8-30@out=0.5,mlp_out=1", r"set mlp_out twice"),
     ("0-16,8-30@", r"ends at '@'"),
     ("0-30@qk=0.5", r"plan 0-30 repeats no layer, so its scales \(qk=0.5\) would change nothing")],
)  # fmt: skip
def test_bad_scales_are_one_line_errors(text, message):
    with pytest.raises(SelfMergeError, match=message):
        LayerPlan.parse(text)


LLAMA = find("LlamaForCausalLM")
# mergekit issue #198's attenuation, as its users write it: YAML anchors, one-layer slices for the repeats
HAND_WRITTEN_198 = """
const_tag: &attn_scale_factor 0.7071067812
const_tag: &out_scale_factor 0.5
attenuate-env: &attenuated_env
  parameters:
    scale:
      - filter: q_proj
        value: *attn_scale_factor
      - filter: k_proj
        value: *attn_scale_factor
      - filter: down_proj
        value: *out_scale_factor
      - value: 1.0
slices:
  - sources: [{model: org/m, layer_range: [0, 6]}]
  - sources:
    - model: org/m
      layer_range: [4, 5]
      <<: *attenuated_env
  - sources:
    - model: org/m
      layer_range: [5, 6]
      <<: *attenuated_env
  - sources: [{model: org/m, layer_range: [6, 12]}]
merge_method: passthrough
dtype: bfloat16
"""


def test_attenuated_recipes_round_trip_and_hand_written_ones_read_back():
    for text in ["0-16,8-30@qk=0.7071067812,mlp_out=0.5", "0-10,5-12,10-20@out=0.5", "0-4,2-6,3-6@attn_out=0.25"]:
        plan = LayerPlan.parse(text)
        assert plan_from_mergekit_yaml(plan_to_mergekit_yaml(plan, "org/m", arch=LLAMA)) == (plan, "org/m")
    # the #198 recipe: the same stack (a slice cut where its scales end is joined), its factors the plan's
    assert str(plan_from_mergekit_yaml(HAND_WRITTEN_198)[0]) == "0-6,4-5,5-12@qk=0.7071067812,mlp_out=0.5"
    recipe = plan_to_mergekit_yaml(LayerPlan.parse("0-16,8-30@qk=0.5"), "org/m", arch=find("Qwen3ForCausalLM"))
    assert "filter: q_norm" in recipe and "q_proj" not in recipe  # Qwen3 normalises q after its projection
    with pytest.raises(SelfMergeError, match="needs the model's architecture"):
        plan_to_mergekit_yaml(LayerPlan.parse("0-16,8-30@qk=0.5"), "org/m")
    with pytest.raises(SelfMergeError, match="scales self_attn.q_norm, which gemma3 stores as weight - 1"):
        plan_to_mergekit_yaml(LayerPlan.parse("0-16,8-30@qk=0.5"), "org/m", arch=find("Gemma3ForCausalLM"))


@pytest.mark.parametrize(
    "change, message",
    [(("filter: down_proj", "filter: v_proj"), r"slice 2 of the mergekit recipe scales 'v_proj' by 0.5: selfmerge "
                                               r"scales only q_proj, k_proj, o_proj, down_proj, q_norm"),
     (("value: *attn_scale_factor\n      - filter: k_proj\n        value: *attn_scale_factor",
       "value: 0.5\n      - filter: k_proj\n        value: 0.25"), r"scales 'k_proj' by 0.25 but another qk tensor by 0.5"),
     (("[0, 6]", "[0, 4]"), r"slice 2 of the mergekit recipe scales the first use of layer 4 \(qk=0.7071067812,"),
     (("[{model: org/m, layer_range: [6, 12]}]", "[{model: org/m, layer_range: [6, 12]}]\n  - sources:\n    - model: "
       "org/m\n      layer_range: [9, 12]"), r"slice 5 of the mergekit recipe leaves a repeat of layer 9 unscaled, another repeat by qk=0.7071067812,"),
     (("      - value: 1.0", "      - value: 0.9"), "scales every tensor by 0.9"),
     (("value: *out_scale_factor", "value: [0.5, 1.0]"), r"scales down_proj by \[0.5, 1.0\], not a number")],
)  # fmt: skip
def test_attenuated_recipes_a_plan_cannot_say_are_refused_naming_the_key(change, message):
    text = HAND_WRITTEN_198.replace(*change)
    assert text != HAND_WRITTEN_198
    with pytest.raises(SelfMergeError, match=message):
        plan_from_mergekit_yaml(text)
