"""What an attention layer is and how its image queries lie on a spatial grid.

The engine does not know model architectures: a host adapter describes each traced layer (its part of the
network and its kind) and gives the recorder a *grid rule* that maps a call's query count to a spatial shape.
Two rules cover today's models:

- :class:`UNetGrid`: the latent after ``log2(factor)`` stride-2 downsamplings (SD1.x, SD2.x, SDXL);
- :class:`PatchGrid`: the latent cut into ``p x p`` patches, row-major (SD3 MMDiT, Flux);
- :class:`VideoGrid`: a video latent's frames, each cut into ``p x p`` patches, frame after frame. It declares
  ``frames``: the trace then gives each frame a map of its own (:meth:`AttentionTrace.from_recorder`).

A grid also declares the network parts its model has (``UNetGrid``: down, mid, up; a ``PatchGrid`` gets them
from its adapter's family), and the recorder checks its filter against them. A new model family with another
token order adds a rule here and an adapter, not cases in the recorder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

UNET_PARTS = ("down", "mid", "up")


@dataclass
class LayerInfo:
    """An attention layer as seen during one sampling.

    Attributes
    ----------
    name : str
        Host id of the layer (diffusers module path, ComfyUI ``block.index.transformer``, ``double.3``).
    part : str
        Part of the network, as the adapter names it: ``"down"``, ``"mid"``, ``"up"`` (UNet); a transformer
        family's parts (``"joint"``, ``"double"``, ``"single"``, ...).
    kind : str
        ``"cross"``: the keys are the text alone; ``"joint"``: text and image tokens in one sequence.
    order : int
        Order of first call within a model forward pass.
    factor : int
        Spatial downsampling of the layer's grid relative to the latent (a DiT's patch size).
    hw : tuple of int
        Spatial shape ``(h, w)`` of the layer's image queries.
    heads : int
        Number of attention heads of the layer.
    """

    name: str
    part: str
    kind: str = "cross"
    order: int = 0
    factor: int = 1
    hw: tuple[int, int] = (0, 0)
    heads: int = 0

    @property
    def location(self) -> str:
        """The former name of :attr:`part` (UNet traces)."""
        return self.part


def downsampled(size: int, factor: int) -> int:
    """Size after ``log2(factor)`` stride-2 convolutions with padding 1 (a UNet downsample)."""
    while factor > 1:
        size = (size + 1) // 2
        factor //= 2
    return size


def is_power_of_two(n: int) -> bool:
    return isinstance(n, int) and n >= 1 and (n & (n - 1)) == 0


class UNetGrid:
    """Grid rule of a UNet: a layer's queries are the latent downsampled by a power of two.

    Parameters
    ----------
    latent_hw : (int, int)
        Height and width of the latent the model denoises.
    max_factor : int
        Largest downsampling tried.
    """

    parts = UNET_PARTS

    def __init__(self, latent_hw: tuple[int, int], max_factor: int = 64):
        self.latent_hw = (int(latent_hw[0]), int(latent_hw[1]))
        self.max_factor = max_factor

    def locate(self, n_queries: int) -> tuple[int, tuple[int, int]]:
        """``(factor, (h, w))`` of a layer with ``n_queries`` image queries.

        The shape comes from the latent's real height and width, never from ``sqrt(N)``, so non-square and
        odd sizes work. Raises ValueError when no power-of-two downsampling fits.
        """
        h, w = self.latent_hw
        factor = 1
        while factor <= self.max_factor:
            hh, ww = downsampled(h, factor), downsampled(w, factor)
            if hh * ww == n_queries:
                return factor, (hh, ww)
            factor *= 2
        raise ValueError(f"a cross-attention call with {n_queries} queries does not fit a {h}x{w} latent "
                         f"at any power-of-two downsampling")


class PatchGrid:
    """Grid rule of a transformer: the latent cut into ``patch x patch`` patches, row-major.

    Parameters
    ----------
    latent_hw : (int, int)
        Height and width of the latent.
    patch : int
        Patch size (2 for SD3 and Flux). The grid is ``(ceil(h / p), ceil(w / p))``: hosts pad the latent up.
    parts : tuple of str, optional
        The network parts of the model (its family's); None = not checked.
    """

    def __init__(self, latent_hw: tuple[int, int], patch: int, parts: tuple[str, ...] | None = None):
        if not is_power_of_two(int(patch)):
            raise ValueError(f"patch size must be a power of two, got {patch}")
        self.latent_hw = (int(latent_hw[0]), int(latent_hw[1]))
        self.patch = int(patch)
        self.parts = tuple(parts) if parts is not None else None
        self.hw = (math.ceil(self.latent_hw[0] / self.patch), math.ceil(self.latent_hw[1] / self.patch))

    @property
    def n_image(self) -> int:
        """Image tokens of the generated latent."""
        return self.hw[0] * self.hw[1]

    def locate(self, n_queries: int) -> tuple[int, tuple[int, int]]:
        if n_queries != self.n_image:
            raise ValueError(f"{n_queries} image queries do not match the {self.hw[0]}x{self.hw[1]} patch grid of "
                             f"a {self.latent_hw[0]}x{self.latent_hw[1]} latent (patch {self.patch})")
        return self.patch, self.hw


class VideoGrid(PatchGrid):
    """Grid rule of a video transformer: frame after frame, each frame's ``patch x patch`` patches row-major.

    A layer's queries are located as the frames stacked top to bottom (``(frames * h, w)``), which is the same
    row-major order; :attr:`frames` tells the trace to cut them into one ``h x w`` map per frame.

    Parameters
    ----------
    latent_fhw : (int, int, int)
        Frames, height and width of the video latent.
    patch : int
        Spatial patch size; the grid is ``ceil(h / p) x ceil(w / p)`` per frame (hosts pad the latent up).
    frame_patch : int
        Latent frames per token frame (1 for Wan); ``ceil(frames / frame_patch)`` token frames.
    parts : tuple of str, optional
        The network parts of the model; None = not checked.
    """

    def __init__(self, latent_fhw: tuple[int, int, int], patch: int, frame_patch: int = 1,
                 parts: tuple[str, ...] | None = None):
        super().__init__(latent_fhw[1:], patch, parts)
        if int(frame_patch) < 1:
            raise ValueError(f"frame patch must be >= 1, got {frame_patch}")
        self.frames = math.ceil(int(latent_fhw[0]) / int(frame_patch))

    @property
    def n_image(self) -> int:
        """Video tokens: every frame's patches."""
        return self.frames * self.hw[0] * self.hw[1]

    def locate(self, n_queries: int) -> tuple[int, tuple[int, int]]:
        if n_queries != self.n_image:
            raise ValueError(f"{n_queries} video queries do not match {self.frames} frames of {self.hw[0]}x"
                             f"{self.hw[1]} patches ({self.latent_hw[0]}x{self.latent_hw[1]} latent, patch "
                             f"{self.patch})")
        return self.patch, (self.frames * self.hw[0], self.hw[1])
