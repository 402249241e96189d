"""Kosmos-2 prompt formats, in one place (shared/research/kosmos2.md section 1.11, the seed deck's Table 9).

Each function returns the text a processor tokenises after the image tokens; the model continues it.
Boxes are written with the released checkpoints' tokens: a phrase followed by
``<object><patch_index_UL><patch_index_LR></object>``.
"""

from __future__ import annotations

from mmcore.grounding.text import to_grounded_text

GROUNDING = "<grounding>"

# The seed deck's instruction templates for referring-expression generation (its Table 9), verbatim; the
# word just before ``<box>`` is the phrase the box grounds.
INSTRUCTION_TEMPLATES = (
    "What is it <box>? It is {expression}.",
    "What is this <box>? This is {expression}.",
    "Describe this object <box>. This object is {expression}.",
    "It <box> is {expression}.",
    "This <box> is {expression}.",
    "The object <box> is {expression}.",
)


def _box_after_word(text: str, box, num_bins: int, rounding: str) -> str:
    """Turn ``... word <box> ...`` into ``...<phrase> word</phrase><object>...</object> ...``."""
    if text.count("<box>") != 1:
        raise ValueError(f"a template needs exactly one '<box>' slot, got {text!r}")
    before, after = text.split("<box>")
    before = before.rstrip()
    start = before.rfind(" ") + 1
    if start >= len(before):
        raise ValueError(f"'<box>' must follow a word in {text!r}")
    clean = before + after
    return to_grounded_text(clean, [("", (start, len(before)), [box])], num_bins, rounding)


def grounded_caption(detailed: bool = False) -> str:
    """Grounded captioning: ``<grounding> An image of`` or ``<grounding> Describe this image in detail:``."""
    return f"{GROUNDING} Describe this image in detail:" if detailed else f"{GROUNDING} An image of"


def phrase_grounding(phrase: str) -> str:
    """Phrase grounding and referring-expression comprehension: ``<grounding><phrase> a snowman</phrase>``;
    the model answers with ``<object><patch_index_..><patch_index_..></object>``."""
    if not isinstance(phrase, str) or not phrase.strip() or "<" in phrase:
        raise ValueError(f"phrase must be non-empty text without '<', got {phrase!r}")
    return f"{GROUNDING}<phrase> {phrase.strip()}</phrase>"


referring_expression_comprehension = phrase_grounding


def referring_expression_generation(box, subject: str = "It", num_bins: int = 32, rounding: str = "hf") -> str:
    """``<grounding><phrase> It</phrase><object><patch_index_0044><patch_index_0863></object> is``: the model
    describes the region. ``box`` is ``(x1, y1, x2, y2)`` normalised or a ``(top_left, bottom_right)`` pair."""
    return GROUNDING + _box_after_word(f" {subject} <box> is", box, num_bins, rounding)


def grounded_vqa(question: str) -> str:
    """``<grounding> Question: What is special about this image? Answer:``"""
    return f"{GROUNDING} Question: {question.strip()} Answer:"


def caption() -> str:
    """Plain (ungrounded) captioning."""
    return "An image of"


def vqa(question: str) -> str:
    """Plain (ungrounded) VQA: ``Question: ... Answer:``."""
    return f"Question: {question.strip()} Answer:"


def instruction_sample(expression: str, box, template: int | str = 0, num_bins: int = 32, rounding: str = "hf") -> str:
    """An instruction-tuning sample for expression generation from a GRIT expression and its box, e.g.
    ``What is<phrase> it</phrase><object>...</object>? It is a red car.`` (template 0 of
    INSTRUCTION_TEMPLATES, or any string with one ``<box>`` and ``{expression}``)."""
    if isinstance(template, int):
        if not 0 <= template < len(INSTRUCTION_TEMPLATES):
            raise ValueError(f"template index must be in [0, {len(INSTRUCTION_TEMPLATES)}), got {template}")
        template = INSTRUCTION_TEMPLATES[template]
    if "{expression}" not in template:
        raise ValueError(f"template needs an '{{expression}}' slot, got {template!r}")
    return _box_after_word(template.replace("{expression}", expression.strip()), box, num_bins, rounding)
