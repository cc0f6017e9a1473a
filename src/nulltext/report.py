"""``nulltext report <sweep dir>``: the paper's Fig. 4 (and Fig. 9), and the method comparison, from a sweep's outputs.

Reads every job's ``metrics.json`` below the directory (no recomputation) and writes, into
``<sweep dir>/report/``:

- ``ablation.png`` / ``.svg`` (PSNR and LPIPS against optimisation iterations and against seconds,
  mean over images with a +-1 standard deviation band, the VAE upper bound and the DDIM lower bound
  as lines), ``ablation.csv`` (every point), ``ablation.md`` (each variant's final point);
- ``comparison.png`` / ``.svg`` (``experiment=compare_methods``: PSNR, PSNR below the VAE bound (paired per image) and LPIPS against seconds per
  image, each job a point with +-1 std bars on both axes, a method's points joined into a curve when
  it ran with several budgets or recorded a curve inside its run, the VAE bound as a line) and
  ``comparison.md`` / ``.csv`` (one row per job: the reconstruction's guidance scale, PSNR, PSNR below the VAE bound, LPIPS, SSIM, seconds, UNet evaluations of
  the inversion and of the reconstruction, and peak memory per image; a method that does not run on
  the model's family: "not applicable" and the reason). When the directory also holds
  one ``nulltext edit_bench`` result (``edit_bench.json``), its edit success, background PSNR and
  LPIPS and seconds per edit join the row of each job whose model, sampler and method settings it
  ran exactly (others show "-");
- when the sweep varied the pivot's guidance, ``pivot_guidance.png`` / ``.svg`` (paper Fig. 9).

With ``--wandb`` the curves go to wandb, one run per job grouped by the sweep.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nulltext.errors import NulltextError
from nulltext.io import atomic_write, atomic_write_text, check_writable_folder, read_json
from nulltext.validation import SettingError, check_text

# Display names as in the paper (Mokady et al. 2023, Fig. 4) and in the papers of the later methods.
PAPER_NAMES = {
    "vae": "VQAE (upper bound)",
    "ddim": "DDIM inversion (lower bound)",
    "null_text": "Null-text (per step)",
    "null_text_global": "Global null-text",
    "random_pivot": "Random pivot",
    "random_caption": "Random caption",
    "textual_inversion": "Textual inversion",
    "textual_inversion_pivot": "Textual inversion + pivot",
    "null_text_no_pivot": "Null-text w/o pivot",
    "negative_prompt": "Negative-prompt inversion",
    "null_text_reference": "Null-text (official loop)",
    # The methods that followed (METHODS.md), by their papers' names.
    "proximal_negative_prompt": "ProxNPI (proximal guidance)",
    "direct_inversion": "Direct inversion (PnP Inversion)",
    "edict": "EDICT",
    "bdia": "BDIA",
    "renoise": "ReNoise",
    "fixed_point": "Fixed-point inversion",
    "flow_inversion": "Flow inversion (reverse Euler)",
}
BOUNDS = ("vae", "ddim")


@dataclass
class Point:
    iterations: float
    seconds: float
    psnr: tuple[float, float]  # mean, std over images
    lpips: tuple[float, float]
    images: int
    gap: tuple[float, float] = (float("nan"), float("nan"))  # PSNR below each image's VAE bound, mean, std


@dataclass
class Variant:
    method: str
    points: list[Point] = field(default_factory=list)

    @property
    def name(self) -> str:
        return PAPER_NAMES.get(self.method, self.method)


def mean_std(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std())


METRICS_REMEDY = "run the command that wrote it again with the same hydra.run.dir or hydra.sweep.dir (finished images are reused)"


def read_metrics(path: str | Path) -> dict:
    """A run's metrics.json, checked (:func:`nulltext.io.read_json`: its checksum covers every value),
    so a damaged file is one line naming it, never a wrong table."""
    return read_json(path, METRICS_REMEDY, method=(str,), images=(list,))


def load_jobs(sweep_dir: Path) -> list[dict]:
    """Every job's metrics.json (:func:`read_metrics`), with ``job_dir`` added (where its images are)."""
    paths = [p for p in sorted(sweep_dir.glob("**/metrics.json")) if "report" not in p.relative_to(sweep_dir).parts]
    jobs = [{**read_metrics(p), "job_dir": str(p.parent)} for p in paths]
    if not jobs:
        raise NulltextError(f"no metrics.json under {sweep_dir}: give the directory of a finished run or sweep")
    return jobs


def job_points(job: dict) -> list[Point]:
    """The job's curve: one point per evaluation (one for per-step methods, many for long runs)."""
    ok = [r for r in job["images"] if r["status"] == "ok" and r.get("curve")]
    if not ok:
        return []
    length = min(len(r["curve"]) for r in ok)
    points = []
    for k in range(length):
        at = [r["curve"][k] for r in ok]
        points.append(
            Point(
                iterations=float(np.mean([p["iterations"] for p in at])),
                seconds=float(np.mean([p["seconds"] for p in at])),
                psnr=mean_std([p["psnr"] for p in at]),
                lpips=mean_std([p["lpips"] for p in at]),
                images=len(at),
                gap=mean_std([r["vae_psnr"] - p["psnr"] for r, p in zip(ok, at)]),
            )
        )
    return points


def collect_variants(jobs: list[dict]) -> dict[str, Variant]:
    """Group jobs by method: per-step runs with different N become the points of one curve."""
    variants: dict[str, Variant] = {}
    for job in jobs:
        if pivot_guidance(job) != 1.0:
            continue  # the Fig. 9 sweep, plotted separately
        variant = variants.setdefault(job["method"], Variant(job["method"]))
        variant.points.extend(job_points(job))
    for variant in variants.values():
        variant.points.sort(key=lambda p: p.iterations)
    return variants


def pivot_guidance(job: dict) -> float:
    return float(job.get("config", {}).get("inversion", {}).get("pivot_guidance_scale", 1.0))


def vae_bound(jobs: list[dict]) -> tuple[float, float]:
    ok = [r for job in jobs for r in job["images"] if r["status"] == "ok"]
    return mean_std([r["vae_psnr"] for r in ok])


def write_csv(variants: dict[str, Variant], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["variant", "method", "iterations", "seconds", "psnr_mean", "psnr_std", "lpips_mean", "lpips_std", "images"])
    for v in variants.values():
        for p in v.points:
            writer.writerow([v.name, v.method, p.iterations, p.seconds, *p.psnr, *p.lpips, p.images])
    atomic_write_text(path, buffer.getvalue())


def markdown_table(variants: dict[str, Variant], vae: tuple[float, float]) -> str:
    lines = [
        "| variant | iterations | seconds / image | PSNR (dB) | LPIPS (alex) | images |",
        "|---|---|---|---|---|---|",
    ]
    for v in variants.values():
        for p in v.points if v.method not in ("null_text_global", "textual_inversion", "null_text_no_pivot") else v.points[-1:]:
            lines.append(
                f"| {v.name} | {p.iterations:.0f} | {p.seconds:.2f} | {p.psnr[0]:.2f} +- {p.psnr[1]:.2f} "
                f"| {p.lpips[0]:.4f} +- {p.lpips[1]:.4f} | {p.images} |"
            )
    lines.append(f"\nVAE upper bound: {vae[0]:.2f} +- {vae[1]:.2f} dB. Means over images, +- one standard deviation.")
    return "\n".join(lines) + "\n"


def ok_images(job: dict) -> list[dict]:
    return [r for r in job["images"] if r["status"] == "ok"]


def image_stats(job: dict, key: str) -> tuple[float, float] | None:
    """Mean and std over the job's images of ``key`` (None when no image has it, e.g. older runs);
    ``psnr_gap``: each image's VAE-bound PSNR minus its PSNR (paired, so free of image difficulty)."""
    if key == "psnr_gap":
        values = [r["vae_psnr"] - r["psnr"] for r in ok_images(job)]
    else:
        values = [r[key] for r in ok_images(job) if r.get(key) is not None]
    return mean_std(values) if values else None


# The comparison table: (markdown header, CSV name, per-image key, decimals, with std).
COMPARISON_COLUMNS = (
    ("PSNR (dB)", "psnr", "psnr", 2, True),
    ("below the VAE bound (dB)", "psnr_gap", "psnr_gap", 3, True),
    ("LPIPS (alex)", "lpips", "lpips", 4, True),
    ("SSIM", "ssim", "ssim", 4, True),
    ("s / image", "seconds", "seconds", 2, True),
    ("UNet evals / image: inversion", "unet_inversion", "inversion_unet_evaluations", 0, False),
    ("UNet evals / image: reconstruction", "unet_reconstruction", "reconstruction_unet_evaluations", 0, False),
    ("peak memory (MiB)", "peak_memory_mib", "peak_memory_mib", 0, False),
)


# Edit-benchmark columns joined to the comparison: (markdown header, CSV name, edit_bench summary key, format).
EDIT_COLUMNS = (
    ("edit success", "edit_success", "success", "percent"),
    ("edit bg PSNR (dB)", "edit_background_psnr", "background_psnr", ".2f"),
    ("edit bg LPIPS", "edit_background_lpips", "background_lpips", ".4f"),
    ("s / edit", "seconds_edit", "seconds_edit", ".2f"),
)


def load_edit_bench(sweep_dir: Path) -> dict | None:
    """The one ``edit_bench.json`` below the sweep directory (None if there is none), with its ``path``."""
    paths = [p for p in sorted(sweep_dir.glob("**/edit_bench.json")) if "report" not in p.relative_to(sweep_dir).parts]
    if len(paths) > 1:
        listed = ", ".join(str(p.parent) for p in paths)
        raise NulltextError(f"{len(paths)} edit benchmarks under {sweep_dir} ({listed}): keep the one to join to the comparison")
    if not paths:
        return None
    remedy = "run nulltext edit_bench again into its folder, or move it out of the sweep directory"
    bench = read_json(paths[0], remedy, config=(dict,), method_configs=(dict,), summary=(dict,))
    return {**bench, "path": str(paths[0].relative_to(sweep_dir))}


def edit_summary(job: dict, bench: dict | None) -> dict | None:
    """The edit benchmark's summary of the job's method when the benchmark ran it with the job's exact
    model, sampler and method settings (a budget sub-sweep's other settings get none)."""
    if bench is None or job.get("method_config") is None:
        return None
    if any(job.get("config", {}).get(group) != bench["config"].get(group) for group in ("model", "diffusion")):
        return None
    ran = [name for name, config in bench.get("method_configs", {}).items() if config == job["method_config"]]
    return bench["summary"][ran[0]] if ran else None


def reconstruction_guidance(job: dict) -> float | None:
    """The guidance scale the job's reconstruction sampled at: the method's own (methods that must
    invert and sample at one scale carry it) or the sampler's; None for the VAE bound (no sampling)."""
    if job["method"] == "vae" or job.get("not_applicable"):
        return None
    own = (job.get("method_config") or {}).get("guidance_scale")
    return float(own if own is not None else job.get("config", {}).get("diffusion", {}).get("guidance_scale"))


def sweep_order(job: dict) -> tuple[int, int]:
    """Jobs of the sweep itself before those of sub-sweeps (budgets), each in Hydra job order (``<n>_<method>``)."""
    path = Path(job["job_dir"])
    head = path.name.split("_")[0]
    return len(path.parts), int(head) if head.isdigit() else 0


def job_labels(jobs: list[dict]) -> list[str]:
    """Each job's row name: the method, and for a method run several times the settings that differ."""
    labels = []
    for job in jobs:
        name = PAPER_NAMES.get(job["method"], job["method"])
        same = [j for j in jobs if j["method"] == job["method"]]
        if len(same) > 1:
            configs = [j.get("config", {}).get("inversion", {}) for j in same]
            mine = job.get("config", {}).get("inversion", {})
            keys = sorted({k for c in configs for k in c if len({json.dumps(d.get(k), sort_keys=True) for d in configs}) > 1})
            settings = ", ".join(f"{k}={mine.get(k)}" for k in keys) or Path(job["job_dir"]).name
            name = f"{name} ({settings})"
        labels.append(name)
    return labels


def comparison_rows(jobs: list[dict], bench: dict | None = None) -> list[dict]:
    """One row per job (pivot-guidance jobs included), grouped by method in sweep order, smallest budget
    first; ``edit`` is the edit benchmark's summary for the job (:func:`edit_summary`)."""
    labels = job_labels(jobs)
    first: dict[str, int] = {}
    for job in sorted(jobs, key=sweep_order):
        first.setdefault(job["method"], len(first))
    rows = [
        {"label": label, "method": job["method"], "images": len(ok_images(job)), "peak_memory": job.get("peak_memory"),
         "not_applicable": job.get("not_applicable"),
         "edit": edit_summary(job, bench), "guidance": reconstruction_guidance(job),
         **{key: image_stats(job, key) for key in ("iterations", *[c[2] for c in COMPARISON_COLUMNS])}}
        for label, job in zip(labels, jobs)
    ]
    budget = lambda r: tuple((r[key] or (0.0,))[0] for key in ("iterations", "seconds"))  # noqa: E731
    return sorted(rows, key=lambda r: (first[r["method"]], budget(r)))


def edit_cell(edit: dict | None, key: str, fmt: str) -> str:
    if edit is None:
        return "-"
    value = float(edit[key])
    return f"{100 * value:.0f}%" if fmt == "percent" else format(value, fmt)


def comparison_markdown(rows: list[dict], bench: dict | None = None, setting: str = "") -> str:
    def cell(value: tuple[float, float] | None, decimals: int, with_std: bool) -> str:
        if value is None:
            return "n/a"
        mean = value[0] if round(value[0], decimals) else 0.0  # no "-0.000" for a float-noise mean
        return f"{mean:.{decimals}f} +- {value[1]:.{decimals}f}" if with_std else f"{mean:.{decimals}f}"

    edit_columns = EDIT_COLUMNS if bench is not None else ()
    headers = ["method", "w", *[c[0] for c in COMPARISON_COLUMNS], "images", *[c[0] for c in edit_columns]]
    lines = [f"Reconstruction: {setting}.\n"] if setting else []
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = [cell(row[key], decimals, std) for _, _, key, decimals, std in COMPARISON_COLUMNS]
        if row["not_applicable"]:
            cells = [f"not applicable: {row['not_applicable']}", *["-"] * (len(cells) - 1)]
        edits = [edit_cell(row["edit"], key, fmt) for _, _, key, fmt in edit_columns]
        guidance = "-" if row["guidance"] is None else f"{row['guidance']:g}"
        lines.append(f"| {row['label']} | {guidance} | " + " | ".join([*cells, str(row["images"]), *edits]) + " |")
    lines.append(
        "\nw: the guidance scale of the reconstruction (the sampler's, or the method's own where it must invert "
        "and sample at one scale). Below the VAE bound: each image's VAE-bound PSNR minus its PSNR. Means over images, +- one standard deviation. Seconds: the inversion alone. UNet evaluations: "
        "rows of UNet batches, counted by a hook on the UNet (guidance's [uncond; cond] call = 2 per image)."
    )
    if bench is not None:
        cases = len(bench.get("cases", []))
        lines.append(
            f"Edit columns: `nulltext edit_bench` (`<sweep dir>/{bench['path']}`), Prompt-to-Prompt colour-word swaps on {cases} "
            f"procedural scenes (split {bench['config'].get('split')}), means over cases: success = the scene checker finds "
            "every object of the target caption; bg = the edit against the input outside the edited object. "
            "-: not in the benchmark with this row's settings (the VAE bound and EDICT/BDIA have no Prompt-to-Prompt "
            "sampler)."
        )
    for definition in sorted({r["peak_memory"] for r in rows if r["peak_memory"]}):
        lines.append(f"Peak memory of the inversion: {definition}.")
    return "\n".join(lines) + "\n"


def write_comparison_csv(rows: list[dict], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    header = ["variant", "method", "guidance_scale"]
    for _, name, _, _, with_std in COMPARISON_COLUMNS:
        header += [f"{name}_mean", f"{name}_std"] if with_std else [name]
    writer.writerow([*header, "images", "peak_memory_definition", *[c[1] for c in EDIT_COLUMNS], "not_applicable"])
    for row in rows:
        values = []
        for _, _, key, _, with_std in COMPARISON_COLUMNS:
            stats = row[key] or (None, None)
            values += list(stats) if with_std else [stats[0]]
        edits = [row["edit"][key] if row["edit"] else None for _, _, key, _ in EDIT_COLUMNS]
        writer.writerow([row["label"], row["method"], row["guidance"], *values, row["images"], row["peak_memory"], *edits, row["not_applicable"]])
    atomic_write_text(path, buffer.getvalue())


def setting_line(jobs: list[dict]) -> str:
    """What the jobs ran on, e.g. "model pocket, data samples (9 images, 32 px), 50 DDIM steps" (jobs
    that did not run, ``not_applicable``, left out; older metrics.json files name no family: SD's)."""
    from nulltext.families import FAMILIES

    parts = []
    for job in (j for j in jobs if not j.get("not_applicable")):
        steps = job.get("config", {}).get("diffusion", {}).get("num_inference_steps")
        images = len(job["images"])
        part = f"model {job.get('model')}, data {job.get('data')} ({images} images, {job.get('resolution')} px), {steps} {FAMILIES[job.get('family', 'sd')].sampler} steps"
        if part not in parts:
            parts.append(part)
    return "; ".join(parts)


def plot_comparison(rows: list[dict], variants: dict[str, Variant], vae: tuple[float, float], stem: Path, setting: str = "") -> list[Path]:
    """Quality against seconds per image: each job a point (+-1 std both ways), a method's points a curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "vae" and r["seconds"] and r["psnr"]))
    # tab20's dark shades first, then the light ones: neighbouring methods get distinct hues.
    colours = dict(zip(methods, [plt.cm.tab20(i) for i in (*range(0, 20, 2), *range(1, 20, 2))]))
    panels = (
        (axes[0], "psnr", "PSNR (dB)"),
        (axes[1], "gap", "PSNR below the VAE bound, paired per image (dB)"),
        (axes[2], "lpips", "LPIPS (alex)"),
    )
    for ax, metric, label in panels:
        key = "psnr_gap" if metric == "gap" else metric
        for method in methods:
            colour = colours[method]
            curve = variants[method].points if method in variants else []
            if len(curve) > 1:
                ax.plot([p.seconds for p in curve], [getattr(p, metric)[0] for p in curve], color=colour, linewidth=1, alpha=0.7)
            for row in (r for r in rows if r["method"] == method and r[key]):
                ax.errorbar(row["seconds"][0], row[key][0], xerr=row["seconds"][1], yerr=row[key][1],
                            color=colour, marker="o", markersize=5, capsize=3, linestyle="none")
            ax.plot([], [], color=colour, marker="o", label=PAPER_NAMES.get(method, method))
        if metric == "psnr":
            ax.axhline(vae[0], color="black", linestyle="--", label=PAPER_NAMES["vae"])
        if metric == "gap":
            # Linear within 0.01 dB of the bound, logarithmic beyond: exact methods and 7 dB gaps on one axis.
            ax.set_yscale("symlog", linthresh=0.01)
            ax.axhline(0.0, color="black", linestyle="--")
        ax.set_xscale("log")
        ax.set_xlabel("seconds per image (inversion)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=5, frameon=False, fontsize=10)
    figure.suptitle(f"Inversion methods: reconstruction quality against time (mean over images, bars = +-1 std)\n{setting}")
    figure.tight_layout(rect=(0, 0.1, 1, 0.95))
    paths = save_figure(figure, stem)
    plt.close(figure)
    return paths


def save_figure(figure, stem: Path) -> list[Path]:
    paths = []
    for suffix in (".png", ".svg"):
        path = stem.with_suffix(suffix)
        atomic_write(path, lambda tmp, s=suffix: figure.savefig(tmp, format=s[1:], dpi=150, bbox_inches="tight"))
        paths.append(path)
    return paths


def plot_ablation(variants: dict[str, Variant], vae: tuple[float, float], stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(13, 9), sharey="row")
    curves = {k: v for k, v in variants.items() if k not in BOUNDS and v.points}
    colours = plt.cm.tab10(np.linspace(0, 1, 10))
    for row, metric, label in ((0, "psnr", "PSNR (dB)"), (1, "lpips", "LPIPS (alex)")):
        for col, axis_key, xlabel in ((0, "iterations", "optimisation iterations"), (1, "seconds", "seconds per image")):
            ax = axes[row][col]
            for colour, v in zip(colours, curves.values()):
                x = [getattr(p, axis_key) for p in v.points]
                mean = np.array([getattr(p, metric)[0] for p in v.points])
                std = np.array([getattr(p, metric)[1] for p in v.points])
                ax.plot(x, mean, marker="o", markersize=4, color=colour, label=v.name)
                ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.15, linewidth=0)
            if metric == "psnr":
                ax.axhline(vae[0], color="black", linestyle="--", label=PAPER_NAMES["vae"])
            if "ddim" in variants and variants["ddim"].points:
                ax.axhline(getattr(variants["ddim"].points[-1], metric)[0], color="grey", linestyle=":", label=PAPER_NAMES["ddim"])
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=4, frameon=False, fontsize=10)
    figure.suptitle("Inversion ablation (Mokady et al. 2023, Fig. 4): mean over images, band = +-1 std")
    figure.tight_layout(rect=(0, 0.08, 1, 0.96))
    paths = save_figure(figure, stem)
    plt.close(figure)
    return paths


def plot_pivot_guidance(jobs: list[dict], stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted((pivot_guidance(j), j) for j in jobs if j["method"] == "null_text")
    scales = [w for w, _ in rows]
    psnr = [mean_std([r["psnr"] for r in j["images"] if r["status"] == "ok"]) for _, j in rows]
    likelihood = [mean_std([r["z_T_log_likelihood"] for r in j["images"] if r["status"] == "ok"]) for _, j in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, values, label in ((left, psnr, "reconstruction PSNR (dB)"), (right, likelihood, "log-likelihood of z_T under N(0, I) (nats / dim)")):
        mean, std = np.array([v[0] for v in values]), np.array([v[1] for v in values])
        ax.errorbar(scales, mean, yerr=std, marker="o", capsize=3)
        ax.set_xlabel("guidance scale of the pivot's DDIM inversion")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    figure.suptitle("Pivot guidance (Mokady et al. 2023, Fig. 9 analogue), null-text N = 10")
    figure.tight_layout()
    paths = save_figure(figure, stem)
    plt.close(figure)
    return paths


def log_to_wandb(jobs: list[dict], sweep_dir: Path, project: str, num_images: int = 4) -> None:
    """One wandb run per job, grouped by the sweep, with its curve as line plots and sample images."""
    import wandb

    for job in jobs:
        name = PAPER_NAMES.get(job["method"], job["method"])
        n = job.get("config", {}).get("inversion", {}).get("num_inner_steps")
        run = wandb.init(project=project, group=sweep_dir.name, name=f"{name} N={n}" if n else name, dir=str(sweep_dir / "report"), config=job.get("config"), reinit="finish_previous")
        try:
            points = job_points(job)
            table = wandb.Table(columns=["iterations", "seconds", "psnr", "lpips"], data=[[p.iterations, p.seconds, p.psnr[0], p.lpips[0]] for p in points])
            run.log(
                {
                    "curve/psnr_vs_iterations": wandb.plot.line(table, "iterations", "psnr", title=f"{name}: PSNR"),
                    "curve/lpips_vs_iterations": wandb.plot.line(table, "iterations", "lpips", title=f"{name}: LPIPS"),
                    "curve/psnr_vs_seconds": wandb.plot.line(table, "seconds", "psnr", title=f"{name}: PSNR vs time"),
                }
            )
            samples = sorted(Path(job["job_dir"]).glob("images/*.png"))[:num_images]
            run.log({"reconstructions": [wandb.Image(str(p), caption=f"{p.stem}: input | VAE | reconstruction") for p in samples]})
            summary = ("psnr_mean", "lpips_mean", "ssim_mean", "vae_psnr_mean", "seconds_mean", "inversion_unet_evaluations_mean",
                       "reconstruction_unet_evaluations_mean", "peak_memory_mib_mean")
            run.summary.update({k: job[k] for k in summary if k in job})
        finally:
            run.finish()


def build_report(sweep_dir: str | Path, out: str | Path | None = None, wandb_project: str | None = None) -> dict[str, list[Path]]:
    sweep_dir, given = Path(sweep_dir), bool(out)
    out = Path(out) if out else sweep_dir / "report"
    jobs = load_jobs(sweep_dir)
    bench = load_edit_bench(sweep_dir)
    check_writable_folder(out, "--out" if given else "the report folder; --out=<folder> names another")
    variants = collect_variants(jobs)
    vae = vae_bound(jobs)
    written = {"figure": plot_ablation(variants, vae, out / "ablation")}
    write_csv(variants, out / "ablation.csv")
    table = markdown_table(variants, vae)
    atomic_write_text(out / "ablation.md", table)
    written["tables"] = [out / "ablation.csv", out / "ablation.md"]
    rows = comparison_rows(jobs, bench)
    setting = setting_line(jobs)
    written["comparison"] = plot_comparison(rows, variants, vae, out / "comparison", setting)
    write_comparison_csv(rows, out / "comparison.csv")
    comparison = comparison_markdown(rows, bench, setting)
    atomic_write_text(out / "comparison.md", comparison)
    written["tables"] += [out / "comparison.csv", out / "comparison.md"]
    if len({pivot_guidance(j) for j in jobs if j["method"] == "null_text"}) > 1:
        written["pivot_guidance"] = plot_pivot_guidance(jobs, out / "pivot_guidance")
    if wandb_project:
        log_to_wandb(jobs, sweep_dir, wandb_project)
    print(table)
    print(comparison)
    return written


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line (a SettingError for the CLI to print), not usage text and exit."""

    def error(self, message: str):
        raise SettingError(f"{message}: usage: nulltext report <sweep dir> [--out DIR] [--wandb PROJECT]")


def main(argv: list[str] | None = None) -> None:
    parser = _Parser(prog="nulltext report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", help="a multirun (or run) directory holding metrics.json files")
    parser.add_argument("--out", help="where to write the report (default: <sweep_dir>/report)")
    parser.add_argument("--wandb", metavar="PROJECT", help="also log every job's curve to this wandb project")
    args = parser.parse_args(argv)
    if not Path(args.sweep_dir).is_dir():
        raise SettingError(f"sweep_dir={args.sweep_dir!r} is not allowed: the directory of a finished run or sweep")
    if args.out is not None and (not args.out.strip() or Path(args.out).is_file()):
        raise SettingError(f"--out={args.out!r} is not allowed: a directory to write the report into")
    if args.wandb is not None:
        check_text("--wandb", args.wandb)
    written = build_report(args.sweep_dir, args.out, args.wandb)
    for paths in written.values():
        for path in paths:
            print(f"wrote {path}")

