"""``record_joint`` CPU time on the torch path: this tree against commit ``BASE`` (its recorder *and* its joint
module), one torch thread, process CPU time, the two interleaved with the order rotated, 24 calls each (median and
10th-90th percentile of the last 22); also checks that both record the same sums. Run from the repository root::

    nice -n 10 python bench/recorder_joint_micro.py [BASE]   # BASE defaults to 16f7855
"""
import importlib.util, subprocess, sys, statistics, tempfile, time, torch
sys.path.insert(0, '.')
BASE = sys.argv[1] if len(sys.argv) > 1 else "16f7855"
torch.set_num_threads(1)
from daam_core.engine import recorder as R
from daam_core.engine.geometry import PatchGrid
def load(path, name):
    src = subprocess.run(["git", "show", f"{BASE}:{path}"], check=True, stdout=subprocess.PIPE, text=True).stdout
    f = tempfile.NamedTemporaryFile("w", suffix=".py", delete=False); f.write(src); f.close()
    spec = importlib.util.spec_from_file_location(name, f.name); mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod; spec.loader.exec_module(mod); return mod
OJ = load("daam_core/engine/joint.py", "daam_core.engine._old_joint")
OR = load("daam_core/engine/recorder.py", "daam_core.engine._old_recorder")
OR.joint = OJ
g = torch.Generator().manual_seed(0)
for dtype, lse_kernel, (h, d, t, n) in [(torch.float32, True, (8, 64, 77, 1024)), (torch.float32, False, (8, 64, 77, 1024)),
                                       (torch.bfloat16, True, (8, 64, 77, 1024)), (torch.float32, True, (24, 64, 154, 1024))]:
    L = t + n
    q = torch.randn(1, h, L, d, generator=g).to(dtype); k = torch.randn(1, h, L, d, generator=g).to(dtype)
    recs = {}
    for name, mod in (("new", R), ("old", OR)):
        r = mod.CrossAttentionRecorder(); r.joint_lse_kernel = lse_kernel
        r.begin(PatchGrid((64, 64), 2), [mod.Stream(0, "cond", 0)], [t]); r.set_call([0], 0.5)
        recs[name] = r
    ts = {x: [] for x in recs}
    for i in range(24):
        for name in (["new", "old"] if i % 2 else ["old", "new"]):
            t0 = time.process_time(); recs[name].record_joint("double.0", "double", q, k, h, text=(0, t), image=(t, L), skip_reshape=True)
            ts[name].append(time.process_time() - t0)
    a, b = recs["new"].finish().sums["double.0"], recs["old"].finish().sums["double.0"]
    q10 = lambda v: [round(1000 * x, 2) for x in (statistics.quantiles(v, n=10)[0], statistics.quantiles(v, n=10)[-1])]
    print(dtype, "lse_kernel" if lse_kernel else "chunked", (h, d, t, n), {x: (round(1000 * statistics.median(v[2:]), 2), q10(v[2:])) for x, v in ts.items()},
          "max diff", (a - b).abs().max().item())
