import pytest
import torch

from mmcore.testing import make_kosmos2_tokenizer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models spend their time in OpenMP hand-offs on a shared 2-core machine (a 32-wide linear took ~1 ms with
    2 threads under load); one thread is several times faster here. Restored after each module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def kosmos2_checkpoint(tmp_path_factory):
    """A tiny random Kosmos-2 checkpoint (transformers' layout) with its processor, saved once per session."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("PIL")
    from mmcore.models.kosmos2 import Kosmos2Processor

    folder = tmp_path_factory.mktemp("kosmos2_tiny_eval")
    processor = Kosmos2Processor(make_kosmos2_tokenizer(), image_size=32, num_image_tokens=3)
    vocab = len(processor.tokenizer)
    text = dict(vocab_size=vocab, embed_dim=32, layers=2, attention_heads=4, ffn_dim=37, max_position_embeddings=256)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=37)  # fmt: skip
    torch.manual_seed(0)
    config = transformers.Kosmos2Config(text_config=text, vision_config=vision, latent_query_num=3)
    transformers.Kosmos2ForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
