"""The 3D GAN discriminator CogVideoX's VAE was trained with, under the state-dict names of CogVideo's SAT code.

CogVideo's ``sat/sgm/modules/autoencoding/losses/video_loss.py`` defines ``Discriminator3DWithfirstframe`` (causal in
time: ``CausalConv3d`` with the first frame repeated as padding, and ``DownSample3D`` keeping the first frame whole when
it halves time) and ``Discriminator3D`` (plain ``Conv3d``, time halved by space-to-depth). ``VideoAutoencoderLoss``
holds the one it was configured with as ``discr_3d``, so a SAT VAE checkpoint carries its weights as ``loss.discr_3d.*``:

- ``blocks.{i}`` for the ``int(log2(frame_num))`` video blocks, each halving time, height and width:
  ``downsample_res.conv``, ``net.{0,2}.conv``, ``downsample.conv`` (first-frame variant) or ``conv_res``, ``net.{0,2}``,
  ``downsample.1`` (plain variant), and ``maybe_blur.f`` with ``antialiased_downsample``;
- ``blocks.{i}.0`` / ``blocks.{i}.1`` for the 2-D blocks after them (on the time-averaged features, or on each remaining
  frame for the plain variant): ``conv_res``, ``net.{0,2}``, ``downsample.1`` (all but the last) and ``maybe_blur.f``;
  then ``1.0.fn`` (linear attention over positions: ``norm.gamma``, ``attn.to_q.0``, ``attn.to_kv.0``, ``attn.to_out.0``)
  and ``1.1.fn`` (GEGLU feed-forward: ``norm.gamma``, ``net.0``, ``net.2``);
- ``to_logits.0`` (3x3 conv) and ``to_logits.3`` (``Linear`` over the flattened last feature map, sized by
  ``image_size``).

The attention is lucidrains' ``TaylorSeriesLinearAttn`` (taylor-series-linear-attention >= 0.1.9, which
magvit2-pytorch's ``>= 0.1.5`` resolved to when CogVideoX was trained): ``exp(q.k)`` replaced by its second-order
Taylor expansion, no bias, ``to_out`` a ``Sequential`` of ``Linear`` and ``Dropout(0)``. Modules are built in the
reference's order, so the same seed gives the same initial weights; the tests hold seeded logits to those CogVideo's
classes gave.

``antialiased_downsample=True`` (not the default) fails in the reference: video_loss.py's ``Blur`` calls
``einops.einsum`` with the pattern first, which einops refuses. Here it blurs as magvit2's identical ``Blur`` (with
``torch.einsum``) does, and the state dict has its ``maybe_blur.f`` keys.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from sat_video.common.errors import CheckpointError

STATE_PREFIXES = ("loss.discr_3d.", "discr_3d.")
"""Where a SAT VAE checkpoint keeps the discriminator: under the loss module, or bare once ``loss.`` was stripped."""
LEAKY_SLOPE = 0.1  # every activation of the reference is LeakyReLU(0.1)
RESIDUAL_SCALE = 2**-0.5  # each block returns (main + shortcut) / sqrt(2)
TAYLOR_EPS = 1e-5  # the clamp of the linear attention's normaliser


def _leaky() -> nn.LeakyReLU:
    return nn.LeakyReLU(LEAKY_SLOPE)


def _fold_time(x: Tensor) -> Tensor:
    return rearrange(x, "b c t h w -> (b t) c h w")


def _unfold_time(x: Tensor, frames: int) -> Tensor:
    return rearrange(x, "(b t) c h w -> b c t h w", t=frames)


class _Blur(nn.Module):
    """Normalised [1, 2, 1] x [1, 2, 1] blur over height and width, replicate-padded (kornia's ``filter3d`` defaults)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("f", torch.tensor([1.0, 2.0, 1.0]))  # persistent: checkpoints carry it as maybe_blur.f

    def forward(self, x: Tensor) -> Tensor:
        kernel = torch.outer(self.f, self.f).to(x.dtype)  # kornia casts, then normalises
        kernel = (kernel / kernel.abs().sum()).expand(x.shape[1], 1, 1, 3, 3)
        video = x if x.ndim == 5 else x.unsqueeze(2)  # images as one-frame videos, as the reference does
        blurred = F.conv3d(F.pad(video, (1, 1, 1, 1, 0, 0), mode="replicate"), kernel, groups=x.shape[1])
        return blurred if x.ndim == 5 else blurred.squeeze(2)


class _SpaceToDepth(nn.Module):
    """``b c (f 2) (h 2) (w 2) -> b (c 2 2 2) f h w`` (or its 2-D form): the reference's ``Rearrange`` at ``downsample.0``."""

    def __init__(self, video: bool):
        super().__init__()
        self.pattern = ("b c (f p1) (h p2) (w p3) -> b (c p1 p2 p3) f h w" if video
                        else "b c (h p2) (w p3) -> b (c p2 p3) h w")
        self.factors = dict(p1=2, p2=2, p3=2) if video else dict(p2=2, p3=2)

    def forward(self, x: Tensor) -> Tensor:
        return rearrange(x, self.pattern, **self.factors)


class _CausalConv3d(nn.Module):
    """3x3x3 conv that sees no later frame: time padded with two copies of the first frame, space with zeros."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([x[:, :, :1], x[:, :, :1], x], dim=2)
        return self.conv(F.pad(x, (1, 1, 1, 1)))


class _HalveFirstFrameKept(nn.Module):
    """CogVideo's ``DownSample3D(compress_time=True, with_conv=True)``: frame 0 kept, the others averaged in pairs, then
    a 3x3 stride-2 conv per frame after padding one zero row and column at the bottom and right."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[2] > 1:  # the frame count was checked: an even number follows frame 0
            x = torch.cat([x[:, :, :1], F.avg_pool3d(x[:, :, 1:], (2, 1, 1))], dim=2)
        frames = x.shape[2]
        return _unfold_time(self.conv(F.pad(_fold_time(x), (0, 1, 0, 1))), frames)


class _FirstFrameBlock(nn.Module):
    """``DiscriminatorBlock3DWithfirstframe``: halves time (first frame kept), height and width."""

    def __init__(self, in_channels: int, out_channels: int, antialiased: bool):
        super().__init__()
        self.downsample_res = _HalveFirstFrameKept(in_channels, out_channels)
        self.net = nn.Sequential(_CausalConv3d(in_channels, out_channels), _leaky(),
                                 _CausalConv3d(out_channels, out_channels), _leaky())
        self.maybe_blur = _Blur() if antialiased else None
        self.downsample = _HalveFirstFrameKept(out_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = self.downsample_res(x)
        x = self.net(x)
        if self.maybe_blur is not None:
            x = self.maybe_blur(x)
        return (self.downsample(x) + shortcut) * RESIDUAL_SCALE


class _VideoBlock(nn.Module):
    """``DiscriminatorBlock3D``: halves time, height and width (each must be even)."""

    def __init__(self, in_channels: int, out_channels: int, antialiased: bool):
        super().__init__()
        self.conv_res = nn.Conv3d(in_channels, out_channels, 1, stride=2)
        self.net = nn.Sequential(nn.Conv3d(in_channels, out_channels, 3, padding=1), _leaky(),
                                 nn.Conv3d(out_channels, out_channels, 3, padding=1), _leaky())
        self.maybe_blur = _Blur() if antialiased else None
        self.downsample = nn.Sequential(_SpaceToDepth(video=True), nn.Conv3d(out_channels * 8, out_channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        shortcut = self.conv_res(x)
        x = self.net(x)
        if self.maybe_blur is not None:
            x = self.maybe_blur(x)
        return (self.downsample(x) + shortcut) * RESIDUAL_SCALE


class _ImageBlock(nn.Module):
    """``DiscriminatorBlock``: 2-D, halves height and width unless it is the last block."""

    def __init__(self, in_channels: int, out_channels: int, downsample: bool, antialiased: bool):
        super().__init__()
        self.conv_res = nn.Conv2d(in_channels, out_channels, 1, stride=2 if downsample else 1)
        self.net = nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), _leaky(),
                                 nn.Conv2d(out_channels, out_channels, 3, padding=1), _leaky())
        # the reference builds the blur whether or not the block downsamples: the last block carries an unused buffer
        self.maybe_blur = _Blur() if antialiased else None
        self.downsample = (nn.Sequential(_SpaceToDepth(video=False), nn.Conv2d(out_channels * 4, out_channels, 1))
                           if downsample else None)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = self.conv_res(x)
        x = self.net(x)
        if self.downsample is not None:
            if self.maybe_blur is not None:
                x = self.maybe_blur(x)
            x = self.downsample(x)
        return (x + shortcut) * RESIDUAL_SCALE


class _RMSNorm(nn.Module):
    """``normalize(x) * sqrt(dim) * gamma`` over channels: the last axis, or axis 1 of images (``gamma`` [dim, 1, 1])."""

    def __init__(self, dim: int, channel_first: bool):
        super().__init__()
        self.axis = 1 if channel_first else -1
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if channel_first else (dim,)))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=self.axis) * self.scale * self.gamma


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x) + x


def _taylor_features(x: Tensor) -> Tensor:
    """``[1, x, vec(x x^T) / sqrt(2)]``: its dot products are ``1 + q.k + (q.k)^2 / 2``, the expansion of ``exp(q.k)``."""
    squares = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) * 0.5**0.5
    return torch.cat([torch.ones_like(x[..., :1]), x, squares], dim=-1)


class _TaylorLinearAttention(nn.Module):
    """lucidrains' ``TaylorSeriesLinearAttn`` as magvit2's ``LinearAttention`` builds it (non-causal, no gates)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        self.scale = dim_head**-0.5
        self.to_q = nn.Sequential(nn.Linear(dim, heads * dim_head, bias=False))
        self.to_kv = nn.Sequential(nn.Linear(dim, 2 * heads * dim_head, bias=False))
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim, bias=False))  # the reference's Dropout(0) at .1

    def forward(self, x: Tensor) -> Tensor:
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)
        k, v = rearrange(self.to_kv(x), "b n (kv h d) -> kv b h n d", kv=2, h=self.heads)
        q, k = _taylor_features(q * self.scale), _taylor_features(k)
        # the reference's contractions, in its order: other orders round differently
        kv = torch.einsum("bhnd,bhne->bhde", k, v)
        inverse_normaliser = 1.0 / torch.einsum("bhnd,bhmd->bhn", q, k).clamp(min=TAYLOR_EPS)
        out = torch.einsum("bhnd,bhde,bhn->bhne", q, kv, inverse_normaliser)
        return self.to_out(rearrange(out, "b h n e -> b n (h e)"))


class _SpaceAttention(nn.Module):
    """magvit2's ``LinearSpaceAttention``: RMS-normed linear attention among the positions of each image."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.norm = _RMSNorm(dim, channel_first=False)
        self.attn = _TaylorLinearAttention(dim, heads, dim_head)

    def forward(self, x: Tensor) -> Tensor:
        height = x.shape[2]
        tokens = rearrange(x, "b c h w -> b (h w) c").contiguous()  # as the reference's: the norm rounds by layout
        return rearrange(self.attn(self.norm(tokens)), "b (h w) c -> b c h w", h=height)


class _GEGLU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        x, gate = x.chunk(2, dim=1)
        return F.gelu(gate) * x


class _FeedForward(nn.Module):
    """magvit2's ``FeedForward(images=True)``: channel RMS norm, 1x1 conv to 2 x inner, GEGLU, 1x1 conv back."""

    def __init__(self, dim: int, mult: float):
        super().__init__()
        inner = int(dim * mult * 2 / 3)
        self.norm = _RMSNorm(dim, channel_first=True)
        self.net = nn.Sequential(nn.Conv2d(dim, inner * 2, 1), _GEGLU(), nn.Conv2d(inner, dim, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.norm(x))


def _image_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(side, int) and side > 0 for side in size):
        raise ValueError(f"image_size must be a positive int or (height, width), got {image_size!r}")
    return size


class VideoDiscriminator(nn.Module):
    """CogVideo's Discriminator3DWithfirstframe (first_frame=True, the default: causal convolutions in time, the first
    frame kept whole when time is halved) or Discriminator3D (first_frame=False: frames must halve evenly). Same
    constructor arguments as CogVideo's: dim, image_size (int or (h, w)), frame_num, channels=3, max_dim=512,
    linear_attn_dim_head=8, linear_attn_heads=16, ff_mult=4, antialiased_downsample=False.

    ``n = int(log2(frame_num))`` video blocks halve time, height and width; 2-D blocks with attention follow, up to
    ``int(log2(min(image_size))) - 2`` spatial halvings in all, and a ``Linear`` over the last feature map gives the logit.
    Clips must have ``image_size``'s height and width; any frame count whose halvings come out even is taken:
    ``1 + 2**n * k`` frames with the first frame kept (frame_num=17: 1, 17, 33, 49, ...), ``2**n * k`` without.
    ``forward`` returns one logit per clip ``[B]`` (first_frame: the features are averaged over the remaining frames, so
    the logit depends on every frame), or without first_frame one per remaining frame, ``[B * T / 2**n]`` ordered clip
    by clip (``[B]`` when ``T == 2**n``).
    """

    def __init__(self, *, dim: int, image_size: int | Sequence[int], frame_num: int, channels: int = 3,
                 max_dim: int = 512, linear_attn_dim_head: int = 8, linear_attn_heads: int = 16, ff_mult: float = 4,
                 antialiased_downsample: bool = False, first_frame: bool = True):
        super().__init__()
        self.arguments = dict(dim=dim, image_size=image_size, frame_num=frame_num, channels=channels, max_dim=max_dim,
                              linear_attn_dim_head=linear_attn_dim_head, linear_attn_heads=linear_attn_heads,
                              ff_mult=ff_mult, antialiased_downsample=antialiased_downsample, first_frame=first_frame)
        for name in ("dim", "frame_num", "channels", "max_dim", "linear_attn_dim_head", "linear_attn_heads"):
            if not isinstance(self.arguments[name], int) or self.arguments[name] < 1:
                raise ValueError(f"{self.describe()}: {name} must be a positive int")
        self.image_size = _image_size(image_size)
        self.channels = channels
        self.first_frame = first_frame
        self.time_halvings = int(math.log2(frame_num))  # the reference's temporal_num_layers
        spatial_halvings = int(math.log2(min(self.image_size)) - 2)  # its num_layers: one block more than that
        self._check_layout(spatial_halvings)

        widths = [channels] + [min(dim * 4 * 2**i, max_dim) for i in range(spatial_halvings + 1)]
        blocks = []
        for index, (in_channels, out_channels) in enumerate(zip(widths, widths[1:])):
            if index < self.time_halvings:
                video_block = _FirstFrameBlock if first_frame else _VideoBlock
                blocks.append(video_block(in_channels, out_channels, antialiased_downsample))
                continue
            image_block = _ImageBlock(in_channels, out_channels, downsample=index < spatial_halvings,
                                      antialiased=antialiased_downsample)
            attention = nn.Sequential(_Residual(_SpaceAttention(out_channels, linear_attn_heads, linear_attn_dim_head)),
                                      _Residual(_FeedForward(out_channels, ff_mult)))
            blocks.append(nn.ModuleList([image_block, attention]))
        self.blocks = nn.ModuleList(blocks)

        last_height, last_width = (side // 2**spatial_halvings for side in self.image_size)
        self.to_logits = nn.Sequential(nn.Conv2d(widths[-1], widths[-1], 3, padding=1), _leaky(), nn.Flatten(),
                                       nn.Linear(last_height * last_width * widths[-1], 1))

    def describe(self) -> str:
        """The constructor call, for messages."""
        return "VideoDiscriminator(" + ", ".join(f"{key}={value!r}" for key, value in self.arguments.items()) + ")"

    def _check_layout(self, spatial_halvings: int) -> None:
        """Refuse the configurations whose logits layer no ``image_size`` clip could reach (CogVideo's class builds them
        and fails, or passes video to 2-D layers, at the first forward)."""
        frame_num, (height, width) = self.arguments["frame_num"], self.image_size
        if self.time_halvings < 1:
            raise ValueError(f"{self.describe()}: frame_num must be at least 2 (int(log2(frame_num)) video blocks halve "
                             "time; with none, the reference hands 5-D video to its 2-D blocks)")
        if self.time_halvings > spatial_halvings:
            raise ValueError(
                f"{self.describe()}: frame_num={frame_num} builds {self.time_halvings} video blocks (int(log2(frame_num))), "
                f"each halving height and width too, but image_size {height}x{width} leaves room for {spatial_halvings} "
                f"halvings (int(log2(min side)) - 2) before the logits Linear, which is sized for "
                f"{height >> max(spatial_halvings, 0)}x{width >> max(spatial_halvings, 0)} features: make the smaller side at "
                f"least {2 ** (self.time_halvings + 2)}"
                + (f" or frame_num below {2 ** (spatial_halvings + 1)}" if spatial_halvings >= 1 else ""))
        # video blocks with the first frame kept halve space as floor(n / 2); every other halving needs an even size
        exact_halvings = spatial_halvings - self.time_halvings if self.first_frame else spatial_halvings
        floor_halvings = spatial_halvings - exact_halvings
        for name, side in (("height", height), ("width", width)):
            if (side >> floor_halvings) % 2**exact_halvings:
                where = (f", rounded down to {side >> floor_halvings} by the {floor_halvings} video blocks,"
                         if floor_halvings else "")
                raise ValueError(f"{self.describe()}: image {name} {side}{where} does not halve evenly the "
                                 f"{exact_halvings} times its blocks' space-to-depth needs; a multiple of "
                                 f"{2**spatial_halvings} does")

    def check_clip(self, shape: Sequence[int]) -> None:
        """Raise ``ValueError`` unless a clip of this shape ``[B, C, T, H, W]`` reaches the logits whole."""
        if len(shape) != 5 or shape[1] != self.channels:
            raise ValueError(f"{self.describe()} takes video [B, {self.channels}, T, H, W], got shape {tuple(shape)}")
        frames, height, width = shape[2:]
        if (height, width) != self.image_size:
            raise ValueError(f"{self.describe()} was built for {self.image_size[0]}x{self.image_size[1]} clips (its logits "
                             f"Linear is sized for them), got {height}x{width}")
        period = 2**self.time_halvings
        if self.first_frame and (frames - 1) % period:
            raise ValueError(
                f"{self.describe()} halves time {self.time_halvings} times keeping the first frame whole, so it takes "
                f"1 + {period}k frames (1, {1 + period}, {1 + 2 * period}, ...), got {frames}: the reference drops the "
                f"frame left over from a pair, so the last frames of such a clip would never reach the logits (or it "
                f"fails when one frame is left); a frame_num below {period} halves time fewer times")
        if not self.first_frame and (frames < 1 or frames % period):
            raise ValueError(f"{self.describe()} halves time {self.time_halvings} times, so it takes a multiple of "
                             f"{period} frames, got {frames}")

    def forward(self, video: Tensor) -> Tensor:
        """``[B, C, T, H, W]`` in [-1, 1] -> logits ``[B]`` (first_frame) or ``[B * T / 2**time_halvings]``."""
        self.check_clip(video.shape)
        x = video
        for index, block in enumerate(self.blocks):
            if index < self.time_halvings:
                x = block(x)
                if index == self.time_halvings - 1:  # from here on 2-D: average the frames, or make each a sample
                    x = x.mean(dim=2) if self.first_frame else _fold_time(x)
            else:
                image_block, attention = block
                x = attention(image_block(x))
        return self.to_logits(x).squeeze(1)


def discriminator_from_state_dict(state: Mapping[str, Tensor], **kwargs) -> VideoDiscriminator | None:
    """The discriminator of a SAT VAE checkpoint's state dict (keys under ``loss.discr_3d.``, or ``discr_3d.`` once the
    ``loss.`` prefix was removed), built as ``VideoDiscriminator(**kwargs)`` and loaded strictly; None when the state
    holds no discriminator. Raises :class:`CheckpointError` naming the keys that do not fit."""
    found = [prefix for prefix in STATE_PREFIXES if any(key.startswith(prefix) for key in state)]
    if not found:
        return None
    if len(found) > 1:
        raise CheckpointError(f"the state dict holds a discriminator under both {found[0]!r} and {found[1]!r}; pass the "
                              "one to load")
    prefix = found[0]
    weights = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    model = VideoDiscriminator(**kwargs)
    expected = model.state_dict()
    missing = [key for key in expected if key not in weights]
    unexpected = [key for key in weights if key not in expected]
    misshaped = [f"{key} (expected {tuple(expected[key].shape)}, found {tuple(weights[key].shape)})"
                 for key in expected if key in weights and weights[key].shape != expected[key].shape]
    if missing or unexpected or misshaped:
        problems = [f"{len(names)} {what}: {', '.join(prefix + name for name in names[:4])}{', ...' if len(names) > 4 else ''}"
                    for what, names in (("missing", missing), ("unexpected", unexpected), ("of another shape", misshaped))
                    if names]
        raise CheckpointError(f"the checkpoint's {prefix}* does not fit {model.describe()}: {'; '.join(problems)} (build "
                              "it with the discr_3d arguments the VAE was trained with)")
    model.load_state_dict(weights, strict=True)
    return model
