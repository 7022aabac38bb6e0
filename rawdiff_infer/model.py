"""The paper's conditional U-Net: eps_theta(concat(X_t, Y), t).

Layout (paper, Sec. 3.3): four stages in the encoder and four in the decoder with skip connections; each stage is
one residual block (ResNet BasicBlock with GroupNorm + SiLU and a timestep embedding); every stage but the first is
followed by a 2x down- (encoder) or up-sampling (decoder) layer and full spatial self-attention. Base channels 64,
multipliers (1, 2, 3, 4). Encoder stage i > 0 halves the resolution, runs its residual block and attends; decoder
stage i > 0 runs its residual block on concat(h, skip), attends and doubles the resolution. Attention therefore runs
at 32x32, 16x16 and 8x8 on a 64x64 patch; a ResBlock-Attention-ResBlock bottleneck sits at 8x8. Paper size
(the defaults): 10.9 M parameters, 7.8 GFLOP per 64x64 patch (FlopCounterMode, 2 FLOP per multiply-add).

Precision: weights and activations may be fp16 or bf16. GroupNorm statistics, the attention softmax and the
sinusoidal timestep embedding are computed in fp32 inside the module (explicit casts), so an fp16 ONNX export keeps
these islands in fp32 and TensorRT's strongly typed build honours them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .validate import SchemaError, boolean, int_list, integer, known_keys, number, obj

__all__ = ["UNetConfig", "UNet", "timestep_embedding", "count_parameters", "count_flops", "MAX_PATCH_FLOPS",
           "MAX_ATTENTION_TOKENS"]

#: the most compute one patch of a described U-Net may take (FLOPs, 2 per multiply-add): the load self-test runs one
#: patch of ``patch_size``, so this bounds it (the paper's U-Net: 7.8 GFLOP per 64x64 patch)
MAX_PATCH_FLOPS = 1_000_000_000_000
#: the most positions one self-attention layer may attend over in one patch (128 x 128: 16384^2 scores per head)
MAX_ATTENTION_TOKENS = 128 * 128


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of the conditional U-Net.

    Attributes:
        in_channels: channels of the noisy RAW X_t (3).
        cond_channels: channels of the sRGB condition Y (3).
        out_channels: channels of the predicted noise (3).
        base_channels: N_epsilon in the paper (64).
        channel_mults: per-stage multipliers of ``base_channels`` (paper: 1, 2, 3, 4).
        num_res_blocks: residual blocks per stage (paper: 1).
        attention_stages: indices of the stages followed by self-attention (paper: all but the first).
        head_channels: channels per attention head (heads = stage channels // head_channels).
        groups: GroupNorm groups.
        time_embed_mult: the timestep MLP width is ``base_channels * time_embed_mult``.
        dropout: dropout probability inside residual blocks (0 at inference).
        mid_block: add the usual ResBlock-Attention-ResBlock bottleneck at the lowest resolution.
        patch_size: the spatial size the model was trained on (pixels); inputs may be any multiple of 8.
    """

    in_channels: int = 3
    cond_channels: int = 3
    out_channels: int = 3
    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 3, 4)
    num_res_blocks: int = 1
    attention_stages: tuple[int, ...] = (1, 2, 3)
    head_channels: int = 64
    groups: int = 32
    time_embed_mult: int = 4
    dropout: float = 0.0
    mid_block: bool = True
    patch_size: int = 64

    def __post_init__(self) -> None:
        for name in ("in_channels", "cond_channels", "out_channels"):
            integer(getattr(self, name), name, 3, 3)  # the runtime works on RGB canvases
        integer(self.base_channels, "base_channels", 1, 1024)
        mults = int_list(self.channel_mults, "channel_mults", 1, 16, min_len=1, max_len=6)
        object.__setattr__(self, "channel_mults", mults)
        integer(self.num_res_blocks, "num_res_blocks", 1, 8)
        stages = int_list(self.attention_stages, "attention_stages", 0, len(mults) - 1, max_len=len(mults),
                          unique=True)
        object.__setattr__(self, "attention_stages", stages)
        integer(self.head_channels, "head_channels", 1, 4096)
        integer(self.groups, "groups", 1, 1024)
        integer(self.time_embed_mult, "time_embed_mult", 1, 16)
        object.__setattr__(self, "dropout", number(self.dropout, "dropout", 0.0, 1.0, hi_open=True))
        boolean(self.mid_block, "mid_block")
        integer(self.patch_size, "patch_size", 8, 1024)
        self._check_runnable()
        self.check_patch_cost(self.patch_size)

    def _check_runnable(self) -> None:
        """Combinations of valid fields that torch could not build or run, refused naming the field."""
        if self.channel_mults[0] != 1:
            raise SchemaError(f"channel_mults: the first stage must be 1 (its output feeds the last layers, which "
                              f"work at base_channels), got {list(self.channel_mults)}")
        if self.base_channels % 2:
            raise SchemaError(f"base_channels: must be even (the timestep embedding is base_channels/2 sine-cosine "
                              f"pairs), got {self.base_channels}")
        for ch in self._widths():
            if ch % self.groups:
                raise SchemaError(f"groups: stage width {ch} is not divisible by groups={self.groups}")
        for stage, ch in self._attention_widths():
            heads = max(1, ch // self.head_channels)
            if ch % heads:
                raise SchemaError(f"head_channels: {stage}'s width {ch} does not divide into its {heads} attention "
                                  f"heads ({ch} // head_channels {self.head_channels})")
        if self.patch_size % (2 ** (len(self.channel_mults) - 1)):
            raise SchemaError(f"patch_size: {self.patch_size} is not divisible by 2**(stages-1) = "
                              f"{2 ** (len(self.channel_mults) - 1)}")

    def check_patch_cost(self, p: int) -> None:
        """Refuse (SchemaError naming the field) a ``p`` x ``p`` patch above ``MAX_ATTENTION_TOKENS`` positions in
        one attention layer or ``MAX_PATCH_FLOPS``: every description at its ``patch_size`` (what the load self-test
        runs); a command may check the patch size it is asked for the same way."""
        tokens, stage = self.attention_tokens(p)
        if tokens > MAX_ATTENTION_TOKENS:
            side = math.isqrt(MAX_ATTENTION_TOKENS)
            field = "mid_block" if stage == "the bottleneck" else "attention_stages"
            raise SchemaError(f"{field}: {stage} attends over {tokens} positions of a {p}x{p} patch "
                              f"(patch_size={p}), more than rawdiff accepts ({MAX_ATTENTION_TOKENS} = {side}x{side})")
        flops = self.patch_flops(p)
        if flops > MAX_PATCH_FLOPS:
            raise SchemaError(f"patch_size: one {p}x{p} patch of this U-Net costs {flops / 1e9:.0f} GFLOP, more than "
                              f"rawdiff accepts ({MAX_PATCH_FLOPS / 1e9:.0f} GFLOP)")

    def _widths(self) -> list[int]:
        return [self.base_channels * m for m in self.channel_mults]

    def _attention_widths(self) -> list[tuple[str, int]]:
        """(where, channels) of every self-attention layer: the attention stages, and the bottleneck."""
        widths = self._widths()
        out = [(f"stage {i}", widths[i]) for i in self.attention_stages]
        return out + ([("the bottleneck", widths[-1])] if self.mid_block else [])

    def attention_tokens(self, patch: int) -> tuple[int, str]:
        """The most positions one self-attention layer attends over on a ``patch`` x ``patch`` input, and
        where (0 and "" without attention)."""
        last = len(self.channel_mults) - 1
        res = {f"stage {i}": i for i in self.attention_stages} | ({"the bottleneck": last} if self.mid_block else {})
        found = [((patch >> i) ** 2, where) for where, i in res.items()]
        return max(found, key=lambda f: f[0], default=(0, ""))

    def patch_flops(self, patch: int, batch: int = 1) -> int:
        """Forward FLOPs (2 per multiply-add, as ``count_flops`` counts them) for ``batch`` patches of ``patch``
        pixels, in closed form (no tensor is made)."""
        ch0, temb, widths = self.base_channels, self.base_channels * self.time_embed_mult, self._widths()
        heads_at = {i for i in self.attention_stages}

        def conv(res: int, cin: int, cout: int, k: int) -> int:
            return 2 * res * res * cin * cout * k * k

        def res_block(res: int, cin: int, cout: int) -> int:
            return conv(res, cin, cout, 3) + 2 * temb * cout + conv(res, cout, cout, 3) + \
                (conv(res, cin, cout, 1) if cin != cout else 0)

        def attention(res: int, c: int) -> int:
            n = res * res
            return conv(res, c, 3 * c, 1) + conv(res, c, c, 1) + 4 * n * n * c

        total = 2 * ch0 * temb + 2 * temb * temb + conv(patch, self.in_channels + self.cond_channels, ch0, 3)
        cin = ch0
        for i, ch in enumerate(widths):  # encoder
            r = patch >> i
            total += conv(r, cin, cin, 3) if i > 0 else 0
            total += sum(res_block(r, cin if j == 0 else ch, ch) for j in range(self.num_res_blocks))
            total += attention(r, ch) if i in heads_at else 0
            cin = ch
        r_low = patch >> (len(widths) - 1)
        if self.mid_block:
            total += 2 * res_block(r_low, widths[-1], widths[-1]) + attention(r_low, widths[-1])
        cin = widths[-1]
        for i in reversed(range(len(widths))):  # decoder
            r, ch = patch >> i, widths[i]
            total += sum(res_block(r, (cin + ch) if j == 0 else ch, ch) for j in range(self.num_res_blocks))
            total += attention(r, ch) if i in heads_at else 0
            total += conv(r * 2, ch, widths[i - 1], 3) if i > 0 else 0
            cin = widths[i - 1] if i > 0 else ch
        total += conv(patch, ch0, self.out_channels, 3)
        return batch * total

    @classmethod
    def tiny(cls) -> "UNetConfig":
        """The paper's topology with 16 base channels (0.29 M parameters): tests, CPU trials, rehearsals."""
        return cls(base_channels=16, channel_mults=(1, 2, 2, 2), head_channels=16, groups=8)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channel_mults"] = list(self.channel_mults)
        d["attention_stages"] = list(self.attention_stages)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "UNetConfig":
        """From a description's ``model`` object; missing keys take the defaults, unknown keys are refused.
        Raises SchemaError naming the field."""
        d = obj(d, "model")
        known_keys(d, "model", (f.name for f in dataclasses.fields(cls)))
        try:
            return cls(**d)
        except SchemaError as e:
            raise SchemaError(f"model.{e}") from None

    def parameter_count(self) -> int:
        """Parameters of the U-Net this config describes, counted without allocating its weights."""
        with torch.device("meta"):
            return sum(p.numel() for p in UNet(self).parameters())


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, always computed in fp32.

    Args:
        t: [B] timesteps in training units (0 .. T-1), any float dtype.
        dim: embedding width (even).
    Returns:
        [B, dim] float32.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half
    )
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics are computed in fp32 whatever the activation dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


class ResBlock(nn.Module):
    """BasicBlock: GN-SiLU-conv3x3, + timestep projection, GN-SiLU-(dropout)-conv3x3, + skip (1x1 if widths differ)."""

    def __init__(self, cin: int, cout: int, temb: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = GroupNorm32(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb, cout)
        self.norm2 = GroupNorm32(groups, cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Full spatial multi-head self-attention (scaled dot product over all H*W positions), residual.

    ``fused=True`` uses ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels keep the softmax
    statistics in fp32 internally); ``fused=False`` writes the softmax explicitly in fp32, the form exported to ONNX.
    """

    def __init__(self, channels: int, head_channels: int, groups: int) -> None:
        super().__init__()
        self.heads = max(1, channels // head_channels)
        self.norm = GroupNorm32(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        self.fused = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = qkv.unbind(1)  # [B, heads, d, N]
        q, k, v = q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)  # [B, heads, N, d]
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            scale = 1.0 / math.sqrt(c // self.heads)
            scores = torch.matmul(q * scale, k.transpose(-1, -2))
            attn = torch.softmax(scores.float(), dim=-1).to(v.dtype)
            out = torch.matmul(attn, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest 2x upsampling, then a 3x3 conv that also narrows to the next (shallower) stage's width."""

    def __init__(self, channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Stage(nn.Module):
    """One U-Net stage. Encoder (``decoder=False``): [2x downsample] -> residual blocks -> [attention].
    Decoder (``decoder=True``): residual blocks -> [attention] -> [2x upsample]."""

    def __init__(self, blocks: list[ResBlock], resample: nn.Module | None, attn: nn.Module | None,
                 decoder: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.resample = resample if resample is not None else nn.Identity()
        self.attn = attn if attn is not None else nn.Identity()
        self.decoder = decoder

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if not self.decoder:
            x = self.resample(x)
        for blk in self.blocks:
            x = blk(x, emb)
        x = self.attn(x)
        return self.resample(x) if self.decoder else x


class UNet(nn.Module):
    """Conditional eps-prediction U-Net.

    forward(x_t, cond, t):
        x_t:  [B, 3, H, W] noisy RAW in the model's encoded space (about [-1, 1] at t = 0).
        cond: [B, 3, H, W] sRGB condition in [-1, 1].
        t:    [B] timesteps in training units (0 .. T-1), float (fractional values allowed).
    Returns eps: [B, 3, H, W] in the dtype of the weights. H and W must be multiples of 2**(stages-1).
    """

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        cfg = config or UNetConfig()
        self.config = cfg
        ch0 = cfg.base_channels
        temb = ch0 * cfg.time_embed_mult
        self.time_mlp = nn.Sequential(nn.Linear(ch0, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(cfg.in_channels + cfg.cond_channels, ch0, 3, padding=1)

        widths = [ch0 * m for m in cfg.channel_mults]

        def attn(ch: int, stage: int) -> nn.Module | None:
            return SelfAttention(ch, cfg.head_channels, cfg.groups) if stage in cfg.attention_stages else None

        self.down = nn.ModuleList()
        cin = ch0
        for i, ch in enumerate(widths):
            blocks = [ResBlock(cin if j == 0 else ch, ch, temb, cfg.groups, cfg.dropout)
                      for j in range(cfg.num_res_blocks)]
            self.down.append(_Stage(blocks, Downsample(cin) if i > 0 else None, attn(ch, i), decoder=False))
            cin = ch

        self.mid: nn.ModuleList | None = None
        if cfg.mid_block:
            c = widths[-1]
            self.mid = nn.ModuleList([ResBlock(c, c, temb, cfg.groups, cfg.dropout),
                                      SelfAttention(c, cfg.head_channels, cfg.groups),
                                      ResBlock(c, c, temb, cfg.groups, cfg.dropout)])

        self.up = nn.ModuleList()
        cin = widths[-1]
        for i in reversed(range(len(widths))):
            ch = widths[i]
            blocks = [ResBlock((cin + ch) if j == 0 else ch, ch, temb, cfg.groups, cfg.dropout)
                      for j in range(cfg.num_res_blocks)]
            self.up.append(_Stage(blocks, Upsample(ch, widths[i - 1]) if i > 0 else None, attn(ch, i),
                                  decoder=True))
            cin = widths[i - 1] if i > 0 else ch

        self.norm_out = GroupNorm32(cfg.groups, ch0)
        self.conv_out = nn.Conv2d(ch0, cfg.out_channels, 3, padding=1)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def set_fused_attention(self, fused: bool) -> None:
        """Choose ``F.scaled_dot_product_attention`` (fast) or the explicit fp32-softmax form (ONNX export)."""
        for m in self.modules():
            if isinstance(m, SelfAttention):
                m.fused = fused

    def forward(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype
        emb = self.time_mlp(timestep_embedding(t, self.config.base_channels).to(dtype))
        h = self.conv_in(torch.cat([x_t.to(dtype), cond.to(dtype)], dim=1))
        skips = []
        for stage in self.down:
            h = stage(h, emb)
            skips.append(h)
        if self.mid is not None:
            h = self.mid[0](h, emb)
            h = self.mid[1](h)
            h = self.mid[2](h, emb)
        for stage in self.up:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_flops(model: UNet, patch_size: int | None = None, batch: int = 1) -> int:
    """Forward FLOPs (2 per multiply-add) for ``batch`` patches, counted with ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    p = patch_size or model.config.patch_size
    dev = next(model.parameters()).device
    x = torch.zeros(batch, model.config.in_channels, p, p, device=dev)
    c = torch.zeros(batch, model.config.cond_channels, p, p, device=dev)
    t = torch.zeros(batch, device=dev)
    fused = [m.fused for m in model.modules() if isinstance(m, SelfAttention)]
    model.set_fused_attention(False)  # count the explicit matmuls (SDPA is not counted on every backend)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x, c, t)
    finally:
        for m, f in zip([m for m in model.modules() if isinstance(m, SelfAttention)], fused):
            m.fused = f
    return int(counter.get_total_flops())
