"""Run inside Forge's venv: DAAM on Forge's real backend, against an fp64 reference, as JSON on stdout.

Usage: ``forge-venv/bin/python tests/helpers/forge_backend_check.py CHECKPOINT``

What it does (tests/test_forge_backend.py asserts on the result):
1. loads the random-weight SD1.5-shaped checkpoint with ``backend.loader.forge_loader``;
2. encodes a batch of two different prompts (one with ``BREAK``, weights and a word in its second chunk) and
   their negatives with Forge's text engine, and builds DAAM's layouts from the tokens Forge encoded;
3. runs two Euler steps of CFG through Forge's ``sampling_function_inner`` three times: on the plain patcher,
   on a DAAM clone, and (for the wrap case) on a clone with another extension's attn2 replace, with and without
   DAAM on top;
4. while DAAM records, forward hooks on every attn2 ``to_q``/``to_k`` (test-only) capture the projected q, k and
   the context each row was given; the reference sums softmax(q k^T / sqrt(d)) over heads in float64 and assigns
   each row to its image and branch by comparing its context with the encoded prompts.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import forge_env  # noqa: E402

CHECKPOINT = sys.argv[1] if __name__ == "__main__" else None
forge_env.import_backend()

import torch  # noqa: E402

from backend.loader import forge_loader  # noqa: E402
from backend.sampling.condition import compile_conditions  # noqa: E402
from backend.sampling.sampling_function import sampling_function_inner  # noqa: E402

from daam_core.hosts.forge.session import ForgeSession, distinct, transformer_blocks  # noqa: E402
from daam_core.hosts.forge.tokens import forge_layout, forge_tokens, pad_layout, text_engine  # noqa: E402
from daam_core.engine.recorder import RecordFilter  # noqa: E402

FILLER = ", ".join(f"word{i}" for i in range(40))  # > 75 tokens: pushes "giraffe" into chunk 2
PROMPTS = ["a photo of a dog, BREAK a red (cat:1.3) on [grass]", f"a painting of {FILLER}, a tall giraffe"]
NEGATIVES = ["blurry", "ugly, (lowres:1.2)"]


def euler(model, unet, x, sigmas, cond, uncond, cfg=5.0):
    outs = []
    for s0, s1 in zip(sigmas[:-1], sigmas[1:]):
        sigma = torch.full((x.shape[0],), float(s0))
        den = sampling_function_inner(model, x, sigma, uncond, cond, cfg, unet.model_options)
        outs.append(den.clone())
        x = x + (x - den) / s0 * (s1 - s0)
    return x, outs


def main(ckpt: str) -> dict:
    torch.manual_seed(0)
    sd = forge_loader(ckpt)
    unet = sd.forge_objects.unet
    model = unet.model
    engine = text_engine(sd)
    result: dict = {"model": type(sd).__name__}

    layouts = [forge_layout(engine, p) for p in PROMPTS + NEGATIVES]
    result["layout_ids_equal_forge"] = [list(l.ids) == forge_tokens(engine, p)[0]
                                        for l, p in zip(layouts, PROMPTS + NEGATIVES)]
    result["giraffe_positions"] = list(layouts[1].positions("giraffe"))
    result["cat_weight"] = [layouts[0].weights[p] for p in layouts[0].positions("cat")]
    result["chunks"] = [l.num_chunks for l in layouts]
    # a textual-inversion embedding (3 vectors), found by Forge by its bare name
    from backend.text_processing.textual_inversion import Embedding

    emb = Embedding(torch.randn(3, 768) * 0.01, "daamstyle")
    emb.vectors, emb.shape = 3, 768
    engine.embeddings.register_embedding(emb)
    emb_prompt = "a daamstyle portrait of a dog"
    emb_layout = forge_layout(engine, emb_prompt)
    _, fixes = forge_tokens(engine, emb_prompt)
    result["embedding_fixes"] = {str(k): list(v) for k, v in fixes.items()}
    result["embedding_positions"] = list(emb_layout.positions("daamstyle"))
    result["embedding_dog"] = list(emb_layout.positions("dog"))
    with torch.inference_mode():
        result["embedding_cond_shape"] = list(sd.get_learned_conditioning([emb_prompt]).shape)

    with torch.inference_mode():
        c = sd.get_learned_conditioning(PROMPTS)
        uc = sd.get_learned_conditioning(NEGATIVES)
    result["cond_shape"], result["uncond_shape"] = list(c.shape), list(uc.shape)
    # a batch pads every prompt to the batch's longest: the layouts must match what was encoded
    pad = lambda l, n: pad_layout(l, n, engine)  # noqa: E731
    layouts = [pad(l, c.shape[1]) for l in layouts[:2]] + [pad(l, uc.shape[1]) for l in layouts[2:]]
    cond, uncond = compile_conditions(c), compile_conditions(uc)

    h, w = 16, 24  # non-square; small enough for CI
    x0 = torch.randn(2, 4, h, w) * float(model.predictor.sigma_max)
    sigmas = [float(model.predictor.sigma_max), float(model.predictor.sigma(torch.tensor(500.0))), 0.0]

    with torch.inference_mode():
        plain_x, plain_d = euler(model, unet, x0, sigmas, cond, uncond)

        uniq, index = distinct(layouts)
        session = ForgeSession(RecordFilter(), uniq, index[:2], index[2:], (h, w), predictor=model.predictor)
        patched = session.patch(unet)
        result["patched_is_clone"] = patched is not unet and not unet.model_options.get(
            "transformer_options", {}).get("patches_replace")
        captured, handles = hook_attn2(model.diffusion_model)
        try:
            daam_x, daam_d = euler(model, patched, x0, sigmas, cond, uncond)
        finally:
            for hd in handles:
                hd.remove()
        trace = session.finish((h * 8, w * 8))
        result["image_equal"] = bool(torch.equal(plain_x, daam_x)) and all(
            torch.equal(a, b) for a, b in zip(plain_d, daam_d))
        # a NaN or constant latent would make "equal" meaningless: the test checks these
        result["latent_stats"] = {k: {"finite": bool(torch.isfinite(x).all()), "std": float(x.double().std())}
                                  for k, x in (("plain", plain_x), ("traced", daam_x))}
        result["warnings"] = trace.warnings
        result["layers"] = sorted(trace.sums)
        result["calls"] = trace.calls
        ref = reference(captured, c, uc, [l.length for l in layouts])
        errs, scale = {}, {}
        for name, acc in trace.sums.items():
            r = ref[name]
            errs[name] = float((acc.double() - r).abs().max())
            scale[name] = float(r.abs().max())
        result["max_abs_err"] = errs
        result["ref_max"] = scale
        result["ref_layers"] = sorted(ref)
        maps = trace.word_maps(["dog", "cat"], image=0)
        result["word_maps_shape"] = list(maps.shape)
        g = trace.word_maps(["giraffe"], image=1)
        result["giraffe_map_max"] = float(g.max())

        # another extension's attn2 replace, installed before DAAM: DAAM wraps it and changes nothing
        other = unet.clone()
        for key in transformer_blocks(model.diffusion_model):
            other.set_model_attn2_replace(third_party_attention, *key)
        other_x, _ = euler(model, other, x0, sigmas, cond, uncond)
        session2 = ForgeSession(RecordFilter(), uniq, index[:2], index[2:], (h, w), predictor=model.predictor)
        both_x, _ = euler(model, session2.patch(other), x0, sigmas, cond, uncond)
        trace2 = session2.finish((h * 8, w * 8))
        result["third_party_equal"] = bool(torch.equal(other_x, both_x))
        result["third_party_differs_from_plain"] = not bool(torch.equal(other_x, plain_x))
        result["third_party_recorded"] = sorted(trace2.sums) == sorted(trace.sums)

        # time window: only the second step (progress 0.5) is recorded
        session3 = ForgeSession(RecordFilter(start=0.4, end=1.0), uniq, index[:2], index[2:], (h, w),
                                predictor=model.predictor)
        euler(model, session3.patch(unet), x0, sigmas, cond, uncond)
        result["window_calls"] = session3.finish((h * 8, w * 8)).calls

    # a hook that fails while recording (heads that do not exist): reported, the image is unchanged
    with torch.inference_mode():
        session4 = ForgeSession(RecordFilter(heads=(99,)), uniq, index[:2], index[2:], (h, w),
                                predictor=model.predictor)
        failed_x, _ = euler(model, session4.patch(unet), x0, sigmas, cond, uncond)
        result["failed_hook_equal"] = bool(torch.equal(failed_x, plain_x))
        result["failed_hook_errors"] = session4.finish((h * 8, w * 8)).warnings

    # Forge's own Flux transformer (tiny): no cross-attention hook, DAAM refuses it with a message
    from backend.nn.flux import IntegratedFluxTransformer2DModel
    from daam_core.hosts.forge.session import UnsupportedModelError

    flux = IntegratedFluxTransformer2DModel(in_channels=4, vec_in_dim=8, context_in_dim=16, hidden_size=32,
                                            mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1,
                                            axes_dim=[4, 6, 6], theta=10000, qkv_bias=True, guidance_embed=False)
    try:
        transformer_blocks(flux)
        result["flux_refusal"] = None
    except UnsupportedModelError as e:
        result["flux_refusal"] = str(e)
    return result


def third_party_attention(q, k, v, extra):
    """A different attention implementation (as another extension might install): plain math, no kernel."""
    heads = extra["n_heads"]
    b, n, inner = q.shape
    d = inner // heads
    qh, kh, vh = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax((qh @ kh.transpose(-1, -2)) * d ** -0.5, dim=-1)
    return (weights @ vh).transpose(1, 2).reshape(b, n, inner)


def hook_attn2(diffusion_model):
    captured: dict[str, list] = {}
    handles = []
    for block, number, index in transformer_blocks(diffusion_model):
        part = {"input": diffusion_model.input_blocks, "middle": [diffusion_model.middle_block],
                "output": diffusion_model.output_blocks}[block][number]
        st = next(m for m in part if hasattr(m, "transformer_blocks"))
        attn = st.transformer_blocks[index].attn2
        name = f"{block}.{number}.{index}"
        calls = captured.setdefault(name, [])
        heads = attn.heads

        def on_q(mod, args, out, calls=calls, heads=heads):
            calls.append({"q": out.detach().double(), "heads": heads})

        def on_k(mod, args, out, calls=calls):
            calls[-1]["k"] = out.detach().double()
            calls[-1]["context"] = args[0].detach()

        handles += [attn.to_q.register_forward_hook(on_q), attn.to_k.register_forward_hook(on_k)]
    return captured, handles


def reference(captured, c, uc, lengths):
    """fp64 per-stream sums [streams, N, T_max]; a row's stream is found by comparing its context."""
    n_img = c.shape[0]
    known = [(i, c[i]) for i in range(n_img)] + [(n_img + i, uc[i]) for i in range(n_img)]
    t_max = max(lengths)
    out = {}
    for name, calls in captured.items():
        acc = None
        for call in calls:
            q, k, ctx, heads = call["q"], call["k"], call["context"], call["heads"]
            b, n, inner = q.shape
            d = inner // heads
            qh = q.view(b, n, heads, d).transpose(1, 2)
            kh = k.view(b, k.shape[1], heads, d).transpose(1, 2)
            probs = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1).sum(1)  # [b, N, T_call]
            if acc is None:
                acc = torch.zeros(2 * n_img, n, t_max, dtype=torch.float64)
            for row in range(b):
                stream = next(s for s, ref in known if context_matches(ctx[row], ref))
                t = lengths[stream]
                p = probs[row]
                p = p.view(n, p.shape[-1] // t, t).sum(1)  # contexts repeated to a common length
                acc[stream, :, :t] += p
        out[name] = acc
    return out


def context_matches(ctx, ref) -> bool:
    t = ref.shape[0]
    if ctx.shape[0] % t:
        return False
    return all(torch.equal(ctx[j * t:(j + 1) * t].to(ref.dtype), ref) for j in range(ctx.shape[0] // t))


if __name__ == "__main__":
    print("DAAM_RESULT " + json.dumps(main(CHECKPOINT)))
