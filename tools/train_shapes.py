"""Train the "shapes" model (see daam_core/shapes/model.py) on synthetic scenes.

    python tools/train_shapes.py --work runs/shapes --steps 20000          # train (resumes from --work)
    python tools/train_shapes.py --work runs/shapes --export daam_core/shapes/assets/shapes   # write the pipeline
    python tools/train_shapes.py --work /tmp/run --batch 512 --lr 1e-3 --workers 12 --time-budget 535 \
        --weights-out weights.safetensors     # on a GPU: train for 9 minutes, keep the fp16 EMA weights
    python tools/train_shapes.py --work X --export daam_core/shapes/assets/shapes --from-weights weights.safetensors

Phase 1 trains the one-level VAE to be the identity (a few hundred steps); phase 2 trains the UNet and
the text encoder together with the epsilon objective and min-SNR weighting, 10% empty captions (for
classifier-free guidance) and an EMA of the weights. Checkpoints are safetensors in --work; a loss log
(JSON lines) sits beside them. Two-object colour/shape combinations listed in
``daam_core.shapes.scenes.held_out_prompts`` are never shown in training.
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

from daam_core.shapes import model as shapes_model, scenes  # noqa: E402
from daam_core.hosts.diffusers.tokenizers import clip_tokenizer  # noqa: E402


def batch_of_scenes(rng, n):
    """``n`` training scenes (held-out pairs skipped): uint8 images ``[n, 3, 32, 32]`` and captions."""
    imgs, caps = [], []
    while len(imgs) < n:
        s = scenes.random_scene(rng)
        if scenes.is_held_out(s):
            continue
        imgs.append(s.image)
        caps.append(s.caption)
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous(), caps


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 ``[0, 255]`` -> float ``[-1, 1]``."""
    return x.float() / 127.5 - 1


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


class SceneBatches(torch.utils.data.IterableDataset):
    """Endless ``(images uint8 [B, 3, 32, 32], token ids [B, 77])`` batches, 10% of captions empty.

    Each DataLoader worker draws from its own generator seeded by ``(seed, worker id)``.
    """

    def __init__(self, batch: int, seed: int, p_empty: float = 0.1):
        self.batch, self.seed, self.p_empty = batch, seed, p_empty

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, info.id if info else 0])
        captions = Captions(clip_tokenizer())
        while True:
            x, caps = batch_of_scenes(rng, self.batch)
            caps = ["" if rng.random() < self.p_empty else c for c in caps]
            yield x, captions.ids(caps)


def save_state(path: Path, modules: dict, meta: dict, dtype: torch.dtype = torch.float32):
    from safetensors.torch import save_file

    tensors = {f"{name}.{k}": v.detach().to("cpu", dtype).contiguous() for name, m in modules.items()
               for k, v in m.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)})
    tmp.replace(path)


def load_state(path: Path, modules: dict) -> dict:
    """Load the modules a state file holds (a weights file holds only ``ema_unet``, ``ema_text``, ``vae``)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    for name, m in modules.items():
        prefix = name + "."
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if own:
            m.load_state_dict({k: v.float() for k, v in own.items()})
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["meta"])


class AdamMoments:
    """An optimizer's per-parameter state as a flat tensor dict, so it saves and resumes with the modules."""

    KEYS = ("step", "exp_avg", "exp_avg_sq")

    def __init__(self, opt: torch.optim.Optimizer):
        self.opt = opt
        self.params = [p for g in opt.param_groups for p in g["params"]]

    def state_dict(self) -> dict:
        return {f"{i}.{k}": torch.as_tensor(self.opt.state[p][k], dtype=torch.float32)
                for i, p in enumerate(self.params) if p in self.opt.state for k in self.KEYS}

    def load_state_dict(self, tensors: dict) -> None:
        fused = any(g.get("fused") for g in self.opt.param_groups)
        for i, p in enumerate(self.params):
            if f"{i}.exp_avg" in tensors:
                st = {k: tensors[f"{i}.{k}"].to(p.device) for k in self.KEYS}
                if not fused:  # the plain and foreach paths keep the step count on the CPU
                    st["step"] = st["step"].cpu()
                self.opt.state[p] = st


@torch.no_grad()
def ema_update(ema, model, decay):
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def train_vae(vae, rng, steps, log, device):
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    vae.train()
    for step in range(steps):
        x = to_unit(batch_of_scenes(rng, 32)[0]).to(device)
        mean = vae.encode(x).latent_dist.mean
        rec = vae.decode(x + 0.05 * torch.randn_like(x)).sample
        loss = F.mse_loss(mean, x) + F.mse_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log({"phase": "vae", "step": step, "loss": loss.item()})
    vae.eval()


def lr_at(args, step: int, progress: float) -> float:
    """Linear warm-up over 500 steps, then constant or cosine down to 10% as ``progress`` goes 0 -> 1."""
    warm = min(1.0, (step + 1) / 500)
    if args.schedule == "constant":
        return args.lr * warm
    return args.lr * warm * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="folder for checkpoints and the loss log")
    ap.add_argument("--steps", type=int, default=20000, help="UNet/text steps in total (resumes)")
    ap.add_argument("--time-budget", type=float, default=0.0,
                    help="stop (and save) after this many seconds of this run; 0: no limit")
    ap.add_argument("--vae-steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--schedule", choices=("cosine", "constant"), default="cosine",
                    help="after warm-up: cosine to 10%% over --steps (or --time-budget), or constant")
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--workers", type=int, default=-1, help="data worker processes (-1: 0 on CPU, 8 on CUDA)")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-bf16", action="store_true", help="train in fp32 (bf16 autocast is ~2x faster on CPU)")
    ap.add_argument("--weights-out", type=Path,
                    help="at each save also write the EMA and VAE weights alone, fp16, to this file")
    ap.add_argument("--export", type=Path, help="write the EMA weights as a pipeline folder here and exit")
    ap.add_argument("--from-weights", type=Path,
                    help="with --export: read a --weights-out file instead of --work's state")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt, log_path = args.work / "state.safetensors", args.work / "log.jsonl"

    unet, text, vae = shapes_model.build_components(args.seed)
    ema_unet, ema_text, _ = shapes_model.build_components(args.seed)
    modules = {"unet": unet, "text": text, "vae": vae, "ema_unet": ema_unet, "ema_text": ema_text}
    meta = {"step": 0, "vae_done": False, "seconds": 0.0}
    source = args.from_weights if args.export and args.from_weights else ckpt
    if source.exists():
        meta = load_state(source, modules)
        print(f"resumed at step {meta['step']}", flush=True)

    if args.export:
        return export(args.export, ema_unet, ema_text, vae, meta)

    def log(rec):
        rec["time"] = round(time.time(), 1)
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)

    def save():
        save_state(ckpt, modules, meta)
        if args.weights_out:
            save_state(args.weights_out, {"ema_unet": ema_unet, "ema_text": ema_text, "vae": vae}, meta,
                       torch.float16)

    log({"phase": "config", "step": meta["step"], "device": torch.cuda.get_device_name(device) if device.type == "cuda"
         else f"CPU ({torch.get_num_threads()} threads)", "batch": args.batch, "lr": args.lr,
         "schedule": args.schedule, "time_budget": args.time_budget, "steps": args.steps})
    for m in modules.values():
        m.to(device)
    rng = np.random.default_rng(args.seed + meta["step"])
    torch.manual_seed(args.seed + meta["step"])
    run_start, seconds_before = time.time(), meta["seconds"]  # --time-budget and "seconds" count the VAE phase too
    if not meta["vae_done"]:
        train_vae(vae, rng, args.vae_steps, log, device)
        meta.update(vae_done=True, seconds=seconds_before + time.time() - run_start)
        save()
    vae.requires_grad_(False)

    from diffusers import DDPMScheduler

    sched = DDPMScheduler(**shapes_model.TRAINING_SCHEDULER_CONFIG)
    alphas = sched.alphas_cumprod.to(device)
    snr = alphas / (1 - alphas)
    workers = args.workers if args.workers >= 0 else (8 if device.type == "cuda" else 0)
    loader = iter(torch.utils.data.DataLoader(
        SceneBatches(args.batch, args.seed * 1_000_003 + meta["step"]), batch_size=None, num_workers=workers,
        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None, persistent_workers=workers > 0))
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, fused=device.type == "cuda")
    modules["opt"] = AdamMoments(opt)
    if ckpt.exists():  # resume the moments too: fresh ones would jolt the weights at full lr
        load_state(ckpt, {"opt": modules["opt"]})
    unet.train()
    text.train()
    start = meta["step"]
    loss_sum, n_loss = torch.zeros((), device=device), 0
    step = start
    for step in range(start, args.steps):
        elapsed = time.time() - run_start
        progress = step / args.steps
        if args.time_budget:
            if elapsed >= args.time_budget:
                break
            progress = max(progress, elapsed / args.time_budget)
        lr = lr_at(args, step, progress)
        for g in opt.param_groups:
            g["lr"] = lr
        x, ids = next(loader)
        x, ids = to_unit(x.to(device, non_blocking=True)), ids.to(device, non_blocking=True)
        t = torch.randint(0, sched.config.num_train_timesteps, (x.shape[0],), device=device)
        noise = torch.randn_like(x)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x + (1 - a).sqrt() * noise
        weight = torch.clamp(snr[t], max=5.0) / snr[t]  # min-SNR-5 for epsilon prediction
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.no_bf16):
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
        loss_sum += loss.detach()
        n_loss += 1
        if (step + 1) % 50 == 0:
            log({"phase": "unet", "step": step + 1, "loss": float(loss_sum) / n_loss, "lr": lr,
                 "seconds": round(seconds_before + time.time() - run_start, 1)})
            loss_sum.zero_()
            n_loss = 0
        if (step + 1) % args.save_every == 0:
            meta.update(step=step + 1, seconds=seconds_before + time.time() - run_start)
            save()
    else:
        step = args.steps
    if step > meta["step"] or not ckpt.exists():
        meta.update(step=step, seconds=seconds_before + time.time() - run_start)
        save()
    print(json.dumps({"done": meta["step"], "seconds": round(meta["seconds"], 1), "device": str(device)}), flush=True)
    return 0


def export(out: Path, unet, text, vae, meta) -> int:
    pipe = shapes_model.assemble_pipeline(unet.eval(), text.eval(), vae.eval())
    size = shapes_model.save_pipeline(pipe, out)
    (out / "training.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps({"exported": str(out), "step": meta["step"], "bytes": size}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
