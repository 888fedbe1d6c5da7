"""Train the joint-attention shapes model (daam_core/shapes/dit.py) on synthetic scenes.

    python tools/train_shapes_dit.py --work runs/dit --time-budget 4200       # train (resumes from --work)
    python tools/train_shapes_dit.py --work runs/dit --export daam_core/shapes/assets/shapes_dit

Rectified flow (SD3's objective): ``x_t = (1 - t) x_0 + t e`` with ``t`` logit-normal, the transformer predicts
``e - x_0``; ``x_0`` are the scenes' latents under the shapes model's VAE, the conditioning is its frozen CLIP
(10% empty captions, for classifier-free guidance). AdamW, cosine learning rate over the step count or the time
budget, an EMA of the weights (decay 0.999), bf16 autocast on CPU. The two-object colour/shape pairs of
``scenes.held_out_prompts`` are never shown (``train_shapes.batch_of_scenes``). Checkpoints are safetensors in
--work with a JSON-lines loss log.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from daam_core.shapes import dit  # noqa: E402
from train_shapes import batch_of_scenes, ema_update, to_unit  # noqa: E402


class PromptCache:
    """SD3 prompt embeddings ``[77 + T5_TOKENS, 192]`` and pooled vectors ``[192]`` per caption, made once."""

    def __init__(self, pipe):
        self.pipe, self.cache = pipe, {}

    def __call__(self, captions):
        for c in set(captions) - set(self.cache):
            pe, _, pooled, _ = self.pipe.encode_prompt(c, None, None, do_classifier_free_guidance=False,
                                                       max_sequence_length=dit.T5_TOKENS)
            self.cache[c] = (pe[0], pooled[0])
        return (torch.stack([self.cache[c][0] for c in captions]), torch.stack([self.cache[c][1] for c in captions]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=100000)
    ap.add_argument("--time-budget", type=float, default=0.0, help="seconds; 0 = run --steps")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--export", type=Path, help="write the EMA transformer of --work there and stop")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.export:
        from diffusers import SD3Transformer2DModel

        ema = SD3Transformer2DModel.from_pretrained(str(args.work / "transformer"), use_safetensors=True)
        ema.to(torch.float16).save_pretrained(str(args.export / "transformer"), safe_serialization=True)
        print(f"wrote {args.export / 'transformer'}")
        return 0
    model = dit.build_transformer(seed=0)
    pipe = dit.assemble(model)  # its VAE and prompt encoding; the transformer in it is the one trained
    state_file = args.work / "state.safetensors"
    step = 0
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    meta_file = args.work / "meta.json"
    if state_file.is_file():
        from safetensors.torch import load_file

        st = load_file(str(state_file))
        model.load_state_dict({k[6:]: v for k, v in st.items() if k.startswith("model.")})
        ema.load_state_dict({k[4:]: v for k, v in st.items() if k.startswith("ema.")})
        step = json.loads(meta_file.read_text())["step"]
        print(f"resumed at step {step} (optimiser moments start afresh)")
    prompts = PromptCache(pipe)
    rng = np.random.default_rng(1000 + step)
    log = open(args.work / "log.jsonl", "a")
    t0 = time.time()
    start_step = step
    while True:
        elapsed = time.time() - t0
        done = step - start_step
        progress = elapsed / args.time_budget if args.time_budget else done / max(args.steps - start_step, 1)
        if progress >= 1 or step >= args.steps:
            break
        lr = args.lr * min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        for g in opt.param_groups:
            g["lr"] = lr
        imgs, caps = batch_of_scenes(rng, args.batch)
        caps = ["" if rng.random() < 0.1 else c for c in caps]
        with torch.no_grad():
            x0 = pipe.vae.encode(to_unit(imgs)).latent_dist.mode()
            pe, pooled = prompts(caps)
        t = torch.sigmoid(torch.randn(args.batch))
        noise = torch.randn_like(x0)
        tt = t[:, None, None, None]
        xt = (1 - tt) * x0 + tt * noise
        with torch.autocast("cpu", torch.bfloat16):
            pred = model(hidden_states=xt, encoder_hidden_states=pe, pooled_projections=pooled,
                         timestep=t * 1000).sample
        loss = F.mse_loss(pred.float(), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema_update(ema, model, min(0.999, (1 + done) / (10 + done)))
        step += 1
        if step % 50 == 0:
            log.write(json.dumps({"step": step, "loss": round(loss.item(), 5), "lr": lr,
                                  "seconds": round(time.time() - t0, 1)}) + "\n")
            log.flush()
        if step % args.save_every == 0:
            save(args, model, ema, step)
    save(args, model, ema, step)
    print(f"stopped at step {step} after {time.time() - t0:.0f} s")
    return 0


def save(args, model, ema, step) -> None:
    from safetensors.torch import save_file

    st = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    st.update({f"ema.{k}": v.contiguous() for k, v in ema.state_dict().items()})
    save_file(st, str(args.work / "state.safetensors"))
    ema.save_pretrained(str(args.work / "transformer"), safe_serialization=True)
    (args.work / "meta.json").write_text(json.dumps({"step": step}))


if __name__ == "__main__":
    raise SystemExit(main())
