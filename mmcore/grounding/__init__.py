"""Location tokens and grounded text for Kosmos-2 style models.

Boxes <-> location indices (``boxes_to_loc_indices``, ``loc_indices_to_boxes``), indices <-> token ids,
grounded strings -> clean text + entities (``extract_entities``, ``extract_entities_batch``) and back
(``to_grounded_text``), and markdown links for people (``to_markdown``).
"""

from mmcore.grounding import prompts
from mmcore.grounding.entities import cell_pair_to_box, extract_entities, extract_entities_batch, extract_entities_ref
from mmcore.grounding.text import grounded_text_to_markdown, to_grounded_text, to_markdown
from mmcore.grounding.tokens import (
    FIRST_LOC_TOKEN_ID,
    TAG_TOKENS,
    is_loc_token,
    loc_indices_to_token_ids,
    loc_token,
    loc_tokens,
    token_ids_to_loc_indices,
)
from mmcore.ops.grounding import ROUNDINGS, boxes_to_loc_indices, loc_indices_to_boxes

__all__ = [
    "FIRST_LOC_TOKEN_ID",
    "ROUNDINGS",
    "TAG_TOKENS",
    "boxes_to_loc_indices",
    "cell_pair_to_box",
    "extract_entities",
    "extract_entities_batch",
    "extract_entities_ref",
    "grounded_text_to_markdown",
    "is_loc_token",
    "loc_indices_to_boxes",
    "loc_indices_to_token_ids",
    "loc_token",
    "loc_tokens",
    "prompts",
    "to_grounded_text",
    "to_markdown",
    "token_ids_to_loc_indices",
]
