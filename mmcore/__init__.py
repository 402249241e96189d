"""mmcore: fused kernels and thin models for grounded (KOSMOS-2) and concatenated-sample (COSA)
vision-language models.

Layers: ``mmcore.ops`` (public functional API and backend dispatch), ``mmcore.grounding`` (location tokens
and grounded text), ``mmcore.kernels`` (Triton kernels, imported only when Triton is), ``mmcore._C`` (the
compiled extension, optional at import: without it the PyTorch reference backends run).
"""

__version__ = "0.1.0"

from mmcore import (
    grounding,  # noqa: E402
    ops,  # noqa: E402  (registers the custom ops)
)

__all__ = ["__version__", "grounding", "ops"]
