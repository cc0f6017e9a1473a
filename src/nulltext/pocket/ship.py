"""Whether a trained pocket candidate may replace the shipped model: issue 17's bar, measured.

    python scripts/pocket_ship_check.py --model DIR [--out DIR] [--cases 32] [--attention-images 32]

One command measures what the bar names and compares it, criterion by criterion, with the margins:

- attention ratio (share of the colour word's cross-attention on its object / the object's share
  of the image) >= 3 on >= 32 one-object scenes (:func:`nulltext.pocket.evaluation.attention_localisation`);
- ``nulltext edit_bench`` with null-text + Prompt-to-Prompt colour-word swaps and local blend on
  ``--cases`` held-out scenes: edit success >= 80%, background PSNR within 2 dB of null-text's
  reconstruction PSNR, footprint <= 15%. The background is every pixel outside the edited object's
  exactly known coverage, dilated by ``dilate`` px (PIE-Bench scores outside its hand-drawn edit
  masks; the renderer gives ours exactly), and, as there, it is compared with the input image;
- text control at guidance 7.5 (colour and position, per object, 48 held-out scenes) at least the
  reference model's, as recorded in its ``eval/pocket_eval.json`` (default: the shipped model,
  65% / 62% since 2026-12-06; stand-in 2's 58% / 58% when the bar was set).

Writes ``ship_check.json`` and ``ship_check.md`` into ``--out`` (default ``<model>/eval``), beside the
evaluation's own files and ``edit_bench/``; exit status 0 when every criterion holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from nulltext.io import atomic_write_json, atomic_write_text
from nulltext.models import pocket_path
from nulltext.pocket import evaluation

ATTENTION_IMAGES = 32
MIN_EDIT_SUCCESS = 0.80
MAX_BACKGROUND_GAP_DB = 2.0
MAX_FOOTPRINT = 0.15


def edit_bench(model: Path, out: Path, cases: int, steps: int, threads: int, overrides: list[str]) -> dict:
    """``nulltext edit_bench`` on ``model`` (null-text, local blend, then ``overrides``), in its own process as a user runs it."""
    env = dict(os.environ, NULLTEXT_POCKET=str(model.resolve()), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    command = [sys.executable, "-m", "nulltext", "edit_bench", "methods=[null_text]", f"num_cases={cases}", "local_blend=true",
               f"diffusion.num_inference_steps={steps}", f"hydra.run.dir={out.resolve()}", *overrides]
    subprocess.run(command, env=env, check=True)
    return json.loads((out / "edit_bench.json").read_text())


def criteria(report: dict, bench: dict, reference: dict) -> list[dict]:
    """One row per criterion: what was measured, the bar, whether it holds."""
    loc = report["attention_localisation"]
    nti = bench["summary"]["null_text"]
    high, ref = report["text_control"]["guidance_7.5"], reference["text_control"]["guidance_7.5"]
    gap = nti["recon_psnr"] - nti["background_psnr"]
    rows = [
        ("attention ratio", loc["ratio"], f">= {evaluation.ATTENTION_RATIO_TARGET:g} on >= {ATTENTION_IMAGES} scenes ({loc['images']} measured)",
         loc["ratio"] >= evaluation.ATTENTION_RATIO_TARGET and loc["images"] >= ATTENTION_IMAGES),
        ("null-text + P2P edit success", nti["success"], f">= {MIN_EDIT_SUCCESS:.0%}", nti["success"] >= MIN_EDIT_SUCCESS),
        ("reconstruction minus background PSNR (dB)", gap, f"<= {MAX_BACKGROUND_GAP_DB:g} (recon {nti['recon_psnr']:.2f}, background {nti['background_psnr']:.2f})",
         gap <= MAX_BACKGROUND_GAP_DB),
        ("edit footprint", nti["footprint"], f"<= {MAX_FOOTPRINT:.0%}", nti["footprint"] <= MAX_FOOTPRINT),
    ]
    for word in ("colour", "position"):
        key = f"object_{word}"
        rows.append((f"text control @7.5, {word}", high[key], f">= the reference's {ref[key]:.0%}", high[key] >= ref[key]))
    return [{"criterion": c, "measured": m, "bar": b, "holds": bool(h)} for c, m, b, h in rows]


def markdown(model: str, rows: list[dict]) -> str:
    lines = [f"# ship check: `{model}`", "", "| criterion | measured | bar | holds |", "|---|---|---|---|"]
    for r in rows:
        value = f"{r['measured']:.0%}" if r["criterion"].startswith(("text", "null", "edit")) else f"{r['measured']:.2f}"
        lines.append(f"| {r['criterion']} | {value} | {r['bar']} | {'yes' if r['holds'] else 'NO'} |")
    verdict = "ships" if all(r["holds"] for r in rows) else "does not ship"
    return "\n".join(lines + ["", f"Verdict: {verdict}."]) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the candidate's folder (an exported pocket model)")
    p.add_argument("--reference", default=pocket_path(), help="the model whose text control must be matched (default: the shipped one)")
    p.add_argument("--out", default=None, help="default: <model>/eval")
    p.add_argument("--cases", type=int, default=32, help="edit_bench cases")
    p.add_argument("--attention-images", type=int, default=ATTENTION_IMAGES)
    p.add_argument("--text-images", type=int, default=48)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--edit-bench", nargs="*", default=[], metavar="KEY=VALUE", help="more edit_bench overrides, e.g. blend_resolution=16")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    model = Path(args.model)
    out = Path(args.out) if args.out else model / "eval"
    reference = json.loads((Path(args.reference) / "eval" / "pocket_eval.json").read_text())
    report = evaluation.main([
        "--model", str(model), "--out", str(out), "--steps", str(args.steps), "--threads", str(args.threads), "--text-images", str(args.text_images),
        "--vae-images", "0", "--inv-images", "0", "--photos", "--attention-images", str(args.attention_images),
    ])
    bench = edit_bench(model, out / "edit_bench", args.cases, args.steps, args.threads, args.edit_bench)
    rows = criteria(report, bench, reference)
    atomic_write_json(out / "ship_check.json", {"model": report["model"], "criteria": rows, "ships": all(r["holds"] for r in rows),
                                                "edit_bench_cases": args.cases, "reference": str(args.reference)})
    md = markdown(report["model"], rows)
    atomic_write_text(out / "ship_check.md", md)
    print(md, flush=True)
    return 0 if all(r["holds"] for r in rows) else 1
