"""Print markdown tables from the JSON lines kept in bench/results/ (as written by bench/run_all.sh).

    python bench/summarize.py [bench/results]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.json")):
        text = f.read_text().strip()
        if text:
            out[f.stem] = json.loads(text.splitlines()[-1])
    return out


def fmt_ratio(e: dict) -> str:
    return f"{e['ratio_median']:.3f} ({e['ratio_min']:.3f}-{e['ratio_max']:.3f})"


def overhead_table(results: dict) -> None:
    print("| run | model, size, steps | config | plain median s | ratio median (min-max) | with maps | maps s |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if r.get("bench") not in ("overhead_diffusers", "overhead_comfy"):
            continue
        host = "diffusers" if r["bench"] == "overhead_diffusers" else "ComfyUI"
        t = r["timing"]
        for cfg, e in t.items():
            if cfg == "plain" or cfg.startswith("_"):
                continue
            print(f"| {name} ({host}) | {r['model']}, {r['size']}x{r['size']}, {r['steps']} | {cfg} | "
                  f"{t['plain']['median_s']:.2f} | {fmt_ratio(e)} | {e['ratio_with_maps_median']:.3f} | "
                  f"{e['maps_s_median']:.3f} |")


def breakdown_table(results: dict) -> None:
    print("| run | factor | map size | layers | calls | record ms/call | record share of plain | "
          "host cross-attn share of plain |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        b = r.get("breakdown")
        if not b:
            continue
        for f, e in b["by_factor"].items():
            ca = e.get("cross_attention_share_of_plain")
            print(f"| {name} | {f} | {e['hw'][0]}x{e['hw'][1]} | {e['layers']} | {e['calls']} | "
                  f"{e['record_ms_per_call']:.2f} | {100 * e['record_share_of_plain']:.2f}% | "
                  f"{'' if ca is None else f'{100 * ca:.2f}%'} |")
        print(f"| {name} | all | | | | | {100 * b['record_share_of_plain']:.2f}% | |")


def memory_table(results: dict) -> None:
    for name, r in results.items():
        if r.get("bench") != "memory" or "summary" not in r:
            continue
        s = r["summary"]
        print(f"{name} ({r['model']}, {r['size']}x{r['size']}):\n")
        print("| mode | steps | process peak MB | sampling peak MB | recorder bytes |")
        print("|---|---|---|---|---|")
        for mode in ("plain", "traced"):
            for st, v in s[mode]["process_peak_mb"].items():
                print(f"| {mode} | {st} | {v} | {s[mode]['sampling_peak_mb'][st]} | {s[mode]['recorder_bytes'][st]} |")
        print(f"\ngrowth of the process peak, traced: {100 * s['traced']['process_peak_growth']:.2f}%, "
              f"plain: {100 * s['plain']['process_peak_growth']:.2f}%\n")
        if "sdxl_1024" in r:
            x = r["sdxl_1024"]
            print(f"SDXL 1024: {x['formula']} = {x['formula_bytes']} B ({x['formula_mib']} MiB); measured "
                  f"{x['measured']['sums_bytes']} B; peak added {x['measured']['peak_added_mb']} MB\n")


def reference_table(results: dict) -> None:
    """Runs of the CPU-time protocol (``threads`` in the JSON); older wall-time runs are not shown."""
    runs = {name: r for name, r in results.items() if r.get("bench") == "compare_reference" and "threads" in r}
    if not runs:
        return

    def fmt(sp):
        return f"{sp['median']:.3f} ({sp['min']:.3f}-{sp['max']:.3f}, IQR {sp['q1']:.3f}-{sp['q3']:.3f})"

    print("| run | pairs | steps | reference CPU ratio | ours CPU ratio | reference wall | ours wall | "
          "CPU ms / step ref / ours | maps CPU s ref / ours | Pearson min |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        for st, c in r["comparison"].items():
            print(f"| {name} | {r['pairs']} | {st} | {fmt(c['reference_cpu_ratio'])} | {fmt(c['ours_cpu_ratio'])} | "
                  f"{c['reference_wall_ratio']['median']:.3f} | {c['ours_wall_ratio']['median']:.3f} | "
                  f"{c['reference_cpu_ms_per_step']} / {c['ours_cpu_ms_per_step']} | "
                  f"{c['reference_maps_cpu_s']} / {c['ours_maps_cpu_s']} | {c.get('pearson_min', 'n/a')} |")
    print()


def attribution_table(results: dict) -> None:
    r = results.get("attribution")
    if not r:
        return
    cols = ("noun_1", "noun_2", "noun_2_wrong", "noun_2_positions", "noun_2_plain", "color_1", "color_2")
    print("| setting | " + " | ".join(cols) + " | drawn right |")
    print("|---|" + "---|" * (len(cols) + 1))
    rows = [("rendered scenes, defaults", r["real"]), ("generated images, defaults", r["generated"])]
    rows += [(f"rendered, {k}", v) for k, v in r.get("ablations", {}).items() if not k.startswith("phrase")]
    rows += [(f"generated, {k}", v) for k, v in r.get("generated_ablations", {}).items()]
    for label, v in rows:
        cells = [f"{v[c]:.3f}" if c in v else "" for c in cols]
        right = f"{v['correct_fraction']:.1%}" if "correct_fraction" in v else ""
        print(f"| {label} | " + " | ".join(cells) + f" | {right} |")
    phrases = {k.split(":")[1]: v for k, v in r.get("ablations", {}).items() if k.startswith("phrase")}
    if phrases:
        print("\n| phrase tokens combined by | phrase_1 | phrase_2 |\n|---|---|---|")
        for k, v in phrases.items():
            print(f"| {k} | {v['phrase_1']:.3f} | {v['phrase_2']:.3f} |")
    b, hd = r["baselines"], r["head_dependent"]
    print(f"\nBaselines (noun mIoU): whole image {b['whole']:.3f}, centred disc {b['disc']:.3f}. "
          f"Head/dependent (noun/colour) overlap: mIoU {hd['miou']:.3f}, mIoD {hd['miod']:.3f}, "
          f"mIoH {hd['mioh']:.3f}.")


def main():
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("results"))
    results = load(folder)
    for title, fn in (("Overhead", overhead_table), ("Per layer resolution", breakdown_table),
                      ("Memory", memory_table), ("Reference library", reference_table),
                      ("Attribution (shapes model)", attribution_table)):
        print(f"\n### {title}\n")
        fn(results)


if __name__ == "__main__":
    main()
