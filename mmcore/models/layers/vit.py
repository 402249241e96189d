"""The CLIP vision transformer (ViT) as Kosmos-2 and COSA use it: every attention through ``mmcore.ops.attention``.

pixels (batch, 3, H, W) -> conv patches (no bias) -> [CLS] + patches + position embedding -> pre-LayerNorm ->
``num_layers`` x pre-LN blocks (bidirectional attention, MLP with quick-GELU) -> post-LayerNorm on every token
(Kosmos-2 and COSA both take all tokens, not only [CLS]).

Position embeddings: ``"learned"`` (CLIP's, one row per token) or ``"sincos2d"`` -- fixed 2D sin-cos embeddings of
the patch grid (MAE's layout: half the channels encode the row, half the column; [CLS] gets zeros), useful when a
small model must learn positions from scratch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmcore import ops

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}
POSITION_EMBEDDINGS = ("learned", "sincos2d")


def _quick_gelu_(x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """quick-GELU of ``x + bias`` in x's own buffer (x contiguous, (..., n), bias (n,) or None), 256 rows at a time so
    that the one temporary stays in cache: the MLP's (tokens, intermediate) activation is the largest tensor of a ViT
    block. The activation is the same operations as ``ACTIVATIONS["quick_gelu"]``; the bias, added here rather than
    by fc1's addmm (which first writes the broadcast bias over the whole output, then accumulates into it), costs no
    pass of its own -- the sum differs from addmm's in the last bits (MKL folds the bias into its accumulation).
    Measured at the 50M Kosmos-2 benchmark's 8 images x 257 tokens x 1,024, 2 CPU cores: the in-place activation saves
    ~3 ms a layer, the bias fold ~1.5 ms more."""
    for rows in x.view(-1, x.shape[-1]).split(256):
        if bias is not None:
            rows.add_(bias)
        rows.mul_(torch.mul(rows, 1.702).sigmoid_())
    return x


@dataclass
class ViTConfig:
    """A CLIP ViT. The defaults are ViT-L/14 at 224 (257 tokens), Kosmos-2's vision encoder."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    attention_dropout: float = 0.0
    position_embedding: str = "learned"

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "image_size", "patch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ViTConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"ViTConfig.hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"ViTConfig.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"ViTConfig.hidden_act must be one of {sorted(ACTIVATIONS)}, got {self.hidden_act!r}")
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(
                f"ViTConfig.position_embedding must be one of {POSITION_EMBEDDINGS}, got {self.position_embedding!r}"
            )
        if self.position_embedding == "sincos2d" and self.hidden_size % 4:
            raise ValueError(f"sincos2d position embeddings need hidden_size % 4 == 0, got {self.hidden_size}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        """Tokens per image: patches + [CLS]."""
        return self.grid * self.grid + 1


def sincos_2d(grid: int, dim: int, cols: int | None = None) -> torch.Tensor:
    """(grid * cols + 1, dim) float32 (cols defaults to grid): row 0 ([CLS]) zeros; patch (r, c) gets
    [sin/cos of r | sin/cos of c], each half with frequencies 10000**(-k / (dim/4)), k < dim/4."""
    quarter = dim // 4
    freq = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64),
        torch.arange(grid if cols is None else cols, dtype=torch.float64),
        indexing="ij",
    )

    def encode(pos):
        angle = pos.reshape(-1, 1) * freq[None, :]
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    patches = torch.cat([encode(rows), encode(cols)], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), patches]).float()


def check_pixels(pixel_values, channels: int, size: int | None = None, *, min_side: int = 1, hint: str = "") -> None:
    """pixel_values must be a floating (batch, channels, size, size) tensor; size None: any H, W >= min_side."""
    shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
    note = f" ({hint})" if hint else ""
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or pixel_values.shape[1] != channels:
        want = f"{size}, {size}" if size is not None else "H, W"
        raise ValueError(f"pixel_values must have shape (batch, {channels}, {want}), got {shape}{note}")
    if size is not None and pixel_values.shape[2:] != (size, size):
        raise ValueError(f"pixel_values must have shape (batch, {channels}, {size}, {size}), got {shape}{note}")
    if min(pixel_values.shape[2:]) < min_side:
        raise ValueError(f"pixel_values must be at least {min_side} x {min_side} pixels (one patch), got {shape}")
    if not pixel_values.is_floating_point():
        raise TypeError(f"pixel_values must be floating point, got {pixel_values.dtype}")


class ViTAttention(nn.Module):
    """Bidirectional multi-head self-attention; q, k, v from one fused projection."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.head_dim, self.dropout = heads, dim // heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, tokens, dim) -> (batch, tokens, dim)."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).unbind(2)
        out = ops.attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.reshape(b, n, -1))


class ViTBlock(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        d, eps = config.hidden_size, config.layer_norm_eps
        self.norm1 = nn.LayerNorm(d, eps=eps)
        self.attn = ViTAttention(d, config.num_heads, config.attention_dropout)
        self.norm2 = nn.LayerNorm(d, eps=eps)
        self.fc1 = nn.Linear(d, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, d)
        self.act = ACTIVATIONS[config.hidden_act]
        self.act_inplace = _quick_gelu_ if config.hidden_act == "quick_gelu" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        h = self.norm2(x)
        # fc1's output is this block's own: its bias and the activation in place when autograd does not need them
        tracked = torch.is_grad_enabled() and (h.requires_grad or self.fc1.weight.requires_grad)
        if self.act_inplace is not None and not tracked:
            h = self.act_inplace(F.linear(h, self.fc1.weight), self.fc1.bias)
        else:
            h = self.act(self.fc1(h))
        return x + self.fc2(h)


class VisionTransformer(nn.Module):
    """CLIP's vision tower without the projection head. ``forward`` returns every token, post-LayerNormed."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.patch_embed = nn.Conv2d(config.num_channels, d, config.patch_size, config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(d))
        if config.position_embedding == "learned":
            self.position_embedding = nn.Parameter(torch.zeros(config.num_positions, d))
        else:
            self.register_buffer("position_embedding", sincos_2d(config.grid, d), persistent=False)
        self.pre_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.blocks = nn.ModuleList(ViTBlock(config) for _ in range(config.num_layers))
        self.post_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False

    def check_pixels(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> None:
        """``check_pixels`` with this ViT's channels, and its image size unless interpolate_pos_encoding (then any
        size of at least one patch)."""
        c = self.config
        if interpolate_pos_encoding:
            check_pixels(pixel_values, c.num_channels, min_side=c.patch_size)
        else:
            check_pixels(pixel_values, c.num_channels, c.image_size, hint="other sizes: interpolate_pos_encoding=True")

    def positions(self, rows: int, cols: int) -> torch.Tensor:
        """(rows * cols + 1, hidden_size): the position embeddings for a grid of rows x cols patches. The model's own
        grid gets its table; another grid gets the learned table's patch part resized bicubically (align_corners
        False, as CLIP / transformers' ``interpolate_pos_encoding``; [CLS] kept), or the sin-cos code of that grid."""
        g = self.config.grid
        if (rows, cols) == (g, g):
            return self.position_embedding
        if not isinstance(self.position_embedding, nn.Parameter):
            table = sincos_2d(rows, self.config.hidden_size, cols)
            return table.to(self.position_embedding.device, self.position_embedding.dtype)
        d = self.position_embedding.shape[-1]
        grid = self.position_embedding[1:].reshape(1, g, g, d).permute(0, 3, 1, 2)
        resized = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
        return torch.cat([self.position_embedding[:1], resized.permute(0, 2, 3, 1).reshape(rows * cols, d)])

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """pixel_values: (batch, channels, image_size, image_size) -> (batch, num_positions, hidden_size).
        interpolate_pos_encoding: take (batch, channels, H, W) of another size too, with the position embeddings
        resized to its (H // patch_size) x (W // patch_size) grid (``positions``)."""
        self.check_pixels(pixel_values, interpolate_pos_encoding)
        dtype = self.patch_embed.weight.dtype
        patches = self.patch_embed(pixel_values.to(dtype))  # (batch, d, rows, cols)
        rows, cols = patches.shape[2:]
        patches = patches.flatten(2).transpose(1, 2)  # (batch, rows * cols, d)
        cls = self.class_embedding.to(dtype).expand(patches.shape[0], 1, -1)
        x = torch.cat([cls, patches], dim=1) + self.positions(rows, cols).to(dtype)
        x = self.pre_norm(x)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.post_norm(x)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """CLIP-like random initialisation (normal weights, zero biases, unit LayerNorms)."""
        init_linear_and_norms(self, std)
        nn.init.normal_(self.class_embedding, std=self.config.hidden_size**-0.5)
        if isinstance(self.position_embedding, nn.Parameter):
            nn.init.normal_(self.position_embedding, std=std)
        nn.init.normal_(self.patch_embed.weight, std=std)


@torch.no_grad()
def init_linear_and_norms(module: nn.Module, std: float) -> None:
    """Normal(0, std) Linear/Embedding weights, zero biases, LayerNorm weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
