import pytest

from mmcore.testing import make_kosmos2_tokenizer


@pytest.fixture
def kosmos2_tokenizer():
    """A fresh small Kosmos-2-style tokenizer (``mmcore.testing.make_kosmos2_tokenizer``): ``<s>`` 0, ``<pad>`` 1,
    ``</s>`` 2, ``<unk>`` 3, 196 BPE pieces; no tag or location tokens until a processor adds them."""
    pytest.importorskip("transformers")
    return make_kosmos2_tokenizer()
