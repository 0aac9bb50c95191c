"""The training loop: one object that owns a run directory and can always resume it.

Every source of randomness in a step is derived from the seed and the step: data order
from (seed, stage, position); each sample's timestep, noise and condition dropout from
(seed, step, dataset index), so they do not depend on how the global batch is split over
processes or micro-batches; network dropout from (seed, step, micro-batch, rank). A
resumed run therefore continues exactly the loss curve it would have had, and N
processes with batch b follow the same trajectory as one process with batch N x b.

Progressive training (paper §3.4) runs as a list of stages; at a stage boundary the
model grows outward (``growth.py``) and training continues with the same optimizer
moments for the kept parameters.
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import latest_checkpoint, remove_partial_checkpoints
from ..config import dump_yaml
from ..config.run import RunConfig, StageConfig
from ..data import build_dataset
from ..data.loader import mix_seed
from ..diffusion.process import MatryoshkaDiffusion
from ..guides import GUIDES_DIR, is_guide_step
from ..models import NestedUNet
from ..pipeline import Pipeline, build_process, load_encoder
from .batches import batch_conditioning, caption_embedder, sample_randomness, top_images
from .cores import watch_cores
from .distributed import DistContext
from .ema import EMA
from .growth import carry_optimizer_state, inner_module, inner_prefix, load_inner
from .joint import ImageMix
from .loaders import StageLoaders
from .lr import lr_factor
from .memory import check_model_fits
from .metrics import MetricsLog, progress_bar
from .optimizer import build_optimizer, earlier_levels, grown_from, set_learning_rates
from .parallel import shard, wrap
from .precision import use_bf16, use_channels_last
from .previews import write_previews
from .rundir import check_run_paths, find_checkpoint, set_aside_checkpoints
from .saving import TrainingStopped, weights_not_finite, write_checkpoint, write_guide_snapshot
from .stages import StagePlan
from .state import (
    all_finite,
    full_model_on_main,
    full_weights,
    init_inner_from,
    load_optimizer_state,
    optimizer_state,
    set_full_weights,
)


class Trainer:
    def __init__(
        self, config: RunConfig, dist: DistContext | None = None, quiet: bool = False, resume_from: Path | None = None
    ) -> None:
        """``resume_from``: a checkpoint of this run to go back to instead of the newest one."""
        self.config = config
        self.dist = dist or DistContext()
        self.quiet = quiet or not self.dist.is_main
        self.run_dir = Path(config.run_dir).expanduser()
        self.device = self.dist.device(config.train.device)
        self.metrics = MetricsLog(self.run_dir, self.dist.is_main)
        self.cores = watch_cores(self.device, self.metrics.warn, self.dist.enabled) if self.dist.is_main else None
        self.notes: list[str] = []
        """What the trainer decided about the run directory, for the command to print."""
        check_run_paths(config, self.run_dir)

        self.dataset = build_dataset(config.data)
        self.images = ImageMix(config) if config.data.image_source else None
        """Images that a video run mixes into every batch as one-frame clips (data.image_source)."""
        self._check_labels()
        self.text_encoder = load_encoder(config, self.device)
        self.embed_captions = caption_embedder(self.text_encoder, config.text.cache_dir)
        # Rank 0 decides for all: the CPU probe times a convolution, so ranks could disagree, and
        # DDP needs one weight layout (channels_last follows bf16) on every rank.
        self.bf16 = self.dist.from_main(use_bf16(config.train.precision, self.device))
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        self.channels_last = use_channels_last(
            config.train.channels_last, self.device, self.bf16, config.model.magnitude_preserving
        )

        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self._stop_signal: int | None = None

        found = find_checkpoint(self.run_dir, resume_from)
        # Checkpoints after the one resumed from (damaged, or abandoned by going back), renamed at train().
        self._set_aside = found.set_aside
        self.notes += found.notes
        checkpoint, state, weights = found.checkpoint, found.state, found.weights
        self.step = int(state.get("step", 0))
        self.loaders = StageLoaders(config, self.dist, self.dataset, self.images, state.get("data") or {})
        self.plan = StagePlan(config, self.dist, self.device, list(state.get("stage_history", [])))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.run_end_seconds = math.inf
        """Training seconds at which this invocation's train.max_minutes run out (set by train())."""
        self._build(int(state["num_levels"]) if state else self.stage.levels)
        self.resumed_from = None
        if checkpoint is not None:
            self._resume(checkpoint, state, weights)
        elif config.init_from:
            self._init_from(config.init_from)

    # ------------------------------------------------------------------ stages
    def _check_labels(self) -> None:
        names = list(getattr(self.dataset, "class_names", []) or [])
        wanted = self.config.model.num_classes
        if self.config.data.label != "none" and len(names) != wanted:
            raise ValueError(
                f"data.label={self.config.data.label!r} gives {len(names)} classes but model.num_classes={wanted}"
            )
        if self.images is not None:
            self.images.check_classes(names)

    @property
    def stages(self) -> list[StageConfig]:
        return self.plan.stages

    @property
    def total_steps(self) -> int:
        return self.plan.total_steps

    @property
    def stage_index(self) -> int:
        """The stage the next step belongs to."""
        return self.plan.index(self.step)

    @property
    def stage(self) -> StageConfig:
        return self.plan.stages[self.stage_index]

    @property
    def num_levels(self) -> int:
        return self.model.config.num_levels

    @property
    def sharded(self) -> bool:
        return self.dist.enabled and self.config.train.strategy == "fsdp"

    # ------------------------------------------------------------------ model, optimizer, state
    def _build(self, levels: int) -> None:
        """Model, EMA, optimizer and process for a model with the innermost ``levels`` levels."""
        train = self.config.train
        check_model_fits(self.config.model.truncated(levels), self.device, self.dist.world_size, self.sharded)
        # Seeded by (seed, levels) so a grown level's initial weights do not depend on history.
        torch.manual_seed(mix_seed(train.seed, levels))
        self.model = NestedUNet(self.config.model.truncated(levels)).to(self.device)
        if self.channels_last and not self.sharded:  # FSDP2 shards contiguous parameters only
            self.model.to(memory_format=torch.channels_last)
        self.ema = EMA(self.model, train.ema_decay, train.ema_warmup, train.ema_grown_hold_steps)
        if self.sharded:
            bf16_params = self.device.type == "cuda" and self.bf16
            shard(self.model, bf16_params)
            shard(self.ema.model, bf16_params)
        # One fused pass over all tensors (CPU: 6 ms a step against 21 for 7.6M weights); not for FSDP2's shards.
        fused = not self.sharded and self.device.type in ("cpu", "cuda")
        inner_levels = grown_from(self.stages, self.stage_index, levels)
        self.optimizer = build_optimizer(self.model, levels, inner_levels, train, fused)
        self._configure_stage()

    def _configure_stage(self) -> None:
        stage = self.stage
        levels = self.num_levels
        self.process = build_process(self.config, levels)
        self.process.mixed_ratio = stage.mixed_ratio if levels > 1 else None
        if self.images is not None:
            self.images.configure(levels, self.process.mixed_ratio)
        if levels > stage.levels:
            raise ValueError(f"checkpoint has {levels} levels but stage {self.stage_index} trains {stage.levels}")
        frozen_levels = (earlier_levels(self.stages, self.stage_index, levels) or 0) if stage.freeze_inner else 0
        for parameter in self.model.parameters():
            parameter.requires_grad_(True)
        if frozen_levels:
            inner_module(self.model, levels, frozen_levels).requires_grad_(False)
        self.network = wrap(self.model, self.dist, self.sharded, self.config.train.compile)
        self.loaders.reset()

    def _resume(self, checkpoint: Path, state: dict[str, Any], weights: dict[str, dict[str, torch.Tensor]]) -> None:
        set_full_weights(self.model, weights["model"], self.sharded, checkpoint / "model.safetensors")
        set_full_weights(self.ema.model, weights["ema"], self.sharded, checkpoint / "ema.safetensors")
        load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        # The saved param groups carry the old hyper-parameters: the config's are the ones to use (e.g.
        # weight_decay changed, or a run saved before AdamW was fused); lr is set at every step.
        train, fused = self.config.train, self.optimizer.defaults["fused"]
        for group in self.optimizer.param_groups:
            group.update(betas=tuple(train.betas), weight_decay=train.weight_decay, fused=fused)
        self.ema.updates = int(state["ema_updates"])
        self.ema.started = {name: int(count) for name, count in state.get("ema_started", {}).items()}
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self._configure_stage()
        self.resumed_from = checkpoint

    def _init_from(self, source: str) -> None:
        """Initialise the innermost levels from another run's EMA weights (e.g. a 64² model)."""
        for module in (self.model, self.ema.model):
            init_inner_from(module, source, self.sharded)

    def _grow(self, levels: int) -> None:
        """Move to a model with ``levels`` levels, keeping weights, EMA and Adam moments."""
        old_model, old_ema, old_optimizer, old_levels = self.model, self.ema, self.optimizer, self.num_levels
        self._build(levels)
        load_inner(self.model, levels, old_model.state_dict(), old_levels, "the previous stage")
        load_inner(self.ema.model, levels, old_ema.model.state_dict(), old_levels, "the previous stage")
        self.ema.updates, self.ema.started = old_ema.updates, dict(old_ema.started)
        inner = inner_prefix(levels, old_levels)
        self.ema.restart(name for name in self.ema.model.state_dict() if not name.startswith(inner))
        carry_optimizer_state(old_optimizer, old_model, self.optimizer, self.model, inner)

    def _train_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "optimizer": optimizer_state(self.model, self.optimizer),
            "ema_updates": self.ema.updates,
            "ema_started": self.ema.started,
            "nonfinite_total": self.nonfinite_total,
            "num_levels": self.num_levels,
            "stage": self.stage_index,
            "stage_history": self.plan.history,
            "train_seconds": self.train_seconds,
            "class_names": self.class_names,
            "data": self.loaders.state_dict(),
        }

    @property
    def class_names(self) -> list[str]:
        return list(getattr(self.dataset, "class_names", None) or [])

    def global_batch(self) -> int:
        return self.stage.batch_size * self.config.train.grad_accum * self.dist.world_size

    # ------------------------------------------------------------------ one step
    def _train_step(self) -> tuple[float, dict[str, float], float, float]:
        train, stage = self.config.train, self.stage
        steps_in_stage, progress = self.step - self.plan.start(self.step), self._stage_progress()
        factor = lr_factor(
            steps_in_stage, train.warmup_steps, progress, train.lr_schedule, train.min_lr_ratio, train.cooldown_fraction
        )
        lr = stage.lr * factor
        set_learning_rates(self.optimizer, stage, factor)
        self.network.train()
        total, level_logs = 0.0, {}
        for micro in range(train.grad_accum):
            parts = [(next(self.loaders.batches), self.process, train.seed)]
            if self.images is not None:
                # Images first: DDP synchronises in the last backward, which must reach the temporal layers too.
                parts.insert(0, self.images.next_part(train.seed))
            for batch, process, seed in parts:
                sync = micro == train.grad_accum - 1 and process is self.process
                # A part's loss weighs as its share of the batch, so the gradient is the mean over all samples.
                share = len(batch["index"]) / self.stage.batch_size
                loss, logs = self._backward(batch, process, seed, micro, share, sync)
                total += loss * share / train.grad_accum
                for key, value in logs.items():
                    level_logs[key] = level_logs.get(key, 0.0) + value / train.grad_accum
        max_norm = train.grad_clip if train.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        # Every rank sees the same all-reduced gradients, so they agree on skipping.
        if math.isfinite(grad_norm) and math.isfinite(total):
            self.optimizer.step()
            if self.dist.any(not all_finite(list(self.model.parameters())), self.device):
                raise weights_not_finite(self.run_dir, self.step + 1, lr, self.config.train.weight_decay)
            self.ema.update(self.model)
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
        self.optimizer.zero_grad(set_to_none=True)
        return total, level_logs, grad_norm, lr

    def _backward(
        self, batch: dict, process: MatryoshkaDiffusion, seed: int, micro: int, share: float, sync: bool
    ) -> tuple[float, dict[str, float]]:
        """Loss and gradients of one micro-batch (of clips, or of one-frame clips: images); its loss and logs."""
        train = self.config.train
        torch.manual_seed(mix_seed(seed, self.step, micro, self.dist.rank))  # network dropout
        missing = self.config.model.num_levels - self.num_levels
        # One-frame clips keep their frame whatever the stride (x[:, :, ::k] of one frame is that frame).
        images = top_images(batch, self.device, missing, self.config.model.nest_ratio, self._frame_stride())
        indices = batch["index"].tolist()
        t, noise, drop = sample_randomness(process, indices, images, seed, self.step, train.cond_drop_prob)
        cond = batch_conditioning(batch, drop, bool(self.config.model.num_classes), self.embed_captions, self.device)
        skip_sync = self.dist.enabled and not self.sharded and not sync
        with self.network.no_sync() if skip_sync else nullcontext():
            with self.autocast:
                loss, logs = process.loss(self.network, images, cond, t=t, noise=noise)
            # Normalise before backward so accumulated gradients average the micro-batches.
            (loss * share / train.grad_accum).backward()
        return loss.item(), {key: float(value) for key, value in logs.items()}

    def _stage_progress(self) -> float:
        """The lr schedule's progress through the current stage (a collective where a time limit applies)."""
        return self.plan.progress(self.step, self.train_seconds, self.run_end_seconds)

    def _frame_stride(self) -> int:
        """Data frames per frame of the current top level (1 for images, or with all levels grown)."""
        frames = self.config.model.frames
        return frames[-1] // frames[self.num_levels - 1] if frames else 1

    def _ensure_stage(self) -> None:
        """Grow the model when the next step belongs to a stage with more levels."""
        if self.stage.levels > self.num_levels:
            self._grow(self.stage.levels)
        self.plan.begin(self.step, self.num_levels, self.train_seconds)
        if self.loaders.batches is None:
            start_step = (self.step - self.plan.start(self.step)) * self.config.train.grad_accum
            self.loaders.start(self.stage_index, self.stage.batch_size, start_step)

    # ------------------------------------------------------------------ outputs
    def save(self) -> Path | None:
        """Gather full weights and optimizer state to rank 0 (collective), which writes them once."""
        model = full_weights(self.model, self.sharded)
        ema = full_weights(self.ema.model, self.sharded)
        state = self._train_state()
        path, failure = None, None
        if self.dist.is_main:
            path, failure = write_checkpoint(self.run_dir, self.step, model, ema, state, self.config, self.metrics)
        # Every rank learns rank 0's outcome (this collective is also the barrier after the write).
        code = int(self.dist.max(failure.exit_code if failure else 0, self.device))
        if code:
            raise failure or TrainingStopped(
                "stopped: rank 0 could not save the checkpoint (see its message)", None, code
            )
        return path

    def save_guide(self) -> None:
        """Rank 0 keeps the EMA weights as a guide snapshot (gathering them is collective under FSDP)."""
        ema = full_weights(self.ema.model, self.sharded)
        if self.dist.is_main:
            write_guide_snapshot(self.run_dir, self.step, ema, self.num_levels, self.class_names, self.metrics)

    def _ema_pipeline(self) -> Pipeline | None:
        """The EMA model as a pipeline on rank 0 (unsharded there under FSDP); None elsewhere."""
        model = full_model_on_main(self.ema.model, self.sharded, self.dist.is_main, self.device)
        if model is None:
            return None
        return Pipeline(
            model,
            self.process,
            self.config,
            step=self.step,
            text_encoder=self.text_encoder,
            train_seconds=self.train_seconds,
            guides=self.run_dir / GUIDES_DIR,
        )

    def _samples_and_evaluation(self, sample: bool, evaluate: bool) -> None:
        """Rank 0 samples/evaluates while the other ranks wait without a collective timeout."""
        if not (sample or evaluate):
            return
        pipeline = self._ema_pipeline()
        run_dir, metrics = self.run_dir, self.metrics
        self.dist.run_on_main(lambda: write_previews(pipeline, self.dataset, run_dir, metrics, sample, evaluate))

    def _prepare_run_dir(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        remove_partial_checkpoints(self.run_dir)
        set_aside_checkpoints(self.run_dir, self._set_aside, self.resumed_from, self.metrics, self.step)
        dump_yaml(self.config, self.run_dir / "config.yaml")

    # ------------------------------------------------------------------ the loop
    def _on_signal(self, signum, _frame) -> None:
        self._stop_signal = signum

    def _log_step(self, loss: float, level_logs: dict[str, float], grad_norm: float, lr: float, rate: float) -> dict:
        averaged = self.dist.mean({"loss": loss, **level_logs}, self.device)
        record = {
            "step": self.step,
            **averaged,
            "lr": lr,
            "grad_norm": grad_norm,
            "images_per_s": rate,
            "nonfinite_steps": self.nonfinite_total,
            "stage": self.plan.history[-1]["stage"],
            "levels": self.num_levels,
            **({"other_cpu_cores": round(self.cores.check(), 2)} if self.cores else {}),  # explains slow segments
        }
        self.metrics.write(record)
        return averaged

    def train(self) -> Path | None:
        """Train through every stage; returns the final checkpoint."""
        train = self.config.train
        if self.dist.is_main:
            self._prepare_run_dir()
        self.dist.barrier()
        self.metrics.open(self.step)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        last_time, last_step = time.perf_counter(), self.step
        deadline = last_time + 60 * train.max_minutes if train.max_minutes else math.inf
        self.run_end_seconds = self.train_seconds + 60 * train.max_minutes if train.max_minutes else math.inf
        bar = progress_bar(self.step, self.total_steps, self.config.train.max_minutes, self.quiet)
        start = step_started = last_time
        checkpoint = None
        try:
            done = self.step >= self.total_steps
            while not done:
                self._ensure_stage()
                loss, level_logs, grad_norm, lr = self._train_step()
                self.step += 1
                now = time.perf_counter()
                self.train_seconds += now - step_started
                step_started = now
                self.plan.end_when_out_of_minutes(self.step, self.train_seconds)
                bar.update(1 if not train.max_minutes else min(time.perf_counter() - start, bar.total) - bar.n)
                diverged = self.nonfinite_in_a_row >= train.max_nonfinite_steps
                stop_signal = self.dist.any(self._stop_signal is not None, self.device)
                out_of_time = self.dist.any(time.perf_counter() >= deadline, self.device)
                done = self.step >= self.total_steps or out_of_time or diverged or stop_signal
                boundary = self.step in self.plan.boundaries
                if self.step % train.log_every == 0 or done or boundary:
                    now = time.perf_counter()
                    rate = (self.step - last_step) * self.global_batch() / max(now - last_time, 1e-9)
                    last_time, last_step = now, self.step
                    averaged = self._log_step(loss, level_logs, grad_norm, lr, rate)
                    bar.set_postfix(step=self.step, loss=f"{averaged['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
                healthy = not (diverged or stop_signal)
                if healthy and is_guide_step(self.step, train.guide_snapshots):
                    self.save_guide()
                evaluate_every = self.config.eval.every
                self._samples_and_evaluation(
                    sample=healthy and (self.step % train.sample_every == 0 or done or boundary),
                    evaluate=healthy and bool(evaluate_every) and (self.step % evaluate_every == 0 or done),
                )
                if self.step % train.checkpoint_every == 0 or done or boundary:
                    # Skipped steps never updated the weights, so this holds the last finite ones.
                    checkpoint = self.save()
                if diverged:
                    raise TrainingStopped.diverged(self.nonfinite_in_a_row, checkpoint)
                if stop_signal:
                    raise TrainingStopped.by_signal(self._stop_signal or signal.SIGTERM, self.step, checkpoint)
        finally:
            bar.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.metrics.close()
        return checkpoint or latest_checkpoint(self.run_dir)
