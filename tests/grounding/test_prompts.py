import pytest

from mmcore.grounding import extract_entities, prompts


def test_prompt_strings():
    assert prompts.grounded_caption() == "<grounding> An image of"
    assert prompts.grounded_caption(detailed=True) == "<grounding> Describe this image in detail:"
    assert prompts.phrase_grounding(" a snowman ") == "<grounding><phrase> a snowman</phrase>"
    assert prompts.referring_expression_comprehension("a dog") == "<grounding><phrase> a dog</phrase>"
    assert prompts.grounded_vqa("What is special about this image?") == (
        "<grounding> Question: What is special about this image? Answer:"
    )
    assert prompts.vqa("Why?") == "Question: Why? Answer:"
    assert prompts.caption() == "An image of"


def test_referring_expression_generation_matches_the_model_card():
    assert prompts.referring_expression_generation((0.39, 0.05, 0.98, 0.83)) == (
        "<grounding><phrase> It</phrase><object><patch_index_0044><patch_index_0863></object> is"
    )
    assert prompts.referring_expression_generation((44, 863)) == prompts.referring_expression_generation(
        (0.39, 0.05, 0.98, 0.83)
    )


@pytest.mark.parametrize("index", range(len(prompts.INSTRUCTION_TEMPLATES)))
def test_instruction_templates_ground_the_word_before_the_box(index):
    sample = prompts.instruction_sample("a red car", (0.39, 0.05, 0.98, 0.83), template=index)
    clean, entities = extract_entities(sample)
    assert clean == prompts.INSTRUCTION_TEMPLATES[index].replace(" <box>", "").format(expression="a red car").strip()
    ((name, _, boxes),) = entities
    assert name == prompts.INSTRUCTION_TEMPLATES[index].split(" <box>")[0].split()[-1]
    assert boxes == [(0.390625, 0.046875, 0.984375, 0.828125)]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: prompts.phrase_grounding(""), "non-empty"),
        (lambda: prompts.phrase_grounding("a <b>"), "without '<'"),
        (lambda: prompts.instruction_sample("x", (0, 1), template=9), "template index"),
        (lambda: prompts.instruction_sample("x", (0, 1), template="no slot"), "expression"),
        (lambda: prompts.instruction_sample("x", (0, 1), template="<box> is {expression}"), "must follow a word"),
        (lambda: prompts.referring_expression_generation((0.5, 0.5, 0.4, 0.9)), "x2 > x1"),
    ],
)
def test_bad_prompt_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
