"""Fine-tune MobileViTv2 or SwiftFormer with the fused attention, on one process or several.

    python examples/train.py                                        # MobileViTv2-0.5 on digits
    torchrun --nproc_per_node=2 examples/train.py --model swiftformer-xs
    python examples/train.py --data-dir ~/flowers --init mobilevitv2-1.0/model.safetensors

Under torchrun every process trains a DDP replica on its shard of each epoch
(``DistributedSampler``): NCCL on GPUs, gloo on CPU. ``--batch-size`` is per process. The data is
scikit-learn's digits (no download) unless ``--data-dir`` names a folder with one subfolder per
class. ``--out`` holds ``checkpoint.pt`` (written atomically), which ``--resume`` continues from.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm
from train_data import DataError, digits, image_folder
from train_state import (
    CheckpointReadError,
    load,
    rng_state,
    save_atomic,
    seed_everything,
    set_rng_state,
)

from mvit2_kernels.models import (
    MobileViTv2,
    SwiftFormer,
    load_pretrained,
    mobilevitv2,
)
from mvit2_kernels.models import swiftformer as swiftformer_module
from mvit2_kernels.models.mobilevitv2 import WIDTHS, TransformerLayer

SWIFTFORMERS = ("xs", "s", "l1", "l3")
MODELS = [f"mobilevitv2-{w}" for w in WIDTHS] + [f"swiftformer-{s}" for s in SWIFTFORMERS]
INIT_SOURCES = {".safetensors": "transformers", ".bin": "transformers", ".pth": "timm",
                ".pt": "cvnets"}


class UsageError(ValueError):
    """An option that cannot work on this machine or with the other options."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mobilevitv2-0.5", choices=MODELS)
    p.add_argument("--no-fused", action="store_true", help="run the unfused reference attention")
    p.add_argument("--backend", default="auto", help="backend of the fused ops (auto, cpu, ...)")
    p.add_argument("--swiftformer-variant", default="normalize", choices=["normalize", "softmax"])
    p.add_argument("--dropout", type=float, default=0.0,
                   help="dropout in the blocks (MobileViTv2's dropout, SwiftFormer's drop_rate)")
    p.add_argument("--init", metavar="CHECKPOINT",
                   help="start from local weights (load_pretrained); the architecture is the "
                   "checkpoint's")
    p.add_argument("--init-source", default="auto",
                   choices=["auto", "transformers", "timm", "cvnets", "mvit2"],
                   help="library of --init; auto: .safetensors/.bin transformers, .pth timm, "
                   ".pt ml-cvnets")
    p.add_argument("--data-dir", help="folder of images, one subfolder per class (default: digits)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute the attention blocks in the backward")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/train", help="folder for checkpoint.pt")
    p.add_argument("--save-every", type=int, default=0, metavar="STEPS",
                   help="also save every STEPS steps (always at each epoch's end)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--max-steps", type=int, default=0, help="stop (and save) after this step")
    p.add_argument("--plot", metavar="PNG", help="write the loss and accuracy curves here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


# --- Processes and devices ---------------------------------------------------------------------


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); a process group only under torchrun (RANK in the env)."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def check_options(args: argparse.Namespace, device: torch.device) -> None:
    if args.amp == "fp16" and device.type != "cuda":
        raise UsageError("--amp fp16 needs a CUDA GPU (fp16 with a GradScaler); on CPU use "
                         "--amp bf16 or --amp off")
    if args.image_size < 32 or args.image_size % 32:
        raise UsageError(f"--image-size must be a multiple of 32 (the models downsample 32x), "
                         f"got {args.image_size}")
    if args.init and not os.path.isfile(args.init):
        raise UsageError(f"--init {args.init!r}: no such file")


# --- Model ------------------------------------------------------------------------------------


def build_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    fused = not args.no_fused
    if args.init:
        source = args.init_source
        if source == "auto":
            source = INIT_SOURCES.get(os.path.splitext(args.init)[1], "transformers")
        try:
            model = load_pretrained(args.init, source, fused=fused, backend=args.backend)
        except Exception as e:  # unreadable, truncated or foreign files: say which, not where
            raise CheckpointReadError(f"cannot start from --init {args.init!r} ({source} "
                                      f"weights): {type(e).__name__}: {e}") from None
        return replace_head(model.train(), num_classes)
    family, size = args.model.split("-")
    if family == "mobilevitv2":
        return mobilevitv2(float(size), num_classes, fused=fused, backend=args.backend,
                           dropout=args.dropout)
    build = getattr(swiftformer_module, f"swiftformer_{size}")
    return build(num_classes, variant=args.swiftformer_variant, fused=fused, backend=args.backend,
                 drop_rate=args.dropout)


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """A new classifier for ``num_classes`` on a pretrained backbone."""
    if isinstance(model, MobileViTv2) and model.classifier is not None:
        model.classifier = nn.Linear(model.classifier.in_features, num_classes)
        nn.init.trunc_normal_(model.classifier.weight, std=0.02)
        nn.init.zeros_(model.classifier.bias)
    elif isinstance(model, SwiftFormer) and isinstance(model.head, nn.Linear):
        for name in ("head", "head_dist"):
            head = nn.Linear(getattr(model, name).in_features, num_classes)
            nn.init.trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
            setattr(model, name, head)
    else:
        raise CheckpointReadError(f"--init holds a {type(model).__name__}, not an image "
                                  "classifier this script can fine-tune")
    return model


def enable_grad_checkpointing(model: nn.Module) -> int:
    """Recompute each attention block in the backward (non-reentrant checkpoint: the fused
    kernels are deterministic, so the gradients are the same). SwiftFormer's blocks hold
    BatchNorm, whose running statistics then take the momentum step twice per training step
    (timm's checkpoint_seq does the same)."""
    blocks = (TransformerLayer, swiftformer_module.SwiftFormerBlock,
              swiftformer_module.ConvEncoder)
    count = 0
    for m in model.modules():
        if isinstance(m, blocks):
            m.forward = functools.partial(checkpoint, m.forward, use_reentrant=False)
            count += 1
    return count


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms, biases and SwiftFormer's layer scales (1-D parameters)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return factor


# --- Evaluation, checkpoints, output -----------------------------------------------------------


@torch.no_grad()
def loader_generator(*key: int) -> torch.Generator:
    """A DataLoader's own generator, seeded from ``key`` (seed, epoch, rank): creating a loader's
    iterator draws its workers' base seed from it, not from the global RNG, which dropout and
    drop path draw from, so a resumed run sees the same random stream as an uninterrupted one."""
    return torch.Generator().manual_seed(hash(key) % 2**63)  # ints' tuple hash: not salted


def evaluate(model: nn.Module, val_set, args, rank: int, world: int, device, amp_dtype
             ) -> tuple[int, int]:
    """(correct, total) over the whole validation set; each rank takes every world-th image."""
    model.eval()
    loader = DataLoader(val_set, batch_size=2 * args.batch_size,
                        sampler=range(rank, len(val_set), world), num_workers=args.workers,
                        generator=loader_generator(args.seed, -1, rank))
    counts = torch.zeros(2, dtype=torch.long, device=device)
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            counts[0] += (model(x).argmax(-1) == y).sum()
        counts[1] += len(y)
    if world > 1:
        dist.all_reduce(counts)
    model.train()
    return int(counts[0]), int(counts[1])


def save(path: str, state: dict, rank: int, world: int) -> None:
    """Every rank's RNG state gathered to rank 0, which writes the file atomically."""
    rngs = [None] * world
    if world > 1:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    if rank == 0:
        save_atomic({**state, "rng": rngs}, path)
    if world > 1:
        dist.barrier()


def plot(path: str, history: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(history["loss"]) + 1), history["loss"], lw=0.8, label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if history["val_acc"]:
        acc = ax.twinx()
        steps, values = zip(*history["val_acc"], strict=True)
        acc.plot(steps, [100 * v for v in values], "o-", color="C1", label="val accuracy")
        acc.set_ylabel("validation accuracy (%)")
        acc.set_ylim(0, 100)
    ax.set_title(title)
    handles = [h for a in fig.axes for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles, [h.get_label() for h in handles], loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fmt_time(seconds: float) -> str:
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s"


# --- Training --------------------------------------------------------------------------------


def train(args: argparse.Namespace) -> dict:
    """Run the training; returns the final figures (accuracy, images/s, ...)."""
    rank, world, device = init_distributed()
    check_options(args, device)
    log = tqdm.write if rank == 0 else (lambda *a, **k: None)
    amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]

    if args.data_dir:
        train_set, val_set, classes = image_folder(args.data_dir, args.image_size,
                                                   args.val_fraction)
    else:
        train_set, val_set, classes = digits(args.image_size, args.val_fraction)
    global_batch = args.batch_size * world
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                 seed=args.seed, drop_last=True)
    steps_per_epoch = len(sampler) // args.batch_size
    if steps_per_epoch == 0:
        raise UsageError(f"{len(train_set)} training images are fewer than one global batch "
                         f"({args.batch_size} x {world} processes)")
    total_steps = args.epochs * steps_per_epoch

    seed_everything(args.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's)
    model = build_model(args, len(classes)).to(device)
    if args.grad_checkpointing:
        log(f"gradient checkpointing: {enable_grad_checkpointing(model)} blocks")
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(min(args.warmup_steps, total_steps // 10 + 1), total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    history = {"loss": [], "val_acc": []}
    step, ckpt_path = 0, os.path.join(args.out, "checkpoint.pt")
    seed_everything(args.seed + rank)  # per-rank randomness (dropout, drop path)
    if args.resume:
        state = load(ckpt_path)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])  # --amp fp16 from a run without: empty
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointReadError(f"{ckpt_path!r} does not fit this model and options "
                                      f"(it was saved with --model {state['args'].get('model')}"
                                      f", --amp {state['args'].get('amp')}): {e}") from None
        step, history = state["step"], state["history"]
        if len(state["rng"]) == world:
            set_rng_state(state["rng"][rank])
        else:
            warnings.warn(f"resuming on {world} process(es) a run saved on {len(state['rng'])}: "
                          "random state and data order differ from an uninterrupted run",
                          stacklevel=1)
        log(f"resumed from {ckpt_path} at step {step} (epoch {step // steps_per_epoch + 1})")

    raw_model = model
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids)
    if args.compile:
        model = torch.compile(model)
    fused = "unfused" if args.no_fused else "fused"
    name = args.model if not args.init else f"{type(raw_model).__name__} from {args.init}"
    log(f"{name} ({fused}), {sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M "
        f"parameters; {len(train_set)} train / {len(val_set)} val images of {len(classes)} "
        f"classes at {args.image_size}px; {world} process(es) on {device.type}"
        f"{f' ({dist.get_backend()})' if world > 1 else ''}, global batch {global_batch}, "
        f"{total_steps} steps")

    def state(epoch: int) -> dict:
        return {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch, "step": step, "history": history, "args": vars(args),
                "classes": classes}

    model.train()
    train_time, timed_images, started = 0.0, 0, time.perf_counter()
    start_step, stop = step, bool(args.max_steps) and step >= args.max_steps
    for epoch in range(step // steps_per_epoch, args.epochs):
        if stop:
            break
        sampler.set_epoch(epoch)
        skip = step - epoch * steps_per_epoch  # batches of this epoch done before a resume
        order = list(sampler)[skip * args.batch_size : steps_per_epoch * args.batch_size]
        loader = DataLoader(train_set, batch_size=args.batch_size, sampler=order,
                            num_workers=args.workers, drop_last=True,
                            generator=loader_generator(args.seed, epoch, rank))
        bar = tqdm(loader, total=steps_per_epoch, initial=skip, unit="step", leave=False,
                   desc=f"epoch {epoch + 1}/{args.epochs}", mininterval=1,
                   disable=rank != 0 or args.no_progress)
        for x, y in bar:
            t0 = time.perf_counter()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            loss = loss.detach()
            if world > 1:
                dist.all_reduce(loss)
                loss /= world
            history["loss"].append(loss.item())
            if step > start_step + 1:  # the first step warms up (allocations, compilation)
                train_time += time.perf_counter() - t0
                timed_images += global_batch
            ips = timed_images / train_time if train_time else 0.0
            bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", img_s=f"{ips:.0f}")
            stop = bool(args.max_steps) and step >= args.max_steps
            if stop or (args.save_every and step % args.save_every == 0):
                save(ckpt_path, state(epoch), rank, world)
            if stop:
                break
        bar.close()
        if stop:
            break
        if world > 1:  # DDP trains with rank 0's BatchNorm statistics: evaluate with them too
            for b in raw_model.buffers():
                dist.broadcast(b, 0)
        correct, total = evaluate(raw_model, val_set, args, rank, world, device, amp_dtype)
        history["val_acc"].append((step, correct / total))
        ips = timed_images / train_time if train_time else 0.0
        log(f"epoch {epoch + 1}/{args.epochs}: step {step}, loss {history['loss'][-1]:.4f}, "
            f"val accuracy {100 * correct / total:.2f}% ({correct}/{total}), {ips:.0f} images/s")
        save(ckpt_path, state(epoch + 1), rank, world)

    elapsed = time.perf_counter() - started
    ips = timed_images / train_time if train_time else 0.0
    correct, total = evaluate(raw_model, val_set, args, rank, world, device, amp_dtype)
    if not history["val_acc"] or history["val_acc"][-1][0] != step:  # stopped mid-epoch
        history["val_acc"].append((step, correct / total))
    result = {"accuracy": correct / total, "correct": correct, "total": total, "step": step,
              "images_per_s": ips, "seconds": elapsed, "world": world,
              "losses": history["loss"]}
    if stop and step < total_steps:
        log(f"stopped at step {step} of {total_steps} (--max-steps); {ckpt_path} continues it "
            "with --resume")
    log(f"final: val accuracy {100 * correct / total:.2f}% ({correct}/{total}) after {step} "
        f"steps, {fmt_time(elapsed)}, {ips:.0f} images/s ({name}, {fused}, {world} process(es), "
        f"amp {args.amp})")
    if args.plot and rank == 0:
        plot(args.plot, history, f"{name} ({fused}), {world} process(es)")
        log(f"curves: {args.plot}")
    if world > 1:
        dist.destroy_process_group()
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        return train(args)
    except (UsageError, DataError, CheckpointReadError) as e:
        raise SystemExit(f"train.py: error: {e}") from None


if __name__ == "__main__":
    main()
