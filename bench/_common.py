"""Shared helpers of the benchmark scripts: machine facts, interleaved timing, the benchmark models.

Every script prints progress on stderr and ends by printing exactly one JSON line on stdout with its figures.
Timings are ratios measured in one process with interleaved repetitions: repetition ``i`` runs every
configuration once (in an order that rotates with ``i``), and each configuration's time is divided by the plain
run of the same repetition; the median of those ratios is the figure. Absolute times are reported as context.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def log(*args) -> None:
    print("[bench]", *args, file=sys.stderr, flush=True)


def daam_cache() -> Path:
    return Path(os.environ.get("DAAM_CACHE") or Path.home() / ".cache" / "comfyui-daam")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    info = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": "cpu",
        "platform": platform.platform(),
    }
    for name in ("diffusers", "transformers", "numpy"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # not installed in this venv
            pass
    return info


def loadavg() -> float:
    """1-minute load average (other work on the machine shows here; this process adds up to its threads)."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return -1.0


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def emit(figures: dict) -> None:
    """The script's result: one JSON line on stdout (the last line the script prints)."""
    sys.stdout.flush()
    print(json.dumps(figures, sort_keys=False, default=_jsonable), flush=True)


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    return str(x)


class Timed(float):
    """Returned by a timed callable to report its own duration (e.g. to leave post-processing out).

    The float is wall seconds; ``cpu`` the process CPU seconds of the same span (None: the harness measures the
    whole call)."""

    def __new__(cls, wall: float, cpu: float | None = None):
        obj = super().__new__(cls, wall)
        obj.cpu = cpu
        return obj


class Clock:
    """Wall and process CPU time since construction: ``c = Clock(); ...; wall, cpu = c.read()``."""

    def __init__(self):
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall0, time.process_time() - self.cpu0


def spread(values: list[float]) -> dict:
    """Median, quartiles and range of a list (``statistics.quantiles``, inclusive method)."""
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else (values[0],) * 3
    return {"median": round(statistics.median(values), 4), "q1": round(q1, 4), "q3": round(q3, 4),
            "min": round(min(values), 4), "max": round(max(values), 4)}


def with_maps_summary(traced: dict, plain: dict, maps_wall: list[float], maps_cpu: list[float]) -> dict:
    """Ratios of one traced run of :func:`interleaved` against the plain one, without and with the time of
    computing the word maps after sampling (``maps_wall`` / ``maps_cpu``: one per timed pair)."""
    with_maps = [(t + m) / b for t, m, b in zip(traced["times_s"], maps_wall, plain["times_s"])]
    cpu_with_maps = [(t + m) / b for t, m, b in zip(traced["cpu_times_s"], maps_cpu, plain["cpu_times_s"])]
    return {"maps_s_median": round(statistics.median(maps_wall), 4),
            "maps_cpu_s_median": round(statistics.median(maps_cpu), 4),
            "ratio_median": traced["ratio_median"], "ratio_spread": traced["ratio_spread"],
            "cpu_ratio_spread": traced["cpu_ratio_spread"],
            "ratio_with_maps_median": round(statistics.median(with_maps), 4),
            "cpu_ratio_with_maps_spread": spread(cpu_with_maps),
            "ratios": traced["ratios"], "cpu_ratios": traced["cpu_ratios"],
            "ratios_with_maps": [round(r, 4) for r in with_maps]}


def interleaved(runs: dict[str, Callable[[], object]], pairs: int, baseline: str = "plain",
                warmup: int = 1) -> dict:
    """Time every configuration ``pairs`` times, interleaved, and summarise ratios against ``baseline``.

    Repetition ``i`` runs the configurations in an order rotated by ``i`` (with two: plain-traced, traced-plain,
    ...), so slow drifts of the machine fall on both sides. Each run is measured in wall time and in *process CPU
    time* (``time.process_time``): with one torch thread the CPU time of this process hardly depends on what else
    the machine runs, so it is the figure to trust on a shared machine; wall time is reported beside it.

    A callable may return a :class:`Timed` to report its own duration instead of the whole call's.
    Returns a dict: per configuration ``times_s`` / ``cpu_times_s`` (every repetition), ``median_s`` /
    ``cpu_median_s`` and, for every configuration but the baseline, ``ratios`` / ``cpu_ratios`` (its time / the
    baseline's time of the same repetition) with their ``ratio_spread`` / ``cpu_ratio_spread`` (median, quartiles,
    range) and the ``ratio_median``, ``ratio_min``, ``ratio_max`` of the wall ratios.
    """
    names = list(runs)
    for w in range(warmup):
        for name in names:
            log(f"warm-up {w + 1}/{warmup}: {name}")
            runs[name]()
    times = {n: [] for n in names}
    cpus = {n: [] for n in names}
    loads = []
    for rep in range(pairs):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            gc.collect()
            clock = Clock()
            ret = runs[name]()
            wall, cpu = clock.read()
            if isinstance(ret, Timed):
                wall = float(ret)
                cpu = ret.cpu if ret.cpu is not None else cpu
            times[name].append(wall)
            cpus[name].append(cpu)
        loads.append(loadavg())
        log(f"rep {rep + 1}/{pairs}: " + ", ".join(f"{n} {times[n][-1]:.3f}s (cpu {cpus[n][-1]:.3f}s)" for n in names)
            + f" (load {loads[-1]})")
    out = {}
    for name in names:
        entry = {"median_s": round(statistics.median(times[name]), 4), "times_s": [round(t, 4) for t in times[name]],
                 "cpu_median_s": round(statistics.median(cpus[name]), 4),
                 "cpu_times_s": [round(t, 4) for t in cpus[name]]}
        if name != baseline:
            ratios = [t / b for t, b in zip(times[name], times[baseline])]
            cpu_ratios = [t / b for t, b in zip(cpus[name], cpus[baseline])]
            entry.update(ratio_median=round(statistics.median(ratios), 4), ratio_min=round(min(ratios), 4),
                         ratio_max=round(max(ratios), 4), ratios=[round(r, 4) for r in ratios],
                         ratio_spread=spread(ratios), cpu_ratios=[round(r, 4) for r in cpu_ratios],
                         cpu_ratio_spread=spread(cpu_ratios))
        out[name] = entry
    out["_loadavg_after_each_rep"] = loads
    return out


# -- models ----------------------------------------------------------------------------------------------------

def seeded_init_(module: torch.nn.Module, seed: int, std: float = 0.02, qk_std: float = 0.05) -> torch.nn.Module:
    """Deterministic random weights for every parameter (hosts may leave weights uninitialised).

    Norm layers (GroupNorm, LayerNorm) get weight 1 and bias 0; every other parameter normal(0, std) for weights
    (cross-attention ``to_q``/``to_k`` normal(0, qk_std) so token maps have some contrast) and 0 for biases.
    Activations stay finite through a full-width UNet.
    """
    g = torch.Generator().manual_seed(seed)
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d)
    with torch.no_grad():
        for mname, m in module.named_modules():
            for pname, p in m.named_parameters(recurse=False):
                if isinstance(m, norms):
                    p.fill_(1.0 if pname == "weight" else 0.0)
                elif pname == "bias":
                    p.zero_()
                else:
                    s = qk_std if ("attn2" in mname and mname.rsplit(".", 1)[-1] in ("to_q", "to_k")) else std
                    p.copy_((torch.randn(p.shape, generator=g, dtype=torch.float32) * s).to(p.dtype))
    return module


def empty_module(factory):
    """Build a module without its (slow, thrown away) default initialisation: on the meta device, then
    materialised uninitialised on the CPU (use :func:`seeded_init_` next)."""
    with torch.device("meta"):
        m = factory()
    return m.to_empty(device="cpu")


def clip_tokenizer():
    """The CLIP tokenizer of ``daam_core.hosts.diffusers.tokenizers`` (a local BPE vocabulary, never a hub download)."""
    from daam_core.hosts.diffusers.tokenizers import clip_tokenizer as tok

    t = tok()
    if t.model_max_length > 77:  # ComfyUI's copy of the vocabulary says 8192 (the host chunks prompts itself)
        t.model_max_length = 77
    return t


def small_text_encoder(hidden: int, seed: int, layers: int = 1, projection: bool = False, heads: int | None = None):
    """A random CLIP text encoder of the real width and 1 layer: its cost is not what is measured."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=layers, num_attention_heads=heads or max(1, hidden // 64),
                            max_position_embeddings=77, projection_dim=hidden, bos_token_id=49406,
                            eos_token_id=49407, pad_token_id=49407)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def tiny_vae(seed: int, levels: int = 4):
    """A tiny random VAE; ``levels`` = 4 gives the real scale factor 8 (decoding is not timed)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32,) * levels,
                         down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, layers_per_block=1, norm_num_groups=32,
                         sample_size=512).eval()


def sd15_pipeline(seed: int = 0):
    """SD1.5-shaped diffusers pipeline: the full-width UNet (``UNet2DConditionModel()`` defaults are SD1.5's layout,
    320/640/1280/1280 channels, 2 res blocks per level, cross-attention in 3 down, 3 up blocks and the mid block,
    8 heads, with the context width set to SD1.5's 768; 860 M parameters) with seeded random weights, a 1-layer width-768 CLIP text encoder and a
    tiny VAE with scale factor 8."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    unet = empty_module(lambda: UNet2DConditionModel(sample_size=64, cross_attention_dim=768)).eval()  # default: 1280
    seeded_init_(unet, seed)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=tiny_vae(seed + 1), text_encoder=small_text_encoder(768, seed + 2),
                                   tokenizer=clip_tokenizer(), unet=unet, scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_pipeline(seed: int = 0):
    """SDXL-shaped diffusers pipeline: the full SDXL UNet layout (320/640/1280 channels, transformer depths 1/2/10,
    head size 64, context 2048, text-time conditioning; 2.6 G parameters) with seeded random weights, 1-layer text
    encoders of the real widths (768 and 1280) and a tiny VAE with scale factor 8."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    unet = empty_module(lambda: UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816)).eval()
    seeded_init_(unet, seed)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   num_train_timesteps=1000, timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=tiny_vae(seed + 1), text_encoder=small_text_encoder(768, seed + 2),
                                     text_encoder_2=small_text_encoder(1280, seed + 3, projection=True),
                                     tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet,
                                     scheduler=sched, force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bench_tiny_pipeline(seed: int = 0):
    """The tiny SD1.x pipeline shared with the reference library: ``daam_core.cli.demo_pipeline``'s UNet (channels 32/64/64,
    cross-attention at latent factors 1 and 2 plus the mid block, 2 heads) with ``sample_size`` 64 and a VAE of
    scale factor 8, so that 512x512 images have the 64x64 latent the reference library assumes."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from daam_core.cli.demo_pipeline import tiny_sd_unet

    unet = tiny_sd_unet(seed, sample_size=64)
    seeded_init_(unet, seed)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=tiny_vae(seed + 1), text_encoder=small_text_encoder(32, seed + 2, layers=2, heads=4),
                                   tokenizer=clip_tokenizer(), unet=unet, scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
