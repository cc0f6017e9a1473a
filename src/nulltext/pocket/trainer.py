"""Training of the pocket model: (a) the autoencoder, (b) the UNet + text encoder, one checkpoint format.

(a) VAE (``AutoencoderKL``): MSE + small KL + an edge (image-gradient) loss on the batches of
    :func:`nulltext.pocket.batches.vae_batch`; optionally a decoder-only fine-tune at the end.
(b) UNet (``UNet2DConditionModel``) + ``CLIPTextModel`` jointly, epsilon prediction on the SD DDIM
    noise schedule, on scenes generated on the fly on the training device, 10% empty captions
    (classifier-free guidance), EMA of both; optionally TokenCompose's token loss on the
    cross-attention maps (recipe key ``grounding``, :mod:`nulltext.pocket.grounding`) and the
    options against the caption leak through the padding positions (recipe key ``padding``,
    :mod:`nulltext.pocket.leak`). Between the
    phases the latent ``scaling_factor`` is set to 1 / std of the VAE posterior means of training scenes.

Every random draw of step ``s`` comes from generators seeded by ``(seed, phase, s)``, so a resumed
run is the same as an uninterrupted one (bit for bit on the CPU: tested). A checkpoint (models,
optimizer, EMA, phase and step, RNG states, the :class:`Ledger` of minutes and samples) is written
atomically every ``checkpoint_every`` steps, on SIGTERM/SIGINT and when ``max_minutes`` is spent,
into the run's folder (:func:`nulltext.pocket.recipe.run_folder`: by default in nulltext's cache,
outside the work tree); with ``resume=true`` (the default) the same command continues from it, also
days later and from a fresh clone, and refuses a checkpoint of another recipe. At the end the EMA
weights are written with ``StableDiffusionPipeline.save_pretrained`` into ``output_dir`` (loadable
with ``nulltext.models.load_pipeline``), with ``training.json``: the recipe, and the minutes (wall
and process CPU) and samples of every phase and every session of the run.

``init_from=<folder>`` starts phase (b) from a model this package saved (its VAE and scaling factor
are kept): a second training stage, recorded in ``training.json`` with the first stage's totals.

``vae_from=<folder>`` trains a FRESH UNet + text encoder on a saved autoencoder (an ``AutoencoderKL``
folder, or a pipeline folder with ``vae/``): the VAE phases are skipped, and the export copies the
autoencoder's files unchanged, so its weights and ``scaling_factor`` stay bit for bit what they were.
"""

from __future__ import annotations

import copy
import csv
import json
import signal
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
from omegaconf import DictConfig, OmegaConf

from nulltext.io import atomic_write
from nulltext.editing.attention import PLACES
from nulltext.models import SD_SCHEDULER_CONFIG, clip_tokenizer, load_pipeline, resolve_device
from nulltext.pocket.batches import PhotoCrops, scene_images, unet_batch_host, vae_batch
from nulltext.pocket.export import assemble_pipeline, weights_sha256, write_pipeline
from nulltext.pocket.grounding import CaptionPositions, GroundingTargets, recording_cross_attention, token_loss
from nulltext.pocket.leak import empty_start_loss, empty_start_settings, padding_attention_loss, padding_match_loss
from nulltext.pocket.recipe import build_models, check_config, data_seed, lr_at, recipe_changes, resolve_path, run_folder, step_generator
from nulltext.scenes import LayoutTokenizer, object_coverage, sample_layout
from nulltext.validation import SettingError


class CSVLog:
    """One line per ``log_every`` steps: step, phase, loss (the denoising MSE in the UNet phase), lr,
    samples/s, elapsed minutes, and the extra loss terms of the UNet phase (empty when off)."""

    fields = ("phase", "step", "loss", "lr", "samples_per_s", "elapsed_min", "token_loss", "padding_attention_loss", "padding_match_loss", "empty_start_loss")

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():  # a resumed run keeps its file's columns (older runs logged fewer terms)
            with path.open(newline="") as f:
                self.fields = tuple(next(csv.reader(f), self.fields))
        else:
            with path.open("w", newline="") as f:
                csv.writer(f).writerow(self.fields)

    def write(self, **row) -> None:
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([row.get(k, "") for k in self.fields])
        print(" ".join(f"{k}={v}" for k, v in row.items() if v != ""), flush=True)


class EMA:
    """Exponential moving average of parameters, with the usual warm-up: decay_t = min(d, (1+t)/(10+t))."""

    def __init__(self, modules: dict[str, torch.nn.Module], decay: float):
        self.decay = decay
        self.shadow = {k: copy.deepcopy(m).requires_grad_(False) for k, m in modules.items()}

    @torch.no_grad()
    def update(self, modules: dict[str, torch.nn.Module], step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, m in modules.items():
            for s, p in zip(self.shadow[k].parameters(), m.parameters()):
                s.lerp_(p.detach(), 1 - d)
            for s, b in zip(self.shadow[k].buffers(), m.buffers()):
                s.copy_(b)

    def state_dict(self) -> dict:
        return {k: m.state_dict() for k, m in self.shadow.items()}

    def load_state_dict(self, state: dict) -> None:
        for k, m in self.shadow.items():
            m.load_state_dict(state[k])


def make_optimizer(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


class Ledger:
    """Wall-clock minutes, process CPU minutes and samples of every phase and every session (one call
    of the training command: a resumed run has several) of a run, carried in its checkpoints."""

    def __init__(self) -> None:
        self.phases: dict[str, dict] = {}
        self.sessions: list[dict] = []

    def start_session(self, phase: str, step: int, device: torch.device) -> None:
        self.sessions.append({
            "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": str(device),
            "threads": torch.get_num_threads(), "from": f"{phase}:{step}", "to": f"{phase}:{step}",
            "minutes": 0.0, "cpu_minutes": 0.0, "samples": 0, "steps": 0,
        })
        self._clock = (time.monotonic(), time.process_time())

    def count(self, phase: str, step: int, samples: int) -> None:
        """One step done (``step`` is the number done in ``phase``): the time since the last count is its."""
        wall, cpu = time.monotonic(), time.process_time()
        minutes, cpu_minutes = (wall - self._clock[0]) / 60, (cpu - self._clock[1]) / 60
        self._clock = (wall, cpu)
        entry = self.phases.setdefault(phase, {"minutes": 0.0, "cpu_minutes": 0.0, "samples": 0, "steps": 0})
        for row in (entry, self.sessions[-1]):
            row["minutes"] += minutes
            row["cpu_minutes"] += cpu_minutes
            row["samples"] += samples
            row["steps"] += 1
        self.sessions[-1]["to"] = f"{phase}:{step}"

    def state_dict(self) -> dict:
        return {"phases": copy.deepcopy(self.phases), "sessions": copy.deepcopy(self.sessions)}

    def load_state_dict(self, state: dict) -> None:
        self.phases, self.sessions = copy.deepcopy(state["phases"]), copy.deepcopy(state["sessions"])

    def summary(self) -> dict:
        """The ledger rounded for ``training.json``."""
        r = lambda row: {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}  # noqa: E731
        return {"phases": {k: r(v) for k, v in self.phases.items()}, "sessions": [r(v) for v in self.sessions]}


class Trainer:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.autocast = bool(cfg.bf16) and self.device.type == "cuda"
        self.run_dir = run_folder(cfg)
        self.ckpt_path = self.run_dir / "checkpoint.pt"
        self.models = build_models(cfg)
        for m in self.models.values():
            m.to(self.device)
        self.phase, self.step = "vae", 0
        self.scaling_factor: float | None = None
        self.init_info: dict | None = None
        self.vae_source: Path | None = None
        if cfg.get("init_from") and cfg.get("vae_from"):
            raise SettingError("give init_from or vae_from, not both: init_from already carries its autoencoder")
        if cfg.get("init_from"):
            self.load_pretrained(resolve_path(cfg.init_from))
        elif cfg.get("vae_from"):
            self.load_autoencoder(resolve_path(cfg.vae_from))
        self.opt: torch.optim.Optimizer | None = None
        self.ema: EMA | None = None
        self.elapsed_before = 0.0  # minutes spent in earlier (resumed) calls
        self.t0 = time.monotonic()
        self.samples_seen = 0
        self.ledger = Ledger()
        self.stop_requested = False
        self._new_phase_state()
        if (cfg.resume or cfg.get("export_only")) and self.ckpt_path.exists():
            self.load_checkpoint()
        elif cfg.resume:
            print(f"no checkpoint at {self.ckpt_path}: starting from scratch", flush=True)
        self.log = CSVLog(self.run_dir / "curves.csv")
        self.tokenizer = clip_tokenizer()
        self.tokenizer.model_max_length = int(cfg.padding.context_length)  # the exported tokenizer pads to it
        self.tokens = LayoutTokenizer(self.tokenizer, context_length=int(cfg.padding.context_length))
        self.positions = CaptionPositions(self.tokens)
        self.photos: PhotoCrops | None = None

    # -- phase state ------------------------------------------------------------------------------
    def _new_phase_state(self) -> None:
        cfg, m = self.cfg, self.models
        if self.phase == "vae":
            m["vae"].train().requires_grad_(True)
            self.opt = make_optimizer(m["vae"].parameters(), cfg.vae_train.lr, cfg.vae_train.weight_decay)
            self.ema = None
        elif self.phase == "decoder":
            m["vae"].requires_grad_(False).eval()
            m["vae"].decoder.requires_grad_(True).train()
            m["vae"].post_quant_conv.requires_grad_(True)
            params = list(m["vae"].decoder.parameters()) + list(m["vae"].post_quant_conv.parameters())
            self.opt = make_optimizer(params, cfg.vae_train.decoder_lr, cfg.vae_train.weight_decay)
            self.ema = None
        else:
            u = cfg.unet_train
            # The frozen encoder in channels-last: 1.7x faster on one CPU thread at 64 px (where it is
            # ~70% of a step), the latents equal to float noise (4e-6 of 5.8 measured).
            m["vae"].requires_grad_(False).eval().to(memory_format=torch.channels_last)
            m["unet"].train().requires_grad_(True)
            m["text_encoder"].train().requires_grad_(True)
            groups = [
                {"params": list(m["unet"].parameters()), "lr_scale": 1.0},
                {"params": list(m["text_encoder"].parameters()), "lr_scale": float(u.text_lr_scale)},
            ]
            self.opt = make_optimizer(groups, u.lr, u.weight_decay)
            self.ema = EMA({"unet": m["unet"], "text_encoder": m["text_encoder"]}, u.ema_decay)
            sched = DDIMScheduler.from_config(SD_SCHEDULER_CONFIG)
            self.alphas_cumprod = sched.alphas_cumprod.to(self.device, torch.float32)

    def phase_steps(self, phase: str) -> int:
        v, u = self.cfg.vae_train, self.cfg.unet_train
        return {"vae": v.steps, "decoder": v.decoder_steps, "unet": u.steps}[phase]

    # -- checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Everything a resumed run needs, written atomically (a kill leaves the previous checkpoint):
        models, optimizer, EMA, phase and step (the batch position: every draw of a step is seeded by
        it, and the learning rate is a function of it), RNG states, the ledger and the recipe."""
        state = {
            "phase": self.phase,
            "step": self.step,
            "lr": self.opt.param_groups[0]["lr"] if self.opt is not None else None,
            "scaling_factor": self.scaling_factor,
            "models": {k: m.state_dict() for k, m in self.models.items()},
            "optimizer": self.opt.state_dict() if self.opt is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "elapsed_min": self.elapsed_min(),
            "samples_seen": self.samples_seen,
            "ledger": self.ledger.state_dict(),
            "init_from": self.init_info,
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }
        atomic_write(self.ckpt_path, lambda tmp: torch.save(state, tmp))
        print(f"checkpoint: phase={self.phase} step={self.step} -> {self.ckpt_path}", flush=True)

    def load_checkpoint(self) -> None:
        state = torch.load(self.ckpt_path, map_location=self.device, weights_only=False)
        changes = recipe_changes(state["config"], OmegaConf.to_container(self.cfg, resolve=True))
        if changes:
            listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in changes.items()))
            raise SettingError(
                f"the checkpoint in {self.run_dir} was trained with another recipe ({listed}): resume it with the same "
                "settings, give resume=false to start that run afresh, or run_name=<new name> for a separate run"
            )
        for k, m in self.models.items():
            m.load_state_dict(state["models"][k])
        self.phase, self.step = state["phase"], state["step"]
        self.scaling_factor = state["scaling_factor"]
        self.elapsed_before = state["elapsed_min"]
        self.samples_seen = state.get("samples_seen", 0)
        if "ledger" in state:
            self.ledger.load_state_dict(state["ledger"])
        self.init_info = state.get("init_from")
        self._new_phase_state()
        if state["optimizer"] is not None and self.phase != "done":
            self.opt.load_state_dict(state["optimizer"])
        if state["ema"] is not None and self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        print(f"resumed: phase={self.phase} step={self.step} ({self.elapsed_before:.1f} min so far)", flush=True)

    def load_pretrained(self, folder: Path) -> None:
        """Start the UNet phase from a saved pipeline folder (continued training): its VAE, scaling
        factor, UNet and text encoder are loaded into models of this config's architecture."""
        if not (folder / "model_index.json").exists():
            raise FileNotFoundError(f"init_from={folder}: no saved pipeline there (expected model_index.json); give a folder written by this script")
        pipe = load_pipeline(str(folder))
        for k, m in self.models.items():
            m.load_state_dict(getattr(pipe, k).state_dict())
        self.scaling_factor = float(pipe.vae.config.scaling_factor)
        earlier = folder / "training.json"
        self.init_info = {"folder": str(self.cfg.init_from)}
        if earlier.exists():
            e = json.loads(earlier.read_text())
            self.init_info.update(
                training_minutes=e.get("total_training_minutes", e["training_minutes"]),
                samples_seen=e.get("total_samples_seen", e["samples_seen"]),
            )
        self.phase = "unet"
        print(f"initialised from {folder}: training its UNet and text encoder further", flush=True)

    def load_autoencoder(self, folder: Path) -> None:
        """Use a saved autoencoder as it is and start at the UNet phase with fresh UNet and text encoder."""
        source = folder / "vae" if (folder / "vae" / "config.json").exists() else folder
        if not (source / "config.json").exists():
            raise FileNotFoundError(f"vae_from={folder}: no autoencoder there (expected config.json or vae/config.json)")
        vae = AutoencoderKL.from_pretrained(source, torch_dtype=torch.float32)
        wanted = OmegaConf.to_container(self.cfg.model.vae, resolve=True)
        plain = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
        differ = {k: (plain(v), plain(vae.config[k])) for k, v in wanted.items() if plain(v) != plain(vae.config[k])}
        if differ:
            raise SettingError(f"vae_from={folder}: its architecture differs from model.vae ({differ}); use the config it was trained with")
        self.models["vae"].load_state_dict(vae.state_dict())
        self.scaling_factor = float(vae.config.scaling_factor)
        self.vae_source = source
        self.phase = "unet"
        print(f"autoencoder from {source} (scaling_factor {self.scaling_factor:.5f}): training a fresh UNet and text encoder", flush=True)

    def elapsed_min(self) -> float:
        return self.elapsed_before + (time.monotonic() - self.t0) / 60

    # -- steps -------------------------------------------------------------------------------------
    def vae_step(self) -> dict[str, float]:
        cfg, v, vae = self.cfg, self.cfg.vae_train, self.models["vae"]
        if self.photos is None and v.photo_fraction > 0:
            self.photos = PhotoCrops(v.photo_source_resolution, list(v.holdout_photos), self.device)
        x = vae_batch(cfg, self.step, self.phase, self.photos, self.device)
        g = step_generator(cfg.seed, self.phase, self.step, self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            if self.phase == "vae":
                post = vae.encode(x).latent_dist
                z = post.mean + post.std * torch.randn(post.mean.shape, generator=g, device=self.device, dtype=post.mean.dtype)
                kl = post.kl().mean() / x[0].numel()
            else:  # decoder-only: decode the posterior mean, the latent inversion uses
                with torch.no_grad():
                    z = vae.encode(x).latent_dist.mean
                kl = torch.zeros((), device=self.device)
            y = vae.decode(z).sample.float()
        mse = F.mse_loss(y, x)
        edge = F.l1_loss(y.diff(dim=-1), x.diff(dim=-1)) + F.l1_loss(y.diff(dim=-2), x.diff(dim=-2))
        loss = mse + v.kl_weight * kl.float() + v.edge_weight * edge
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for grp in self.opt.param_groups for p in grp["params"]], v.grad_clip)
        self.opt.step()
        self.samples_seen += x.shape[0]
        return {"loss": float(mse.detach())}

    @torch.no_grad()
    def measure_scaling_factor(self) -> float:
        """1 / std of the VAE posterior means of training scenes (SD's convention, 0.18215 for SD1.x)."""
        cfg, vae = self.cfg, self.models["vae"]
        vae.eval()
        means = []
        for b in range(cfg.unet_train.scale_batches):
            x = scene_images(sample_layout(cfg.unet_train.batch_size, data_seed(cfg.seed, "decoder", 10**9 + b)), cfg.resolution, self.device)
            means.append(vae.encode(x).latent_dist.mean.float())
        return float(1.0 / torch.cat(means).std())

    def unet_losses(self, step: int) -> dict[str, torch.Tensor]:
        """The UNet phase's loss terms on the batch of ``step``: ``loss`` (the denoising MSE), the
        extra terms switched on in the recipe (``token_loss``: :mod:`nulltext.pocket.grounding`;
        ``padding_attention_loss``, ``padding_match_loss``: :mod:`nulltext.pocket.leak`) and
        ``total``, their weighted sum (what is minimised)."""
        cfg, u, grounding, padding = self.cfg, self.cfg.unet_train, self.cfg.grounding, self.cfg.padding
        unet, text, vae = self.models["unet"], self.models["text_encoder"], self.models["vae"]
        n = u.batch_size
        layout, ids, dropped = unet_batch_host(cfg, step, self.tokens)
        x, ids = scene_images(layout, cfg.resolution, self.device), ids.to(self.device, non_blocking=True)
        g = step_generator(cfg.seed, "unet", step, self.device)
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            z0 = vae.encode(x.contiguous(memory_format=torch.channels_last)).latent_dist.mean.float() * self.scaling_factor
        t = torch.randint(0, 1000, (n,), generator=g, device=self.device)
        noise = torch.randn(z0.shape, generator=g, device=self.device)
        ab = self.alphas_cumprod[t].view(n, 1, 1, 1)
        zt = ab.sqrt() * z0 + (1 - ab).sqrt() * noise
        # the token loss reads the grounded layers; the padding attention loss every cross-attention layer
        empty_start_weight, *band = empty_start_settings(padding)
        every_layer = padding.attention_weight > 0 or empty_start_weight > 0
        places = set(grounding.places if grounding.weight > 0 else []) | set(PLACES if every_layer else [])
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            with recording_cross_attention(unet, sorted(places)) if places else nullcontext() as recorder:
                context = text(ids)[0]
                pred = unet(zt, t, encoder_hidden_states=context).sample.float()
        losses = {"loss": F.mse_loss(pred, noise)}
        weights = {"loss": 1.0}
        if grounding.weight > 0:
            coverage = object_coverage(layout, cfg.resolution, self.device)
            targets = GroundingTargets(self.positions, layout, coverage, dropped, float(grounding.cell_threshold))
            losses["token_loss"] = token_loss(recorder.maps_in(list(grounding.places)), targets)
            weights["token_loss"] = float(grounding.weight)
        if padding.attention_weight > 0:
            # Off the dropped (empty) captions when asked: there the mass on padding is what gives
            # null-text a spatially varying handle (models/pocket/README.md, issue 17).
            skip = None if padding.get("attention_on_empty", True) else dropped
            losses["padding_attention_loss"] = padding_attention_loss(recorder.maps, ids, self.tokens.eos, skip)
            weights["padding_attention_loss"] = float(padding.attention_weight)
        if empty_start_weight > 0:
            losses["empty_start_loss"] = empty_start_loss(recorder.maps, dropped, *band)
            weights["empty_start_loss"] = float(empty_start_weight)
        if padding.match_weight > 0:
            with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                empty = text(self.tokens.empty[None].to(self.device))[0]
            losses["padding_match_loss"] = padding_match_loss(context, empty, ids, self.tokens.eos, dropped)
            weights["padding_match_loss"] = float(padding.match_weight)
        losses["total"] = sum(weights[k] * v for k, v in losses.items())
        return losses

    def unet_step(self) -> dict[str, float]:
        unet, text = self.models["unet"], self.models["text_encoder"]
        losses = self.unet_losses(self.step)
        self.opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_([p for grp in self.opt.param_groups for p in grp["params"]], self.cfg.unet_train.grad_clip)
        self.opt.step()
        self.ema.update({"unet": unet, "text_encoder": text}, self.step)
        self.samples_seen += self.cfg.unet_train.batch_size
        return {k: float(v.detach()) for k, v in losses.items() if k != "total"}

    # -- main loop ---------------------------------------------------------------------------------
    def run(self) -> Path | None:
        self.t0 = time.monotonic()
        self.ledger.start_session(self.phase, self.step, self.device)
        handler_prev = {}

        def on_signal(signum, frame):
            print(f"signal {signum}: checkpointing at the next step", flush=True)
            self.stop_requested = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                handler_prev[sig] = signal.signal(sig, on_signal)
            except ValueError:  # not the main thread (e.g. some test runners)
                pass
        try:
            return self._loop()
        finally:
            for sig, h in handler_prev.items():
                signal.signal(sig, h)

    def _loop(self) -> Path | None:
        cfg = self.cfg
        window_t, window_n, losses = time.monotonic(), self.samples_seen, []
        while self.phase != "done":
            total = self.phase_steps(self.phase)
            if self.step >= total:
                self._advance_phase()
                continue
            if cfg.get("stop_at") and f"{self.phase}:{self.step}" == str(cfg.stop_at):
                self.save_checkpoint()
                print(f"stop_at={cfg.stop_at}: continue with resume=true", flush=True)
                return None
            if self.stop_requested or (cfg.max_minutes is not None and self.elapsed_min() >= cfg.max_minutes):
                self.save_checkpoint()
                if cfg.get("finish_on_budget", False) and self.phase == "unet" and not self.stop_requested:
                    print(f"time budget spent at unet step {self.step}/{total}: exporting the EMA as it is", flush=True)
                    return self.export()
                print("stopped before the end: continue with resume=true", flush=True)
                return None
            samples_before = self.samples_seen
            if self.phase in ("vae", "decoder"):
                base = cfg.vae_train.lr if self.phase == "vae" else cfg.vae_train.decoder_lr
                set_lr(self.opt, lr_at(self.step, total, base, cfg.vae_train.warmup))
                losses.append(self.vae_step())
            else:
                set_lr(self.opt, lr_at(self.step, total, cfg.unet_train.lr, cfg.unet_train.warmup))
                losses.append(self.unet_step())
            self.step += 1
            self.ledger.count(self.phase, self.step, self.samples_seen - samples_before)
            if self.step % cfg.log_every == 0 or self.step == total:
                now = time.monotonic()
                rate = (self.samples_seen - window_n) / max(now - window_t, 1e-9)
                means = {k: f"{sum(row[k] for row in losses) / len(losses):.5f}" for k in losses[0]}
                self.log.write(
                    phase=self.phase,
                    step=self.step,
                    lr=f"{self.opt.param_groups[0]['lr']:.3e}",
                    samples_per_s=f"{rate:.1f}",
                    elapsed_min=f"{self.elapsed_min():.2f}",
                    **means,
                )
                window_t, window_n, losses = now, self.samples_seen, []
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < total:
                self.save_checkpoint()
        return self.export()

    def _advance_phase(self) -> None:
        nxt = {"vae": "decoder", "decoder": "unet", "unet": "done"}[self.phase]
        if nxt == "unet":
            self.scaling_factor = self.measure_scaling_factor()
            print(f"scaling_factor = {self.scaling_factor:.5f}", flush=True)
        self.phase, self.step = nxt, 0
        if nxt != "done":
            self._new_phase_state()
            self.save_checkpoint()
        else:
            self.save_checkpoint()

    # -- export ------------------------------------------------------------------------------------
    def pipeline(self) -> StableDiffusionPipeline:
        """The trained pipeline (EMA weights), float32, on the CPU."""
        unet = self.ema.shadow["unet"] if self.ema else self.models["unet"]
        text = self.ema.shadow["text_encoder"] if self.ema else self.models["text_encoder"]
        return assemble_pipeline(self.models["vae"], unet, text, self.tokenizer, self.scaling_factor)

    def export(self) -> Path:
        cfg = self.cfg
        info = {
            "scaling_factor": self.scaling_factor,
            "resolution": cfg.resolution,
            "save_dtype": cfg.save_dtype,
            "training_minutes": round(self.elapsed_min(), 2),
            "samples_seen": self.samples_seen,
            "unet_steps_done": self.step if self.phase == "unet" else int(cfg.unet_train.steps),
            "init_from": self.init_info,
            "vae_from": None if self.vae_source is None else {"folder": str(self.cfg.vae_from), "sha256": weights_sha256(self.vae_source)},
            "total_training_minutes": round(self.elapsed_min() + (self.init_info or {}).get("training_minutes", 0.0), 2),
            "total_samples_seen": self.samples_seen + (self.init_info or {}).get("samples_seen", 0),
            "cpu_minutes": round(sum(p["cpu_minutes"] for p in self.ledger.phases.values()), 2),
            **self.ledger.summary(),
            "device": str(self.device),
            "config": OmegaConf.to_container(cfg, resolve=True),
            "parameters": {k: sum(p.numel() for p in m.parameters()) for k, m in self.models.items()},
        }
        out = write_pipeline(self.pipeline(), resolve_path(cfg.output_dir), cfg.save_dtype, info, self.vae_source)
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        print(f"saved {out} ({size / 1e6:.1f} MB, scaling_factor {self.scaling_factor:.4f})", flush=True)
        return out


def train(cfg: DictConfig) -> Path | None:
    """Run (or continue) training; returns the exported folder, or None if stopped early.

    ``export_only=true`` exports the EMA of the run's latest checkpoint into ``output_dir`` and
    trains nothing (a probe of a run that goes on: the checkpoint is only read)."""
    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    checkpoint = run_folder(cfg) / "checkpoint.pt"
    if cfg.get("export_only"):
        if not checkpoint.exists():
            raise SettingError(f"export_only=true: no checkpoint at {checkpoint} to export; run the training first")
        return Trainer(cfg).export()
    if not cfg.resume:  # afresh: the run's earlier checkpoint goes
        checkpoint.unlink(missing_ok=True)
    if not checkpoint.exists():  # nor curves of an attempt that never checkpointed
        (run_folder(cfg) / "curves.csv").unlink(missing_ok=True)
    trainer = Trainer(cfg)
    print(
        "parameters: "
        + ", ".join(f"{k} {sum(p.numel() for p in m.parameters()) / 1e6:.2f} M" for k, m in trainer.models.items())
        + f"; device {trainer.device}",
        flush=True,
    )
    return trainer.run()
