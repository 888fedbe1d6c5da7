"""``record_joint`` CPU time on the torch path: this tree against commit ``BASE`` (its recorder *and* its joint
module), one torch thread, process CPU time, the two interleaved with the order rotated, 24 calls each (median and
10th-90th percentile of the last 22); also checks that both record the same sums. Run from the repository root::

    nice -n 10 python bench/recorder_joint_micro.py [BASE]   # BASE defaults to 16f7855
"""

from __future__ import annotations

import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, ".")
from daam_core.engine import recorder as current  # noqa: E402
from daam_core.engine.geometry import PatchGrid  # noqa: E402

# (dtype, normaliser from the CPU flash kernel, (heads, head dim, text tokens, image tokens))
CASES = [(torch.float32, True, (8, 64, 77, 1024)), (torch.float32, False, (8, 64, 77, 1024)),
         (torch.bfloat16, True, (8, 64, 77, 1024)), (torch.float32, True, (24, 64, 154, 1024))]


def load(base: str, path: str, name: str):
    """Module ``path`` as it was at commit ``base``, imported as ``name`` (a sibling of the current modules)."""
    src = subprocess.run(["git", "show", f"{base}:{path}"], check=True, stdout=subprocess.PIPE, text=True).stdout
    f = tempfile.NamedTemporaryFile("w", suffix=".py", delete=False)
    f.write(src)
    f.close()
    spec = importlib.util.spec_from_file_location(name, f.name)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def spread(ts: list[float]) -> list[float]:
    q = statistics.quantiles(ts, n=10)
    return [round(1000 * q[0], 2), round(1000 * q[-1], 2)]


def main():
    base = sys.argv[1] if len(sys.argv) > 1 else "16f7855"
    torch.set_num_threads(1)
    old = load(base, "daam_core/engine/recorder.py", "daam_core.engine._old_recorder")
    old.joint = load(base, "daam_core/engine/joint.py", "daam_core.engine._old_joint")
    g = torch.Generator().manual_seed(0)
    for dtype, lse_kernel, (h, d, t, n) in CASES:
        length = t + n
        q = torch.randn(1, h, length, d, generator=g).to(dtype)
        k = torch.randn(1, h, length, d, generator=g).to(dtype)
        recs = {}
        for name, mod in (("now", current), ("base", old)):
            rec = mod.AttentionRecorder()
            rec.joint_lse_kernel = lse_kernel
            rec.begin(PatchGrid((64, 64), 2), [mod.Stream(0, "cond", 0)], [t])
            rec.set_call([0], 0.5)
            recs[name] = rec
        times = {name: [] for name in recs}
        for i in range(24):
            for name in (["now", "base"] if i % 2 else ["base", "now"]):
                t0 = time.process_time()
                recs[name].record_joint("double.0", "double", q, k, h, text=(0, t), image=(t, length))
                times[name].append(time.process_time() - t0)
        diff = (recs["now"].finish().sums["double.0"] - recs["base"].finish().sums["double.0"]).abs().max().item()
        figures = {name: (round(1000 * statistics.median(ts[2:]), 2), spread(ts[2:])) for name, ts in times.items()}
        print(str(dtype), "flash-kernel lse" if lse_kernel else "chunked", dict(heads=h, dim=d, text=t, image=n),
              "ms median (p10, p90):", figures, "max |now - base|:", diff)


if __name__ == "__main__":
    main()
