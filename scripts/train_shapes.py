"""Train the "shapes" model (see daam_core/shapes_model.py) on synthetic scenes.

    python scripts/train_shapes.py --work runs/shapes --steps 20000          # train (resumes from --work)
    python scripts/train_shapes.py --work runs/shapes --export daam_core/assets/shapes   # write the pipeline

Phase 1 trains the one-level VAE to be the identity (a few hundred steps); phase 2 trains the UNet and
the text encoder together with the epsilon objective and min-SNR weighting, 10% empty captions (for
classifier-free guidance) and an EMA of the weights. Checkpoints are safetensors in --work; a loss log
(JSON lines) sits beside them. Two-object colour/shape combinations listed in
``daam_core.scenes.held_out_prompts`` are never shown in training.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from daam_core import scenes, shapes_model  # noqa: E402
from daam_core.tiny import clip_tokenizer  # noqa: E402


def batch_of_scenes(rng, n):
    imgs, caps = [], []
    while len(imgs) < n:
        s = scenes.random_scene(rng)
        if scenes.is_held_out(s):
            continue
        imgs.append(s.image)
        caps.append(s.caption)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, caps


class Captions:
    def __init__(self, tokenizer):
        self.tok, self.cache = tokenizer, {}

    def ids(self, captions):
        out = []
        for c in captions:
            if c not in self.cache:
                self.cache[c] = self.tok(c, padding="max_length", max_length=77, truncation=True,
                                         return_tensors="pt").input_ids[0]
            out.append(self.cache[c])
        return torch.stack(out)


def save_state(path: Path, modules: dict, meta: dict):
    from safetensors.torch import save_file

    tensors = {f"{name}.{k}": v.detach().float().contiguous() for name, m in modules.items()
               for k, v in m.state_dict().items()}
    save_file(tensors, str(path), metadata={"meta": json.dumps(meta)})


def load_state(path: Path, modules: dict) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    for name, m in modules.items():
        prefix = name + "."
        m.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["meta"])


@torch.no_grad()
def ema_update(ema, model, decay):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def train_vae(vae, rng, steps, log):
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    vae.train()
    for step in range(steps):
        x, _ = batch_of_scenes(rng, 32)
        mean = vae.encode(x).latent_dist.mean
        rec = vae.decode(x + 0.05 * torch.randn_like(x)).sample
        loss = F.mse_loss(mean, x) + F.mse_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log({"phase": "vae", "step": step, "loss": float(loss)})
    vae.eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="folder for checkpoints and the loss log")
    ap.add_argument("--steps", type=int, default=20000, help="UNet/text steps in total (resumes)")
    ap.add_argument("--vae-steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-bf16", action="store_true", help="train in fp32 (bf16 autocast is ~2x faster on CPU)")
    ap.add_argument("--export", type=Path, help="write the EMA weights as a pipeline folder here and exit")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt, log_path = args.work / "state.safetensors", args.work / "log.jsonl"

    unet, text, vae = shapes_model.build_components(args.seed)
    ema_unet, ema_text, _ = shapes_model.build_components(args.seed)
    modules = {"unet": unet, "text": text, "vae": vae, "ema_unet": ema_unet, "ema_text": ema_text}
    meta = {"step": 0, "vae_done": False, "seconds": 0.0}
    if ckpt.exists():
        meta = load_state(ckpt, modules)
        print(f"resumed at step {meta['step']}", flush=True)

    if args.export:
        return export(args.export, ema_unet, ema_text, vae, meta)

    def log(rec):
        rec["time"] = round(time.time(), 1)
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)

    rng = np.random.default_rng(args.seed + meta["step"])
    torch.manual_seed(args.seed + meta["step"])
    t0 = time.time()
    if not meta["vae_done"]:
        train_vae(vae, rng, args.vae_steps, log)
        meta["vae_done"] = True
        save_state(ckpt, modules, meta)

    from diffusers import DDPMScheduler

    sched = DDPMScheduler(**shapes_model.SCHEDULER_CONFIG)
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    captions = Captions(clip_tokenizer())
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    unet.train()
    text.train()
    start = meta["step"]
    losses = []
    for step in range(start, args.steps):
        lr = args.lr * min(1.0, (step + 1) / 500)  # warm-up, then constant (EMA smooths)
        for g in opt.param_groups:
            g["lr"] = lr
        x, caps = batch_of_scenes(rng, args.batch)
        caps = ["" if rng.random() < 0.1 else c for c in caps]
        ids = captions.ids(caps)
        t = torch.randint(0, sched.config.num_train_timesteps, (x.shape[0],))
        noise = torch.randn_like(x)
        xt = sched.add_noise(x, noise, t)
        weight = torch.clamp(snr[t], max=5.0) / snr[t]  # min-SNR-5 for epsilon prediction
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.no_bf16):
            ctx = text(ids)[0]
            pred = unet(xt, t, encoder_hidden_states=ctx).sample
        loss = (weight * ((pred.float() - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text, decay)
        losses.append(float(loss))
        if (step + 1) % 50 == 0:
            log({"phase": "unet", "step": step + 1, "loss": float(np.mean(losses)), "lr": lr,
                 "seconds": round(meta["seconds"] + time.time() - t0, 1)})
            losses = []
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            meta.update(step=step + 1, seconds=meta["seconds"] + time.time() - t0)
            t0 = time.time()
            save_state(ckpt.with_suffix(".tmp"), modules, meta)
            ckpt.with_suffix(".tmp").replace(ckpt)
    return 0


def export(out: Path, unet, text, vae, meta) -> int:
    pipe = shapes_model.assemble_pipeline(unet.eval(), text.eval(), vae.eval())
    size = shapes_model.save_pipeline(pipe, out)
    (out / "training.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps({"exported": str(out), "step": meta["step"], "bytes": size}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
