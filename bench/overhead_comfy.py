"""Overhead of DAAM tracing in ComfyUI, in-process, with the host's stock sampler.

The host (``$COMFYUI_DIR`` or ``$DAAM_CACHE/ComfyUI-0.3.75``) is imported on the CPU the way the tests do it. The
model is the host's own SD1.5 UNet built from the full SD1.5 ``unet_config`` (``comfy.supported_models.SD15``,
320 channels, real block layout, 860 M parameters) with seeded random weights, wrapped in
``comfy.model_patcher.ModelPatcher``; the conditionings are seeded random ``[1, 77, 768]`` tensors. Sampling is
``comfy.sample.sample`` (what KSampler runs), euler / normal, CFG 7.5, inside ``torch.inference_mode()``.

Configurations (``--configs``): ``plain`` = the model; ``all`` = ``DAAMTraceModel().trace(model)[0]`` with the node's
defaults; ``fN`` = a clone recording only the layers at latent factor N (``nodes.session.patch_model`` with
``RecordFilter(factors=(N,))``; the node's "low" option records factors 4 and 8: ``low``); ``cond`` = defaults but
``record_negative=False``. Ratio = traced time / plain time of the same repetition, median over ``--pairs``.

The heat maps of the last traced sampling are computed as the DAAM Heatmaps node does (``build_trace`` with the host's
SD1 tokenizer, then the word maps) and timed separately. One extra instrumented run splits the recorder's time by
layer resolution.

Example::

    python bench/overhead_comfy.py --size 512 --steps 3 --pairs 5
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

import _common as C

PROMPT = "a cat and a dog on a red sofa"
NEGATIVE = "blurry"
WORDS = ["cat", "dog", "red", "sofa"]

SD15_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


def import_host() -> Path:
    host = Path(os.environ.get("COMFYUI_DIR") or C.daam_cache() / "ComfyUI-0.3.75")
    if not (host / "comfy").is_dir():
        raise SystemExit(f"no ComfyUI host at {host}: run tools/setup_host.sh or set COMFYUI_DIR")
    # The host goes first: its nodes.py must win over this repository's nodes/ package.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != C.REPO]
    sys.path.insert(0, str(host))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management as mm

    assert mm.cpu_state == mm.CPUState.CPU
    return host


def import_pack():
    name = "comfyui_daam_bench"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, C.REPO / "__init__.py",
                                                      submodule_search_locations=[str(C.REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return (importlib.import_module(f"{name}.nodes.nodes"), importlib.import_module(f"{name}.nodes.session"),
            importlib.import_module(f"{name}.daam_core.engine.recorder"))


def build_sd15(seed: int):
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SD15(dict(SD15_UNET_CONFIG))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    C.seeded_init_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--configs", default="plain,all,f4")
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-breakdown", action="store_true")
    args = ap.parse_args()

    host = import_host()
    import comfy.sample
    import comfy.sd1_clip

    pack, session_mod, recorder_mod = import_pack()
    configs = args.configs.split(",")
    if configs[0] != "plain":
        raise SystemExit("the first configuration must be plain (the baseline)")

    t0 = time.perf_counter()
    model = build_sd15(args.seed)
    C.log(f"built the host's SD15 model in {time.perf_counter() - t0:.1f}s "
          f"({C.count_params(model.model.diffusion_model) / 1e6:.0f} M parameters)")
    g = torch.Generator().manual_seed(args.seed + 100)
    positive = [[torch.randn(1, 77, 768, generator=g), {}]]
    negative = [[torch.randn(1, 77, 768, generator=g), {}]]
    latent = torch.zeros(1, 4, args.size // 8, args.size // 8)
    noise = comfy.sample.prepare_noise(latent, args.seed)

    def sample(m):
        with torch.inference_mode():
            return comfy.sample.sample(m, noise, args.steps, args.cfg, "euler", "normal", positive, negative, latent,
                                       denoise=1.0, seed=args.seed, disable_pbar=True)

    def traced_model(name):
        if name == "all":
            return pack.DAAMTraceModel.execute(model)[0]
        if name == "cond":
            return pack.DAAMTraceModel.execute(model, record_negative=False)[0]
        if name == "low":
            return pack.DAAMTraceModel.execute(model, resolutions="low (1/32, 1/64)")[0]
        if name.startswith("f") and name[1:].isdigit():
            return session_mod.patch_model(model, recorder_mod.RecordFilter(factors=(int(name[1:]),)))[0]
        raise SystemExit(f"unknown configuration {name!r}")

    tokenizer = comfy.sd1_clip.SD1Tokenizer()
    maps_s = defaultdict(list)
    nbytes = {}
    last = {}

    def make_run(name):
        m = traced_model(name)  # cloned once, like a workflow that keeps the traced MODEL

        def run():
            t0 = time.perf_counter()
            out = sample(m)
            t = time.perf_counter()
            last[name] = out
            tr = pack.build_trace(m, tokenizer, {"samples": out}, PROMPT, NEGATIVE)
            pack.maps_for(tr, WORDS, "cond")
            maps_s[name].append(time.perf_counter() - t)
            nbytes[name] = tr.nbytes()
            return C.Timed(t - t0)

        return run

    runs = {"plain": lambda: last.__setitem__("plain", sample(model))}
    for name in configs[1:]:
        runs[name] = make_run(name)
    timing = C.interleaved(runs, args.pairs)
    for name in configs[1:]:
        m = maps_s[name][-args.pairs:]
        timing[name]["maps_s_median"] = round(statistics.median(m), 4)
        with_maps = [(t + s) / b for t, s, b in zip(timing[name]["times_s"], m, timing["plain"]["times_s"])]
        timing[name]["ratio_with_maps_median"] = round(statistics.median(with_maps), 4)
        timing[name]["recorder_bytes"] = nbytes[name]
        timing[name]["identical_to_plain"] = bool(torch.equal(last[name], last["plain"]))

    figures = {"bench": "overhead_comfy", "host": str(host), "model": "sd15 (host UNet, full width)",
               "size": args.size, "steps": args.steps, "pairs": args.pairs, "cfg": args.cfg,
               "sampler": "euler/normal via comfy.sample.sample", "timing": timing}

    if not args.no_breakdown:
        m = pack.DAAMTraceModel.execute(model)[0]
        session = session_mod.session_of(m)
        rec = session.recorder
        record = rec.record
        rec_time, rec_calls = defaultdict(float), defaultdict(int)

        def timed_record(name, *a, **k):
            t = time.perf_counter()
            try:
                return record(name, *a, **k)
            finally:
                rec_time[name] += time.perf_counter() - t
                rec_calls[name] += 1

        rec.record = timed_record
        t = time.perf_counter()
        out = sample(m)
        total = time.perf_counter() - t
        tr = pack.build_trace(m, tokenizer, {"samples": out}, PROMPT, NEGATIVE)
        plain = timing["plain"]["median_s"]
        by_factor = {}
        for name, info in tr.layers.items():
            f = by_factor.setdefault(info.factor, {"hw": list(info.hw), "layers": 0, "heads": info.heads,
                                                   "calls": 0, "record_s": 0.0})
            f["layers"] += 1
            f["calls"] += rec_calls[name]
            f["record_s"] += rec_time[name]
        for f in by_factor.values():
            f["record_ms_per_call"] = round(1000 * f["record_s"] / max(f["calls"], 1), 3)
            f["record_share_of_plain"] = round(f["record_s"] / plain, 4)
            f["record_s"] = round(f["record_s"], 4)
        rec_total = sum(f["record_s"] for f in by_factor.values())
        figures["breakdown"] = {"instrumented_total_s": round(total, 4),
                                "by_factor": {str(k): v for k, v in sorted(by_factor.items())},
                                "record_total_s": round(rec_total, 4),
                                "record_share_of_plain": round(rec_total / plain, 4),
                                "recorder_bytes": tr.nbytes()}
    figures["machine"] = C.machine_info()
    C.emit(figures)


if __name__ == "__main__":
    main()
