"""The DDP training worker: one process per GPU (NCCL) or gloo processes on CPU.

Launched by `tasks.training.launch` (or by hand, on one or many nodes):

    torchrun --standalone --nproc_per_node=2 -m tasks.training.worker spec.json
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d \
        --rdzv_endpoint=HOST:29500 -m tasks.training.worker spec.json

The spec (JSON) names the Parquet files, the model, optimizer, schedule and a list of
phases: plain training is one phase; pruning is one phase per round, each starting by
masking the smallest weights and then fine-tuning with the mask held. Only rank 0 prints
each epoch's row (one JSON line: the launcher forwards it to progress and to whoever
tracks the run) and writes checkpoints; a rerun with the same checkpoint folder resumes
after the last completed epoch.

Imports torch, numpy and pyarrow only, so workers start fast and run on a bare GPU box;
they never talk to MLflow or Prefect (an import-linter contract in pyproject.toml holds it).
"""

from __future__ import annotations

import faulthandler
import gc
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tasks.paired import counted_drop_and_bound
from tasks.training.clustering import cluster_weights, snap, tie_gradients
from tasks.training.data import Shard, open_split
from tasks.training.fake_int8 import simulate_int8
from tasks.training.models import build_model
from tasks.training.optim import EarlyStopping, Schedule, build_optimizer, l1_penalty
from tasks.training.sparsity import apply_masks, global_magnitude_masks, sparsity_report

# ---------------------------------------------------------------- ranks: the one place


@dataclass
class Rank:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Rank:
    """Read torchrun's RANK/LOCAL_RANK/WORLD_SIZE; NCCL on GPUs, gloo on CPU."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if world > 1:
        # torchrun's store outlives a restart of the worker group, and with it each rank's
        # address from the group that died: a restarted rank could read its peer's stale
        # address and hang connecting to a dead process (seen here). Keys per attempt.
        from torch.distributed.rendezvous import rendezvous

        store, _, _ = next(rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"accelflow/attempt-{attempt}", store)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world)
    return Rank(rank, world, device)


def all_sum(values: list[float], r: Rank) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=r.device)
    if r.world > 1:
        dist.all_reduce(t)  # a sync point: call once per epoch, not per batch
    return t.tolist()


# ---------------------------------------------------------------- data, model, optimizer


def fit_standardize(model: nn.Module, split, unscaled: list[int] | None = None) -> None:
    mean, std = split.moments()
    if unscaled:  # data.numeric_transform: none: these features reach the network as they are
        mean[unscaled], std[unscaled] = 0.0, 1.0
    model.standardize.mean.copy_(mean)
    model.standardize.std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))


def rss_mib(field: str = "VmRSS") -> float:
    """This process's resident memory now (VmRSS) or at its peak (VmHWM), Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 on GPUs that have it, else fp16 (with a GradScaler), fp32 on CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# ---------------------------------------------------------------- the loop


EpochHook = Callable[[int, float, dict[str, float]], None]  # epoch, loss, validation


def load_teacher(teacher: dict[str, Any] | None, device: torch.device) -> nn.Module | None:
    """The trained model a fine-tune distils from (compress.distill), frozen, in eval mode."""
    if not teacher:
        return None
    model = build_model(teacher["arch"]).to(device)
    model.load_state_dict(torch.load(teacher["weights"], map_location=device, weights_only=True))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class Trainer:
    """Trains `spec` on this rank. `on_epoch(epoch, loss, {val_loss, val_accuracy, val_macro_f1})`, when
    given, is called after every epoch and may raise to stop (a tuning trial's pruner).
    Without `out_dir` / `checkpoint_dir` nothing is written (a trial keeps only its figures)."""

    def __init__(self, spec: dict[str, Any], r: Rank, on_epoch: EpochHook | None = None):
        self.spec, self.r, self.on_epoch = spec, r, on_epoch
        self.out = Path(spec["out_dir"]) if spec.get("out_dir") else None
        ckpt_dir = spec.get("checkpoint_dir")
        self.ckpt = Path(ckpt_dir) / "last.pt" if ckpt_dir else None
        torch.manual_seed(spec["seed"])
        self.rss_before_data = rss_mib()
        here = int(os.environ.get("LOCAL_WORLD_SIZE", r.world))
        self.train_split = open_split(spec, spec["train_files"], r.device, True, here)
        # a streamed training split means memory is short: the validation split streams too,
        # rather than filling the resident budget (up to twice over while it loads) beside it
        streams = self.train_split.mode == "streaming"
        self.val_split = open_split(spec, spec["val_files"], r.device, False, here, streams)
        self.shard = Shard(r.rank, r.world, r.device, spec["seed"])
        self.model = build_model(spec["arch"]).to(r.device)
        if spec.get("init_from"):
            self.model.load_state_dict(
                torch.load(spec["init_from"], map_location=r.device, weights_only=True)
            )
        else:
            fit_standardize(self.model, self.train_split, spec["arch"].get("unscaled"))
        self.teacher = load_teacher(spec.get("teacher"), r.device)
        self.eager = self.wrap(self.model)  # one DDP wrapper: two would reduce twice
        self.net = self.eager
        # compiled lazily: a failure shows at the first step, where `forward` falls back
        self.compile_state = "off"
        if spec.get("compile"):
            self.net, self.compile_state = torch.compile(self.eager), "pending"
        self.amp = autocast_dtype(spec["precision"], r.device)
        self.scaler = torch.amp.GradScaler(
            enabled=self.amp == torch.float16 and r.device.type == "cuda"
        )
        self.history: list[dict[str, float]] = []
        self.clusters = None  # weight sharing in a phase with cluster_bits (tasks.compress)
        weights = spec.get("class_weights")  # train.class_weight: rare classes weigh more
        self.class_weights = torch.tensor(weights, device=r.device) if weights else None
        patience = spec.get("early_stopping_patience")
        self.stopper = EarlyStopping(patience) if patience else None
        self.first_cycle: dict[str, Any] | None = None  # its best epoch, beside a restart

    def wrap(self, module: nn.Module) -> nn.Module:
        if self.r.world == 1:
            return module
        device_ids = [self.r.device.index] if self.r.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)

    def forward(self, xb: torch.Tensor) -> torch.Tensor:
        """The training forward pass; the first compiled one falls back to eager on failure
        (no C++ compiler, an unsupported op), with a warning, instead of failing the run."""
        if self.compile_state != "pending":
            return self.net(xb)
        try:
            out = self.net(xb)
            self.compile_state = "compiled"
            return out
        except Exception as exc:
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            print(
                f"warning: torch.compile failed ({reason[:300]}); training in eager mode",
                file=sys.stderr,
                flush=True,
            )
            self.compile_state, self.compile_error = "fell back to eager", reason[:300]
            self.net = self.eager
            return self.net(xb)

    def distilled(self, label_loss: torch.Tensor, logits: torch.Tensor, xb) -> torch.Tensor:
        """Hinton et al. (2015): (1 - alpha) of the labels' loss plus alpha of the KL
        divergence to the teacher's outputs, both softened by T; the KL term is scaled by
        T² so its gradients keep their size whatever T is."""
        alpha, t = self.spec["teacher"]["alpha"], self.spec["teacher"]["temperature"]
        with torch.no_grad():
            soft_targets = F.softmax(self.teacher(xb).float() / t, dim=1)
        kl = F.kl_div(F.log_softmax(logits / t, dim=1), soft_targets, reduction="batchmean")
        return (1 - alpha) * label_loss + alpha * (t * t) * kl

    def steps_per_epoch(self) -> int:
        return self.train_split.steps(self.shard, self.spec["batch_size"])

    def train_epoch(self, opt, sched, masks, global_epoch: int) -> tuple[float, dict[str, float]]:
        """One epoch; returns the mean loss and its speed figures (the bottleneck report)."""
        self.net.train()
        batches = self.train_split.batches(self.shard, global_epoch, self.spec["batch_size"])
        total_loss = torch.zeros((), device=self.r.device)
        start, waited, steps, count = time.perf_counter(), 0.0, 0, 0
        while True:
            fetch = time.perf_counter()
            # the next batch: a gather from the resident split (on a GPU only queued, so
            # the wait shown there is a lower bound) or the stream's next rows
            xb, yb = next(batches, (None, None))
            if xb is None:
                break
            waited += time.perf_counter() - fetch
            steps, count = steps + 1, count + len(yb)
            with torch.autocast(self.r.device.type, dtype=self.amp, enabled=self.amp is not None):
                logits = self.forward(xb)
                loss = F.cross_entropy(
                    logits.float(),
                    yb,
                    weight=self.class_weights,
                    label_smoothing=self.spec["label_smoothing"],
                )
                if self.teacher is not None:
                    loss = self.distilled(loss, logits.float(), xb)
            objective = (
                loss + self.spec["l1"] * l1_penalty(self.model) if self.spec.get("l1") else loss
            )
            opt.zero_grad(set_to_none=True)
            self.scaler.scale(objective).backward()
            if self.spec.get("clip_grad_norm"):
                self.scaler.unscale_(opt)  # clip the true gradients, not the loss-scaled ones
                nn.utils.clip_grad_norm_(self.model.parameters(), self.spec["clip_grad_norm"])
            if self.clusters:  # a shared weight moves by its centroid's (summed) gradient
                tie_gradients(self.model, self.clusters)
            self.scaler.step(opt)
            self.scaler.update()
            sched.step()
            if masks:
                apply_masks(self.model, masks)  # keep pruned weights at exactly zero
            if self.clusters:
                snap(self.model, self.clusters)
            total_loss += loss.detach() * len(yb)  # no .item(): avoid a sync per batch
        seconds = time.perf_counter() - start
        loss_sum, count = all_sum([total_loss.item(), count], self.r)
        steps = max(steps, 1)
        return loss_sum / count, {
            "samples_per_second": count / seconds,
            "step_ms": 1000 * seconds / steps,
            "data_wait_pct": 100 * waited / seconds,
        }

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Loss, accuracy and macro-F1 over the whole validation split (all ranks' shards):
        macro-F1 weighs every class alike, so a rare class that is never predicted shows."""
        k = self.spec["arch"]["n_classes"]
        loss_sum, count = 0.0, 0
        per_class = torch.zeros(3, k, dtype=torch.float64, device=self.r.device)
        for logits, yb in self.val_logits():
            loss_sum += F.cross_entropy(logits, yb, reduction="sum").item()
            predicted = logits.argmax(1)
            per_class += torch.stack(  # per class: true positives, predicted, actual
                [
                    torch.bincount(yb[predicted == yb], minlength=k),
                    torch.bincount(predicted, minlength=k),
                    torch.bincount(yb, minlength=k),
                ]
            )
            count += len(yb)
        flat = all_sum([loss_sum, count, *per_class.flatten().tolist()], self.r)
        loss_sum, count = flat[0], flat[1]
        hits, predicted, actual = torch.tensor(flat[2:], dtype=torch.float64).reshape(3, k)
        seen = actual > 0  # classes of this split (sklearn's macro-F1 over the labels present)
        f1 = 2 * hits[seen] / (predicted[seen] + actual[seen]).clamp(min=1)
        return {
            "val_loss": loss_sum / max(count, 1),
            "val_accuracy": float(hits.sum()) / max(count, 1),
            "val_macro_f1": float(f1.mean()) if bool(seen.any()) else float("nan"),
        }

    def val_logits(self):
        """(logits, labels) of this rank's validation shard, batch by batch, in row order."""
        self.net.eval()
        for xb, yb in self.val_split.batches(self.shard, 0, 4096, shuffle=False):
            yield self.model(xb).float(), yb

    @torch.no_grad()
    def answers(self) -> dict[str, np.ndarray]:
        """Per validation row of this rank's shard, in row order: the label, the predicted
        class and the loss; two trials' answers on the same rows compare with their noise."""
        parts = [
            (yb, logits.argmax(1), F.cross_entropy(logits, yb, reduction="none"))
            for logits, yb in self.val_logits()
        ]
        if not parts:  # no validation rows: nothing to compare on
            return {}
        label, predicted, loss = (
            torch.cat(column).cpu().numpy() for column in zip(*parts, strict=True)
        )
        return {
            "label": label.astype(np.int32),
            "predicted": predicted.astype(np.int32),
            "loss": loss,
        }

    def save_checkpoint(self, opt, sched, masks, phase: int, epoch: int) -> None:
        if not self.r.is_main or self.ckpt is None:
            return
        self.ckpt.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "model": self.model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "early_stopping": self.stopper.state_dict() if self.stopper else None,
            "first_cycle": self.first_cycle,
            "masks": masks,
            "phase": phase,
            "epoch": epoch,
            "history": self.history,
            "spec": self.spec,
        }
        tmp = self.ckpt.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.ckpt)  # atomic: a kill mid-save keeps the previous checkpoint

    def run(self) -> dict[str, Any]:
        resume = (
            torch.load(self.ckpt, map_location=self.r.device, weights_only=True)
            if self.ckpt and self.ckpt.exists()
            else None
        )
        if resume:
            self.model.load_state_dict(resume["model"])
            self.history = resume["history"]
            self.first_cycle = resume.get("first_cycle")
        prefix, global_epoch = self.spec["metric_prefix"], 0
        start = time.perf_counter()
        for p, phase in enumerate(self.spec["phases"]):
            if resume and p < resume["phase"]:
                global_epoch += phase["epochs"]
                continue
            if phase.get("restart_confidence") and self.stopper and self.first_cycle is None:
                # a warm restart: its best epoch is tracked apart from the first cycle's
                self.first_cycle = self.stopper.state_dict()
                self.stopper = EarlyStopping(self.stopper.patience)
            masks = None
            if phase.get("sparsity") is not None:
                masks = global_magnitude_masks(self.model, phase["sparsity"])
            opt = build_optimizer(self.spec, self.model.parameters(), phase["lr"])
            sched = Schedule(self.spec, opt, phase["lr"], phase["epochs"], self.steps_per_epoch())
            first = 0
            if resume and p == resume["phase"]:
                opt.load_state_dict(resume["optimizer"])
                sched.load_state_dict(resume["scheduler"])
                if self.stopper and resume.get("early_stopping"):
                    self.stopper.load_state_dict(resume["early_stopping"])
                masks, first = resume["masks"], resume["epoch"] + 1
                global_epoch += first
                resume = None
            # early stopping watches plain training only: a pruning round's epochs are its own
            stopper = self.stopper if phase.get("sparsity") is None else None
            if stopper and stopper.stopped_epoch is not None:  # resumed after it had stopped
                continue
            if masks:
                apply_masks(self.model, masks)
            # quantization-aware fine-tuning (the qat step): Linear layers compute in simulated
            # int8 through this phase, and so does its validation
            simulate_int8(self.model, bool(phase.get("fake_int8")))
            # k-means weight sharing (after the masks: zeros stay zeros); on a resume the
            # weights are already shared and cluster onto the same values again
            self.clusters = (
                cluster_weights(self.model, phase["cluster_bits"])
                if phase.get("cluster_bits")
                else None
            )
            if (masks or self.clusters) and phase["epochs"] == 0:
                self.log_epoch(prefix, global_epoch, p, float("nan"), {}, masks)
            for epoch in range(first, phase["epochs"]):
                loss, speed = self.train_epoch(opt, sched, masks, global_epoch)
                speed["lr"] = opt.param_groups[0]["lr"]
                val = self.log_epoch(prefix, global_epoch, p, loss, speed, masks)
                sched.epoch_end(val["val_loss"])
                if self.on_epoch:
                    self.on_epoch(global_epoch, loss, val)
                stop = (
                    stopper.update(val["val_accuracy"], val["val_loss"], global_epoch, self.model)
                    if stopper
                    else False
                )
                self.save_checkpoint(opt, sched, masks, p, epoch)
                global_epoch += 1
                if stop:
                    break
        return self.finish(time.perf_counter() - start)

    def log_epoch(
        self, prefix: str, step: int, phase: int, loss: float, speed: dict[str, float], masks
    ) -> dict[str, float]:
        """Validate, then log the epoch's row (rank 0); returns the validation figures."""
        val = self.validate()
        row = {
            f"{prefix}/loss": loss,
            **{f"{prefix}/{k}": v for k, v in speed.items()},
            **{f"val/{k.removeprefix('val_')}": v for k, v in val.items()},
        }
        if masks:
            row[f"{prefix}/sparsity"] = sparsity_report(self.model)["sparsity"]
        row = {k: v for k, v in row.items() if not math.isnan(v)}
        self.history.append({"epoch": step, "phase": phase, **row})
        if self.r.is_main and self.on_epoch is None:  # a trial reports through its hook
            print(json.dumps(self.history[-1]), flush=True)
        return val

    def bottleneck(self) -> dict[str, float]:
        """Mean step time and share of it spent waiting for data, over the epochs trained."""
        prefix = self.spec["metric_prefix"]
        rows = [h for h in self.history if f"{prefix}/step_ms" in h]
        if not rows:
            return {}
        return {
            k: sum(h[f"{prefix}/{k}"] for h in rows) / len(rows)
            for k in ("step_ms", "data_wait_pct")
        }

    def choose_cycle(self) -> dict[str, Any]:
        """After a warm restart: keep its best epoch only where it answers more validation
        rows right than the first cycle's best at the phase's confidence (paired
        bootstrap); else the first cycle's best epoch is what the stopper restores."""
        first, restart = self.first_cycle, self.stopper
        kept, gains = "first", {}
        if restart.best_state is not None:  # else the restart never ran an epoch
            right = []
            for state in (first["best_state"], restart.best_state):
                self.model.load_state_dict(state)
                answers = self.answers()  # {}: this rank's shard of a tiny split holds no row
                right.append(
                    answers["predicted"] == answers["label"] if answers else np.zeros(0, bool)
                )
            lost, won = int((right[0] & ~right[1]).sum()), int((~right[0] & right[1]).sum())
            lost, won, n = (int(v) for v in all_sum([lost, won, len(right[0])], self.r))
            confidence = self.spec["phases"][-1]["restart_confidence"]
            drop, bound = counted_drop_and_bound(lost, won, n, confidence) if n else (0.0, 0.0)
            kept = "restart" if bound < 0 else "first"
            gains = {"restart_gain": -drop, "restart_gain_bound": -bound}
        if kept == "first":
            restart.load_state_dict({**first, "stopped_epoch": restart.stopped_epoch})
        return {"kept_cycle": kept, **gains}

    def finish(self, seconds: float) -> dict[str, Any]:
        stopped = {}
        cycles = {}
        if self.first_cycle and self.first_cycle["best_state"] is not None and self.stopper:
            cycles = self.choose_cycle()
        if self.stopper and self.stopper.best_state is not None:  # the best epoch, not the last
            self.model.load_state_dict(self.stopper.best_state)
            stopped = {
                "best_epoch": self.stopper.best_epoch,
                "stopped_epoch": self.stopper.stopped_epoch,
            }
        result = {
            **self.validate(),
            "seconds": seconds,
            "world_size": self.r.world,
            "device": self.r.device.type,
            "precision": str(self.amp or "fp32").removeprefix("torch."),
            "compile": self.compile_state,
            "data_mode": self.train_split.mode,
            "val_data_mode": self.val_split.mode,
            "backend": dist.get_backend() if dist.is_initialized() else "single process",
            "rss_before_data_mib": self.rss_before_data,
            "peak_rss_mib": rss_mib("VmHWM"),
            **({"compile_error": self.compile_error} if hasattr(self, "compile_error") else {}),
            **sparsity_report(self.model),
            **stopped,
            **cycles,
            **self.bottleneck(),
        }
        if self.out and self.spec.get("save_every_rank"):  # to check the replicas agree
            torch.save(self.model.state_dict(), self.out / f"model.rank{self.r.rank}.pt")
        if self.r.is_main and self.out:
            torch.save(self.model.state_dict(), self.out / "model.pt")
            (self.out / "model.json").write_text(json.dumps(self.spec["arch"], indent=2))
            (self.out / "history.json").write_text(json.dumps(self.history, indent=2))
            (self.out / "result.json").write_text(json.dumps(result, indent=2))
        return result


def die_with_the_launcher() -> None:
    """torch's launcher starts every worker in a session of its own, so killing the run's
    process group (Ctrl-C twice, a scheduler's SIGKILL) would leave the workers training on
    as orphans, writing into the folder the next run resumes from. Ask Linux to kill this
    worker when its launcher dies."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: nothing to ask
        return
    if os.getppid() == 1:  # the launcher died before we asked
        os._exit(1)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: torchrun ... -m tasks.training.worker SPEC.json", file=sys.stderr)
        return 2
    die_with_the_launcher()
    # `kill -USR1 <worker>` prints every thread's stack to the log: what a hung rank waits on
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    spec = json.loads(Path(argv[0]).read_text())
    r = setup_distributed()
    torch.set_num_threads(max(1, spec.get("threads_per_process", 1)))
    trainer = Trainer(spec, r)
    trainer.run()
    if dist.is_initialized():
        # Tear gloo down while the interpreter is fully alive: drop the DDP reducer (which
        # can sit in a reference cycle) and collect it now, wait for rank 0 to finish
        # writing, then destroy the group. Gloo objects left for interpreter finalization
        # abort the process ("terminate called without an active exception").
        del trainer
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    # Everything is written and flushed; skip interpreter finalization, where leftover
    # C++ communication threads can still abort a finished worker.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
