"""``daam study`` / ``daam report`` on the shipped shapes model: sharding under torchrun, resuming, failures, report.

Small on purpose (CI budget): 4-6 items of 2 sampling steps each.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daam_core.shapes import model as shapes_model
from daam_core.analysis.relations import relation_table

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle", "a blue square on the left and a green triangle on the right",
           "a purple hexagon",  # names no shapes-model object: its shapes analysis fails, the run goes on
           "a yellow triangle and a red circle"]

pytestmark = pytest.mark.skipif(not shapes_model.available(), reason="the shapes model is not shipped")


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")  # this checkout's daam_core
    e["OMP_NUM_THREADS"] = "1"  # torchrun sets it for its workers; the same for the one-process run
    e.pop("WORLD_SIZE", None)
    return e


def study_args(prompts: Path, out: Path, *extra: str) -> list[str]:
    return ["study", "--prompts", str(prompts), "--out", str(out), "--steps", "2", "--seeds", "0,1",
            "--threads", "1", *extra]


def write_prompts(tmp_path: Path, prompts=PROMPTS) -> Path:
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(json.dumps({"prompt": t, "tag": i}) + "\n" for i, t in enumerate(prompts)))
    return p


def run_cli(args: list[str], torchrun: int = 0, timeout: int = 300, module: str = "daam_core.analysis",
            accelerate: int = 0):
    """``python -m MODULE ARGS`` (``daam_core.cli.main`` is the ``daam`` command), optionally under torchrun or
    ``accelerate launch`` with that many processes."""
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               "-m", module, *args]
    elif accelerate:  # its multi-process launcher (torch.distributed underneath); gloo when there is no GPU
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={accelerate}",
               "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", "-m", module, *args]
    else:
        cmd = [sys.executable, "-m", module, *args]
    p = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


def without_run(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("run", "traceback")} for r in recs]


def test_two_ranks_under_torchrun_give_the_records_of_one_process(tmp_path):
    prompts = write_prompts(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli(study_args(prompts, one))
    p = run_cli(study_args(prompts, two), torchrun=2)
    assert "rank 1/2" in p.stderr and "ETA" in p.stderr  # each rank reports its own progress
    a, b = records(one), records(two)
    assert [r["id"] for r in a] == [f"p{i:05d}-s{s}" for i in range(4) for s in (0, 1)]
    assert without_run(a) == without_run(b)
    assert {r["run"]["rank"] for r in b} == {0, 1} and {r["run"]["world"] for r in b} == {2}
    for r in b:  # each rank wrote exactly its share: items r, r + 2, ...
        assert r["run"]["rank"] == [x["id"] for x in b].index(r["id"]) % 2
    failed = [r for r in a if r["status"] == "error"]
    assert [r["prompt"] for r in failed] == ["a purple hexagon"] * 2
    assert "names no object" in failed[0]["error"]
    ok = [r for r in a if r["status"] == "ok"]
    for r in ok:
        assert (one / r["files"]["image"]).is_file() and (one / r["files"]["trace"]).is_file()
        assert r["meta"]["tag"] == PROMPTS.index(r["prompt"])
        assert r["analysis"]["relations"] and r["analysis"]["shapes"]["objects"]
    assert json.loads((two / "summary.json").read_text()) == {"items": 8, "ok": 6, "failed": 2, "missing": 0}

    # the report of that study: its syntax table equals the table recomputed from the records by hand
    rep = tmp_path / "report"
    run_cli(["report", str(one), "--out", str(rep), "--min-pairs", "1"], module="daam_core.cli.main")  # `daam report`
    md = (rep / "report.md").read_text()
    for part in ("relation table", "Segmentation", "Cohyponym", "Adjective spread", "examples.png"):
        assert part in md
    for png in ("relations.png", "entanglement.png", "examples.png"):
        assert (rep / png).stat().st_size > 1000
    with (rep / "syntax_table.csv").open() as f:
        table = list(csv.DictReader(f))
    pairs = [p for r in ok for p in r["analysis"]["relations"]]
    related = [p for p in pairs if p["kind"] == "related"]
    row = {r["group"]: r for r in table}
    assert int(row["all related"]["pairs"]) == len(related)
    assert float(row["all related"]["miou"]) == pytest.approx(sum(p["iou"] for p in related) / len(related),
                                                              abs=1e-6)
    det = [p for p in related if p["relation"] == "det"]
    assert float(row["det"]["mioh"]) == pytest.approx(sum(p["ioh"] for p in det) / len(det), abs=1e-6)
    assert [r["group"] for r in relation_table(pairs)] == [r["group"] for r in table]
    with (rep / "segmentation.csv").open() as f:
        seg = {r["group"]: r for r in csv.DictReader(f)}
    nouns = [o["noun_iou"] for r in ok for o in r["analysis"]["shapes"]["objects"] if "noun_iou" in o]
    assert float(seg["all"]["noun_miou"]) == pytest.approx(sum(nouns) / len(nouns), abs=1e-6)


def test_two_ranks_under_accelerate_launch_give_the_records_of_one_process(tmp_path):
    pytest.importorskip("accelerate", reason="accelerate is in the [test] extra")
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        pytest.skip("accelerate's multi-process launch wants a GPU per rank when GPUs exist")
    prompts = write_prompts(tmp_path, PROMPTS[:2])
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli(study_args(prompts, one, "--analyses", "shapes"))
    p = run_cli(study_args(prompts, two, "--analyses", "shapes"), accelerate=2)
    assert "rank 0/2" in p.stderr and "rank 1/2" in p.stderr
    a, b = records(one), records(two)
    assert len(a) == 4 and without_run(a) == without_run(b)
    assert [r["run"]["rank"] for r in b] == [0, 1, 0, 1] and {r["run"]["world"] for r in b} == {2}
    assert json.loads((two / "summary.json").read_text()) == {"items": 4, "ok": 4, "failed": 0, "missing": 0}


def test_resume_after_a_killed_run_redoes_nothing(tmp_path):
    prompts = write_prompts(tmp_path, ["a red circle", "a blue square", "a green triangle", "a yellow circle",
                                       "a red square", "a blue triangle"])
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "daam_core.analysis", *study_args(prompts, out, "--analyses", "shapes")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list((out / "records").glob("*.json"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {p.name: json.loads(p.read_text()) for p in (out / "records").glob("*.json")}
    assert 3 <= len(before) < 12, "the run finished before it could be killed"
    assert not (out / "records.jsonl").exists()
    p = run_cli(study_args(prompts, out, "--analyses", "shapes"))
    counts = json.loads(p.stdout.strip().splitlines()[-1])
    assert counts["skipped"] == len(before) and counts["todo"] == 12 - len(before)
    recs = records(out)
    assert len(recs) == 12 and all(r["status"] == "ok" for r in recs)
    for r in recs:  # the records of the killed run are kept as they were: not redone
        if f"{r['id']}.json" in before:
            assert r == before[f"{r['id']}.json"]
    assert len({r["run"]["run_id"] for r in recs}) == 2
    # a rerun with other sampling settings is refused instead of mixing two studies in one folder
    bad = subprocess.run([sys.executable, "-m", "daam_core.analysis", *study_args(prompts, out, "--steps", "3")],
                         cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "other settings" in bad.stderr and "steps" in bad.stderr


def test_prompt_files_items_and_progress(tmp_path):
    import io as _io

    from daam_core.analysis.study import Progress, StudyError, make_items, read_prompts

    txt = tmp_path / "p.txt"
    txt.write_text("# a comment\na red circle\n\n  a blue square  \n")
    assert read_prompts(txt) == [{"prompt": "a red circle"}, {"prompt": "a blue square"}]
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "a red circle"}\n{"text": "no prompt"}\n')
    with pytest.raises(StudyError, match=r"p.jsonl:2: .*\"prompt\""):
        read_prompts(bad)
    bad.write_text('{"prompt": "a red circle"\n')
    with pytest.raises(StudyError, match=r"p.jsonl:1: not JSON"):
        read_prompts(bad)
    with pytest.raises(StudyError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")
    items = make_items([{"prompt": "x", "kind": "k"}, {"prompt": "y"}], [3, 5])
    assert [(i.id, i.prompt, i.seed, dict(i.meta)) for i in items] == [
        ("p00000-s3", "x", 3, {"kind": "k"}), ("p00000-s5", "x", 5, {"kind": "k"}), ("p00001-s3", "y", 3, {}),
        ("p00001-s5", "y", 5, {})]
    out = _io.StringIO()
    bar = Progress(4, "rank 1/2: ", stream=out, every=0.0)
    bar.step(True)
    bar.step(False)
    first, second = out.getvalue().splitlines()
    assert first.startswith("rank 1/2: [######..................] 1/4 items, 0 failed") and "ETA" in first
    assert "2/4 items, 1 failed" in second


def test_study_without_the_parser_stops_at_once_with_what_to_install(tmp_path, capsys):
    pytest.importorskip("spacy")
    from daam_core.cli.main import main

    prompts = write_prompts(tmp_path, ["a red circle"])
    assert main(study_args(prompts, tmp_path / "s", "--parser", "no_such_spacy_model")) == 2
    err = capsys.readouterr().err
    assert "daam study: error:" in err and "no_such_spacy_model" in err and "pip install" in err
    assert not (tmp_path / "s").exists()  # nothing was generated
