"""The host contract's time on diffusers: time buckets and the time window of UNet and joint-attention pipelines.

The expected steps come from the pipeline itself: a spy on the network records the timestep of every call, its
step is its index in the scheduler's own ``timesteps``, and the window is read as diffusers' pipelines read
``control_guidance_start`` / ``control_guidance_end`` (step ``i`` of ``N`` runs unless ``i / N < start`` or
``(i + 1) / N > end``, ``StableDiffusionControlNetPipeline``).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from daam_core import trace  # noqa: E402
from daam_core.engine.recorder import RecordFilter  # noqa: E402
from daam_core.hosts.diffusers.adapter import DiffusersTrace  # noqa: E402
from helpers.tiny_pipelines import find_t5_tokenizer_dir, tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline  # noqa: E402

STEPS = 8


@pytest.fixture(scope="module")
def pipes(clip_tokenizer_dir, comfyui_dir):
    t5 = comfyui_dir / "comfy" / "text_encoders" / "t5_tokenizer"
    if not (t5 / "tokenizer.json").is_file():
        t5 = find_t5_tokenizer_dir()
    return {"sd": tiny_sd_pipeline(seed=0, tokenizer_dir=clip_tokenizer_dir),
            "sd3": tiny_sd3_pipeline(seed=1, tokenizer_dir=clip_tokenizer_dir, t5_dir=t5),
            "flux": tiny_flux_pipeline(seed=0, tokenizer_dir=clip_tokenizer_dir, t5_dir=t5)}


def run(name, pipe, steps=STEPS):
    gen = torch.Generator().manual_seed(0)
    kw = {} if name == "sd" else {"max_sequence_length": 32}
    return pipe("a red car and a dog", num_inference_steps=steps, height=32, width=32, output_type="np",
                generator=gen, **kw).images


def host_steps(name, pipe):
    """The step (index in the scheduler's timesteps) of every network call of one run, from a spy on the network."""
    net = pipe.unet if name == "sd" else pipe.transformer
    seen = []

    def spy(module, args, kwargs):
        t = kwargs.get("timestep", args[1] if name == "sd" and len(args) > 1 else args[2] if len(args) > 2 else None)
        seen.append(float(t.flatten()[0]) * (1000.0 if name == "flux" else 1.0))

    handle = net.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        run(name, pipe)
    finally:
        handle.remove()
    table = [float(t) for t in pipe.scheduler.timesteps]
    return [min(range(len(table)), key=lambda i: abs(table[i] - t)) for t in seen]


def controlnet_keep(i, n, start, end):
    return not (i / n < start or (i + 1) / n > end)


@pytest.mark.parametrize("name", ["sd", "sd3", "flux"])
def test_time_buckets_follow_the_schedulers_steps(pipes, name):
    pipe = pipes[name]
    steps = host_steps(name, pipe)
    assert sorted(set(steps)) == list(range(STEPS))
    with DiffusersTrace(pipe, RecordFilter(time_buckets=4)) if name == "sd" else trace(pipe, time_buckets=4) as tc:
        run(name, pipe)
    res = tc.result()
    assert res.time_calls
    for layer, calls in res.time_calls.items():
        assert calls == [sum(1 for i in steps if i * 4 // STEPS == b) for b in range(4)], layer
        torch.testing.assert_close(res.time_sums[layer].sum(0), res.sums[layer])


@pytest.mark.parametrize("name", ["sd", "sd3", "flux"])
@pytest.mark.parametrize("window", [(0.0, 0.5), (0.5, 1.0), (0.25, 0.75)])
def test_time_window_keeps_the_steps_diffusers_keeps(pipes, name, window):
    pipe = pipes[name]
    steps = host_steps(name, pipe)
    plain = run(name, pipe)
    with trace(pipe, time_window=window) as tc:
        traced = run(name, pipe)
    assert (plain == traced).all()
    expected = sum(1 for i in steps if controlnet_keep(i, STEPS, *window))
    assert 0 < expected < len(steps)
    assert set(tc.result().calls.values()) == {expected}
