"""The training loop: one object that owns a run directory and can always resume it.

Every source of randomness in a step (data order, timesteps, noise, condition dropout,
network dropout) is derived from (seed, step, micro-batch, rank), so a resumed run
continues exactly the loss curve it would have had without the interruption.
"""

from __future__ import annotations

import json
import math
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import dump_yaml
from ..config.run import RunConfig
from ..data import build_dataset, make_loader
from ..models import NULL_LABEL, Conditioning, NestedUNet
from ..pipeline import Pipeline, build_process, pick_device
from ..utils.images import save_grid
from .checkpoint import latest_checkpoint, load_into, load_tensors, load_train_state, save_checkpoint
from .ema import EMA
from .lr import lr_factor


class TrainingStopped(RuntimeError):
    """Training stopped early (signal or divergence) after saving a checkpoint."""

    def __init__(self, message: str, checkpoint: Path | None, exit_code: int) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        self.exit_code = exit_code


def _step_seed(seed: int, step: int, micro: int = 0, rank: int = 0) -> int:
    return (seed * 1_000_003 + step * 1009 + micro * 101 + rank * 7_919) % (2**63)


class Trainer:
    def __init__(self, config: RunConfig, rank: int = 0, world_size: int = 1, quiet: bool = False) -> None:
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0
        self.quiet = quiet or not self.is_main
        self.run_dir = Path(config.run_dir).expanduser()
        self.device = pick_device(config.train.device)
        train = config.train

        torch.manual_seed(train.seed)
        self.model = NestedUNet(config.model).to(self.device)
        self.process = build_process(config)
        self.dataset = build_dataset(config.data)
        self._check_labels()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay
        )
        self.ema = EMA(self.model, train.ema_decay, train.ema_warmup)
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self._stop_signal: int | None = None

        use_bf16 = train.precision == "bf16" or (train.precision == "auto" and self.device.type == "cuda")
        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
        )
        self.resumed_from = self._resume()

    # ------------------------------------------------------------------ setup
    def _check_labels(self) -> None:
        classes = len(getattr(self.dataset, "class_names", []) or [])
        wanted = self.config.model.num_classes
        if self.config.data.label != "none" and classes != wanted:
            raise ValueError(
                f"data.label={self.config.data.label!r} gives {classes} classes but model.num_classes={wanted}"
            )

    def _resume(self) -> Path | None:
        checkpoint = latest_checkpoint(self.run_dir)
        if checkpoint is None:
            return None
        state = load_train_state(checkpoint / "state.pt")
        load_into(self.model, load_tensors(checkpoint / "model.safetensors"), checkpoint / "model.safetensors")
        load_into(self.ema.model, load_tensors(checkpoint / "ema.safetensors"), checkpoint / "ema.safetensors")
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema.updates = int(state["ema_updates"])
        self.step = int(state["step"])
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        return checkpoint

    def _train_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "ema_updates": self.ema.updates,
            "nonfinite_total": self.nonfinite_total,
            "num_levels": self.config.model.num_levels,
            "images_seen": self.step * self.global_batch,
        }

    @property
    def global_batch(self) -> int:
        train = self.config.train
        return train.batch_size * train.grad_accum * self.world_size

    # ------------------------------------------------------------------ one step
    def _conditioning(self, batch: dict, generator: torch.Generator) -> Conditioning | None:
        if not self.config.model.num_classes:
            return None
        labels = batch["label"].to(self.device)
        drop = torch.rand(labels.shape, generator=generator, device=self.device) < self.config.train.cond_drop_prob
        return Conditioning(labels=torch.where(drop, torch.full_like(labels, NULL_LABEL), labels))

    def _train_step(self, batches) -> tuple[float, dict[str, float], float, float]:
        train = self.config.train
        lr = train.lr * lr_factor(self.step, train.warmup_steps, train.steps, train.lr_schedule, train.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        total, level_logs = 0.0, {}
        for micro in range(train.grad_accum):
            batch = next(batches)
            seed = _step_seed(train.seed, self.step, micro, self.rank)
            torch.manual_seed(seed)  # network dropout
            generator = torch.Generator(self.device).manual_seed(seed)
            images = batch["image"].to(self.device, non_blocking=True)
            cond = self._conditioning(batch, generator)
            with self.autocast:
                loss, logs = self.process.loss(self.model, images, cond, generator=generator)
            # Normalise before backward so accumulated gradients average the micro-batches.
            (loss / train.grad_accum).backward()
            total += loss.item() / train.grad_accum
            for key, value in logs.items():
                level_logs[key] = level_logs.get(key, 0.0) + float(value) / train.grad_accum
        max_norm = train.grad_clip if train.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        if math.isfinite(total) and math.isfinite(grad_norm):
            self.optimizer.step()
            self.ema.update(self.model)
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
        self.optimizer.zero_grad(set_to_none=True)
        return total, level_logs, grad_norm, lr

    # ------------------------------------------------------------------ outputs
    def save(self) -> Path:
        return save_checkpoint(
            self.run_dir,
            self.step,
            self.model.state_dict(),
            self.ema.model.state_dict(),
            self._train_state(),
            self.config,
            keep=self.config.train.keep_checkpoints,
        )

    def save_samples(self) -> list[Path]:
        pipeline = Pipeline(self.ema.model, self.process, self.config, step=self.step)
        num = self.config.sample.num
        levels = pipeline.generate(num=num, cond=pipeline.condition(num))
        paths = []
        for level in levels:
            side = level.shape[-1]
            paths.append(save_grid(level, self.run_dir / "samples" / f"step_{self.step:08d}_{side}px.png"))
        return paths

    def _prepare_run_dir(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(self.config, self.run_dir / "config.yaml")
        metrics = self.run_dir / "metrics.jsonl"
        if metrics.exists():  # drop lines logged after the checkpoint we resume from
            kept = [line for line in metrics.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= self.step]
            metrics.write_text("".join(line + "\n" for line in kept))

    def _log(self, record: dict[str, Any], writer) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    writer.add_scalar(key, value, record["step"])

    def _open_writer(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional at run time
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.step)

    # ------------------------------------------------------------------ the loop
    def _on_signal(self, signum, _frame) -> None:
        self._stop_signal = signum

    def train(self) -> Path:
        """Train until ``train.steps``; returns the final checkpoint."""
        train = self.config.train
        if self.is_main:
            self._prepare_run_dir()
        batches = make_loader(
            self.dataset,
            batch_size=train.batch_size,
            seed=train.seed,
            rank=self.rank,
            world_size=self.world_size,
            start_step=self.step * train.grad_accum,
            num_workers=self.config.data.num_workers,
        )
        writer = self._open_writer() if self.is_main else None
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        bar = tqdm(total=train.steps, initial=self.step, disable=self.quiet, dynamic_ncols=True, unit="step")
        last_time, last_step = time.perf_counter(), self.step
        deadline = last_time + 60 * train.max_minutes if train.max_minutes else math.inf
        checkpoint = None
        try:
            done = False
            while not done and self.step < train.steps:
                loss, level_logs, grad_norm, lr = self._train_step(batches)
                self.step += 1
                bar.update(1)
                if self.nonfinite_in_a_row >= train.max_nonfinite_steps:
                    checkpoint = self.save() if self.is_main else None
                    raise TrainingStopped(
                        f"stopped: {self.nonfinite_in_a_row} non-finite steps in a row (weights were not updated by them); "
                        f"the checkpoint holds the last finite weights. Lower train.lr or check the data.",
                        checkpoint,
                        exit_code=3,
                    )
                done = self.step == train.steps or time.perf_counter() >= deadline
                if self.step % train.log_every == 0 or done:
                    now = time.perf_counter()
                    rate = (self.step - last_step) * self.global_batch / max(now - last_time, 1e-9)
                    last_time, last_step = now, self.step
                    record = {"step": self.step, "loss": loss, **level_logs, "lr": lr, "grad_norm": grad_norm,
                              "images_per_s": rate, "nonfinite_steps": self.nonfinite_total}
                    if self.is_main:
                        self._log(record, writer)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
                if self.is_main and (self.step % train.sample_every == 0 or done):
                    self.save_samples()
                if self.step % train.checkpoint_every == 0 or done:
                    checkpoint = self.save() if self.is_main else checkpoint
                if self._stop_signal is not None:
                    checkpoint = self.save() if self.is_main else None
                    name = signal.Signals(self._stop_signal).name
                    raise TrainingStopped(f"{name} received: saved step {self.step}; run the same command to resume",
                                          checkpoint, exit_code=128 + self._stop_signal)
        finally:
            bar.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if writer is not None:
                writer.close()
        return checkpoint or latest_checkpoint(self.run_dir)
