"""Tiny random-weight checkpoints that the real ComfyUI loads and detects.

No model weights can be downloaded in tests, so these functions write single-file ``.safetensors`` checkpoints
in the original LDM / ComfyUI key layout, with seeded random weights (every tensor gets its own generator,
seeded from the file seed and the key name, so every tensor is reproducible; only the order of the
header metadata may differ between writes).

SD1.5 (``write_sd15_checkpoint``)
    What ComfyUI reads (``comfy/model_detection.py::detect_unet_config`` and ``comfy/supported_models.py::SD15``):
    the UNet prefix ``model.diffusion_model.``; ``model_channels`` = ``input_blocks.0.0.weight.shape[0]`` must be
    320; ``context_dim`` = ``attn2.to_k.weight.shape[1]`` of the first transformer must be 768; ``proj_in`` must
    be a 1x1 conv (4-d, ``use_linear_in_transformer=False``); no ``label_emb`` (``adm_in_channels=None``); no
    temporal layers; ``in_channels`` 4. Levels, res blocks, channel multipliers and transformer depths are read
    from the shapes and are free, so the UNet here is slim: ``channel_mult=(1, 2, 2)`` (320, 640, 640
    channels), one res block per level, one transformer block at levels 0 and 1 and in the middle block; like
    SD1.5 the deepest level has none. Cross-attention sits in input blocks 1 (latent /1) and 3 (/2), the
    middle block (/4) and output blocks 2, 3 (/2) and 4, 5 (/1). ``num_heads`` is fixed to 8 by SD15, as in
    the real model (head dims 40 and 80). The text encoder is the full CLIP-L (12 layers, width 768,
    ``cond_stage_model.transformer.text_model.*``) and the VAE the full SD VAE (``first_stage_model.*``, ch 128,
    ch_mult 1,2,4,4): ComfyUI builds those from fixed configs and leaves any missing weight uninitialised. Like
    the real SD1.5 file there is no CLIP ``text_projection`` (ComfyUI ignores it as missing; SD1 UNets do not
    use the pooled output). About 355 M parameters (UNet 148 M, CLIP-L 123 M, VAE 84 M), ~710 MB in fp16.

SDXL (``write_sdxl_checkpoint`` / ``build_tiny_sdxl_model``)
    ComfyUI's ``SDXL`` class matches ``model_channels`` 320, linear ``proj_in``, ``context_dim`` 2048,
    ``adm_in_channels`` 2816 (``label_emb.0.0``) and an exact input-side ``transformer_depth``
    ``[0, 0, 2, 2, 10, 10]``; channel multipliers, output-side and middle depths are not checked. The SDXL text
    encoders cannot be slimmed (ComfyUI builds CLIP-L + OpenCLIP bigG from fixed configs: about 820 M
    parameters, 1.6 GB in fp16), which is far beyond the ~1 GB budget for a test file. So the SDXL checkpoint
    written here holds only the UNet (channel_mult (1, 1, 1), 2 res blocks per level, input depths 0/2/10 so it
    is detected as ``SDXL`` itself, output depths 0/1/1, middle depth 1; 160 M) and the VAE (84 M), ~490 MB.
    Cross-attention sits in input blocks 4, 5 (latent /2, 2 blocks each) and 7, 8 (/4, 10 each), the middle
    block (/4) and output blocks 0-2 (/4) and 3-5 (/2); 5 heads of 64 everywhere (SDXL's head size).
    ComfyUI loads it as ``SDXL`` with ``clip=None`` (so a server workflow cannot text-encode for it). ``build_tiny_sdxl_model()`` loads it in-process and returns
    the host's ``ModelPatcher`` (``comfy.model_base.SDXL``) and VAE; ``sdxl_conditioning()`` makes the hand-made
    CONDITIONING a sampler needs (cross-attention ``[B, T, 2048]``, ``pooled_output`` ``[B, 1280]``; the adm
    vector is built by the host from the pooled output and the size entries).

Weights: linear/conv weights normal(0, 0.02), cross-attention ``to_q``/``to_k`` normal(0, 0.05) so per-token
attention maps have some contrast, norm weights 1, biases 0 (CLIP's final norm bias: normal(0.1, 0.02), see
``BIAS_MEAN``), embeddings normal(0, 0.02)/(0, 0.01). With this, 2-step sampling gives a finite, non-constant
decoded image in ComfyUI and in Forge.

Cached copies live in ``$DAAM_CACHE/checkpoints`` (default ``~/.cache/comfyui-daam/checkpoints``), named by
model, layout version, seed and dtype: use ``cached_sd15_checkpoint()`` / ``cached_sdxl_checkpoint()``.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

# Bump when the generated layout or the weight initialisation changes, so stale cached files are not reused.
LAYOUT_VERSION = 2

WEIGHT_STD = 0.02
CROSS_QK_STD = 0.05

CLIP_L_VOCAB = 49408
CLIP_L_WIDTH = 768
CLIP_L_LAYERS = 12
CLIP_MAX_TOKENS = 77


def checkpoint_cache_dir() -> Path:
    root = os.environ.get("DAAM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "comfyui-daam")
    return Path(root) / "checkpoints"


# --------------------------------------------------------------------------------------------------------------
# Tensor specs: (key, shape, kind, std). kind: "normal", "ones", "zeros", "position_ids", and "bias" (normal
# around BIAS_MEAN).

# CLIP's final layer norm bias. At 0 every token vector of the conditioning has mean ~0, and A1111/Forge's
# "Original" emphasis rescales each chunk by mean(z) / mean(z * weights): 0 / 0 on some CPUs (black NaN images
# in Forge, depending on summation order). A trained CLIP's bias has a clear mean; so has this one.
BIAS_MEAN = 0.1


class _Specs:
    def __init__(self):
        self.items: list[tuple[str, tuple[int, ...], str, float]] = []

    def add(self, key, shape, kind="normal", std=WEIGHT_STD):
        self.items.append((key, tuple(shape), kind, std))

    def linear(self, prefix, n_out, n_in, bias=True, std=WEIGHT_STD):
        self.add(prefix + ".weight", (n_out, n_in), std=std)
        if bias:
            self.add(prefix + ".bias", (n_out,), "zeros")

    def conv(self, prefix, n_out, n_in, k):
        self.add(prefix + ".weight", (n_out, n_in, k, k))
        self.add(prefix + ".bias", (n_out,), "zeros")

    def norm(self, prefix, n):
        self.add(prefix + ".weight", (n,), "ones")
        self.add(prefix + ".bias", (n,), "zeros")


@dataclass(frozen=True)
class UNetLayout:
    """Shape of an LDM ``openaimodel.UNetModel``; per-level tuples are indexed by resolution level."""

    context_dim: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    depth: tuple[int, ...]  # transformer blocks after each input res block of a level (0: no attention)
    depth_out: tuple[int, ...]  # same for the output (decoder) side
    depth_mid: int
    use_linear: bool  # proj_in/proj_out as Linear (SD2/SDXL) instead of a 1x1 conv (SD1)
    adm_in_channels: int | None = None
    model_channels: int = 320
    in_channels: int = 4
    out_channels: int = 4


SD15_LAYOUT = UNetLayout(context_dim=768, channel_mult=(1, 2, 2), num_res_blocks=1, depth=(1, 1, 0),
                         depth_out=(1, 1, 0), depth_mid=1, use_linear=False)

SDXL_LAYOUT = UNetLayout(context_dim=2048, channel_mult=(1, 1, 1), num_res_blocks=2, depth=(0, 2, 10),
                         depth_out=(0, 1, 1), depth_mid=1, use_linear=True, adm_in_channels=2816)


def _resblock(s: _Specs, p, cin, cout, emb_dim):
    s.norm(p + "in_layers.0", cin)
    s.conv(p + "in_layers.2", cout, cin, 3)
    s.linear(p + "emb_layers.1", cout, emb_dim)
    s.norm(p + "out_layers.0", cout)
    s.conv(p + "out_layers.3", cout, cout, 3)
    if cin != cout:
        s.conv(p + "skip_connection", cout, cin, 1)


def _spatial_transformer(s: _Specs, p, ch, depth, context_dim, use_linear):
    def proj(name):
        if use_linear:
            s.linear(p + name, ch, ch)
        else:
            s.conv(p + name, ch, ch, 1)

    s.norm(p + "norm", ch)  # GroupNorm(32, ch)
    proj("proj_in")
    for d in range(depth):
        t = f"{p}transformer_blocks.{d}."
        for attn, kv_dim, qk_std in (("attn1", ch, WEIGHT_STD), ("attn2", context_dim, CROSS_QK_STD)):
            s.linear(t + attn + ".to_q", ch, ch, bias=False, std=qk_std)
            s.linear(t + attn + ".to_k", ch, kv_dim, bias=False, std=qk_std)
            s.linear(t + attn + ".to_v", ch, kv_dim, bias=False)
            s.linear(t + attn + ".to_out.0", ch, ch)
        s.linear(t + "ff.net.0.proj", ch * 8, ch)  # GEGLU: value and gate, inner dim 4 * ch
        s.linear(t + "ff.net.2", ch, ch * 4)
        for n in ("norm1", "norm2", "norm3"):
            s.norm(t + n, ch)
    proj("proj_out")


def _unet_specs(s: _Specs, lay: UNetLayout, p="model.diffusion_model."):
    mc = lay.model_channels
    emb = 4 * mc
    last = len(lay.channel_mult) - 1
    assert lay.depth_mid >= 1, "the middle block always has a transformer here"

    s.linear(p + "time_embed.0", emb, mc)
    s.linear(p + "time_embed.2", emb, emb)
    if lay.adm_in_channels:
        s.linear(p + "label_emb.0.0", emb, lay.adm_in_channels)
        s.linear(p + "label_emb.0.2", emb, emb)

    s.conv(p + "input_blocks.0.0", mc, lay.in_channels, 3)
    skip_chans = [mc]
    ch = mc
    idx = 1
    for level, mult in enumerate(lay.channel_mult):
        for _ in range(lay.num_res_blocks):
            blk = f"{p}input_blocks.{idx}."
            _resblock(s, blk + "0.", ch, mult * mc, emb)
            ch = mult * mc
            if lay.depth[level]:
                _spatial_transformer(s, blk + "1.", ch, lay.depth[level], lay.context_dim, lay.use_linear)
            skip_chans.append(ch)
            idx += 1
        if level != last:
            s.conv(f"{p}input_blocks.{idx}.0.op", ch, ch, 3)  # downsample
            skip_chans.append(ch)
            idx += 1

    _resblock(s, p + "middle_block.0.", ch, ch, emb)
    _spatial_transformer(s, p + "middle_block.1.", ch, lay.depth_mid, lay.context_dim, lay.use_linear)
    _resblock(s, p + "middle_block.2.", ch, ch, emb)

    idx = 0
    for level in reversed(range(len(lay.channel_mult))):
        mult = lay.channel_mult[level]
        for i in range(lay.num_res_blocks + 1):
            blk = f"{p}output_blocks.{idx}."
            _resblock(s, blk + "0.", ch + skip_chans.pop(), mult * mc, emb)
            ch = mult * mc
            sub = 1
            if lay.depth_out[level]:
                _spatial_transformer(s, blk + "1.", ch, lay.depth_out[level], lay.context_dim, lay.use_linear)
                sub = 2
            if level and i == lay.num_res_blocks:
                s.conv(f"{blk}{sub}.conv", ch, ch, 3)  # upsample
            idx += 1

    s.norm(p + "out.0", ch)
    s.conv(p + "out.2", lay.out_channels, mc, 3)


def _clip_l_specs(s: _Specs, p="cond_stage_model.transformer.text_model."):
    w = CLIP_L_WIDTH
    s.add(p + "embeddings.token_embedding.weight", (CLIP_L_VOCAB, w))
    s.add(p + "embeddings.position_embedding.weight", (CLIP_MAX_TOKENS, w), std=0.01)
    s.add(p + "embeddings.position_ids", (1, CLIP_MAX_TOKENS), "position_ids")
    for i in range(CLIP_L_LAYERS):
        lp = f"{p}encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s.linear(lp + "self_attn." + name, w, w)
        s.norm(lp + "layer_norm1", w)
        s.linear(lp + "mlp.fc1", 4 * w, w)
        s.linear(lp + "mlp.fc2", w, 4 * w)
        s.norm(lp + "layer_norm2", w)
    s.add(p + "final_layer_norm.weight", (w,), "ones")
    s.add(p + "final_layer_norm.bias", (w,), "bias")


def _vae_specs(s: _Specs, p="first_stage_model.", z: int = 4, quant_convs: bool = True):
    """The LDM autoencoder: ch 128, mults 1, 2, 4, 4, 2 res blocks; SD's has 4 latent channels and quant convs,
    the SD3 / Flux one 16 and none."""
    ch, mults, n_res = 128, (1, 2, 4, 4), 2

    def resnet(q, cin, cout):
        s.norm(q + "norm1", cin)
        s.conv(q + "conv1", cout, cin, 3)
        s.norm(q + "norm2", cout)
        s.conv(q + "conv2", cout, cout, 3)
        if cin != cout:
            s.conv(q + "nin_shortcut", cout, cin, 1)

    def mid(q, c):
        resnet(q + "block_1.", c, c)
        s.norm(q + "attn_1.norm", c)
        for name in ("q", "k", "v", "proj_out"):
            s.conv(q + "attn_1." + name, c, c, 1)
        resnet(q + "block_2.", c, c)

    # encoder
    s.conv(p + "encoder.conv_in", ch, 3, 3)
    cin = ch
    for i, m in enumerate(mults):
        for j in range(n_res):
            resnet(f"{p}encoder.down.{i}.block.{j}.", cin, ch * m)
            cin = ch * m
        if i != len(mults) - 1:
            s.conv(f"{p}encoder.down.{i}.downsample.conv", cin, cin, 3)
    mid(p + "encoder.mid.", cin)
    s.norm(p + "encoder.norm_out", cin)
    s.conv(p + "encoder.conv_out", 2 * z, cin, 3)
    if quant_convs:
        s.conv(p + "quant_conv", 2 * z, 2 * z, 1)

    # decoder
    if quant_convs:
        s.conv(p + "post_quant_conv", z, z, 1)
    cin = ch * mults[-1]
    s.conv(p + "decoder.conv_in", cin, z, 3)
    mid(p + "decoder.mid.", cin)
    for i in reversed(range(len(mults))):
        for j in range(n_res + 1):
            resnet(f"{p}decoder.up.{i}.block.{j}.", cin, ch * mults[i])
            cin = ch * mults[i]
        if i != 0:
            s.conv(f"{p}decoder.up.{i}.upsample.conv", cin, cin, 3)
    s.norm(p + "decoder.norm_out", cin)
    s.conv(p + "decoder.conv_out", 3, cin, 3)


def _materialise(s: _Specs, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for key, shape, kind, std in s.items:
        if key in out:
            raise AssertionError(f"duplicate key {key}")
        if kind == "position_ids":
            out[key] = torch.arange(shape[-1], dtype=torch.int64).reshape(shape)
        elif kind == "ones":
            out[key] = torch.ones(shape, dtype=dtype)
        elif kind == "zeros":
            out[key] = torch.zeros(shape, dtype=dtype)
        else:
            # One generator per tensor: a key's values depend only on (seed, key), not on the other keys.
            g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63))
            mean = BIAS_MEAN if kind == "bias" else 0.0
            out[key] = (torch.randn(shape, generator=g, dtype=torch.float32) * std + mean).to(dtype)
    return out


def _save_atomic(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", **metadata})
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def sd15_state_dict(seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    s = _Specs()
    _unet_specs(s, SD15_LAYOUT)
    _clip_l_specs(s)
    _vae_specs(s)
    return _materialise(s, seed, dtype)


def sdxl_state_dict(seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """UNet + VAE only (no text encoders, see the module docstring)."""
    s = _Specs()
    _unet_specs(s, SDXL_LAYOUT)
    _vae_specs(s)
    return _materialise(s, seed, dtype)


def _meta(name: str, seed: int) -> dict[str, str]:
    return {"daam_test_checkpoint": name, "seed": str(seed), "layout_version": str(LAYOUT_VERSION)}


def write_sd15_checkpoint(path, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Write a tiny SD1.5-shaped checkpoint (UNet + CLIP-L + VAE) to ``path``; returns the path."""
    return _save_atomic(sd15_state_dict(seed, dtype), path, _meta("sd15-tiny", seed))


def write_sdxl_checkpoint(path, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Write a tiny SDXL-detected checkpoint (UNet + VAE, no text encoders) to ``path``; returns the path."""
    return _save_atomic(sdxl_state_dict(seed, dtype), path, _meta("sdxl-tiny", seed))


def _cached(name: str, writer, seed: int, dtype: torch.dtype) -> Path:
    dtype_name = str(dtype).removeprefix("torch.")
    path = checkpoint_cache_dir() / f"daam-{name}-v{LAYOUT_VERSION}-seed{seed}-{dtype_name}.safetensors"
    if not path.is_file():
        writer(path, seed=seed, dtype=dtype)
    return path


def cached_sd15_checkpoint(seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Path of the tiny SD1.5 checkpoint in the cache, written on first use."""
    return _cached("sd15-tiny", write_sd15_checkpoint, seed, dtype)


def cached_sdxl_checkpoint(seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Path of the tiny SDXL (UNet + VAE) checkpoint in the cache, written on first use."""
    return _cached("sdxl-tiny", write_sdxl_checkpoint, seed, dtype)


# --------------------------------------------------------------------------------------------------------------
# In-process SDXL for the host. These need ``comfy`` importable (use the ``comfy_host`` fixture first).


def build_tiny_sdxl_model(seed: int = 0):
    """Load the tiny SDXL checkpoint with the host: returns ``(model_patcher, vae)``.

    ``model_patcher.model`` is a ``comfy.model_base.SDXL`` and ``model_patcher.model.model_config`` a
    ``comfy.supported_models.SDXL``. There is no CLIP: condition it with ``sdxl_conditioning()``.
    """
    import comfy.sd

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(cached_sdxl_checkpoint(seed)), output_vae=True, output_clip=False)
    assert clip is None
    return model, vae


def sdxl_conditioning(batch: int = 1, tokens: int = CLIP_MAX_TOKENS, seed: int = 0, width: int = 1024,
                      height: int = 1024):
    """A hand-made SDXL CONDITIONING: ``[[cross_attn [B, T, 2048], {"pooled_output": [B, 1280], ...}]]``.

    The cross-attention tensor is unit-variance like the output of CLIP's final layer norm.
    """
    g = torch.Generator().manual_seed(seed)
    cross = torch.randn((batch, tokens, 2048), generator=g)
    pooled = torch.randn((batch, 1280), generator=g)
    return [[cross, {"pooled_output": pooled, "width": width, "height": height,
                     "target_width": width, "target_height": height}]]
