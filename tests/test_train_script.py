"""Specification of examples/train.py: it trains under torchrun on two CPU processes, resumes to
the very parameters of an uninterrupted run, survives a kill mid-save, and turns bad input into
one clear line instead of a traceback.

Tiny runs: 32×32 images, a few steps; the in-process runs use a generated image folder (two
classes, 24 PNGs) so that a few steps cross an epoch."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import train  # noqa: E402  (examples/train.py)
import train_state  # noqa: E402

TINY = ["--image-size", "32", "--no-progress", "--workers", "0"]


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs on one thread: tiny steps gain nothing from two, and on a busy machine
    OpenMP's barriers wait for a descheduled second thread (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def folder(root: Path, per_class: int = 12) -> Path:
    """Two classes of 32×32 PNGs: bright squares (top left vs bottom right) on noise."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for label, name in enumerate(["top_left", "bottom_right"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = torch.rand(32, 32, 3, generator=g) * 0.3
            img[label * 16 : label * 16 + 16, label * 16 : label * 16 + 16] += 0.7
            Image.fromarray((img * 255).byte().numpy()).save(root / name / f"{i}.png")
    return root


def run(out: Path, data: Path, *extra: str) -> dict:
    return train.main([*TINY, "--data-dir", str(data), "--batch-size", "4", "--epochs", "2",
                       "--out", str(out), *extra])


def test_resumed_run_reaches_the_parameters_of_an_uninterrupted_one(tmp_path):
    """With dropout, so that every step draws from the global RNG: a resume that shifts its
    stream (a DataLoader iterator drawing its base seed from it, say) changes the weights."""
    data = folder(tmp_path / "data")
    drop = ("--dropout", "0.2")
    full = run(tmp_path / "a", data, *drop)
    assert full["step"] == 8  # 19 training images, batches of 4: 4 steps an epoch, 2 epochs
    expected = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)

    assert run(tmp_path / "b", data, *drop, "--max-steps", "5")["step"] == 5  # mid-epoch 2
    assert run(tmp_path / "b", data, *drop, "--resume")["step"] == 8
    got = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    for key in ("model", "optimizer"):
        a, r = expected[key], got[key]
        if key == "optimizer":
            a = {f"{i}.{n}": t for i, s in a["state"].items() for n, t in s.items()}
            r = {f"{i}.{n}": t for i, s in r["state"].items() for n, t in s.items()}
        assert a.keys() == r.keys()
        for k in a:
            assert torch.equal(a[k], r[k]), f"{key} {k} differs after resuming"
    assert got["history"]["loss"] == expected["history"]["loss"]
    assert got["scheduler"] == expected["scheduler"]


def test_resuming_with_fp16_amp_from_a_run_without_is_one_clear_error(tmp_path, monkeypatch):
    """The checkpoint's GradScaler state is empty (a disabled scaler); fp16 needs a GPU, so the
    device check is lifted: the resume fails before any fp16 step."""
    data = folder(tmp_path / "data")
    run(tmp_path / "a", data, "--max-steps", "1")
    monkeypatch.setattr(train, "check_options", lambda args, device: None)
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "a", data, "--resume", "--amp", "fp16")
    assert str(e.value).startswith("train.py: error: ") and "does not fit" in str(e.value)
    assert "--amp off" in str(e.value), e.value


def test_init_starts_from_a_checkpoint_through_load_pretrained(tmp_path):
    """--init reads local weights with load_pretrained (here train.py's own checkpoint, source
    mvit2) and fine-tunes them with a new classifier."""
    data = folder(tmp_path / "data")
    run(tmp_path / "a", data, "--max-steps", "1")
    start = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    assert run(tmp_path / "b", data, "--max-steps", "1", "--init",
               str(tmp_path / "a" / "checkpoint.pt"), "--init-source", "mvit2")["step"] == 1
    tuned = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    assert tuned.keys() == start.keys()
    moved = [k for k in start if k.endswith("weight") and not torch.equal(start[k], tuned[k])]
    assert moved, "the loaded weights were not trained"


def test_a_kill_mid_save_leaves_the_previous_checkpoint_readable(tmp_path):
    """The process is SIGKILLed while torch.save is writing the new checkpoint."""
    path = tmp_path / "checkpoint.pt"
    previous = {"model": {"w": torch.arange(4.0)}, "optimizer": {}, "epoch": 1, "step": 7,
                "args": {}}
    train_state.save_atomic(previous, path)
    code = f"""
import os, signal, sys, torch
sys.path.insert(0, {str(EXAMPLES)!r})
import train_state

def dying_save(obj, f):
    f.write(b"PK" + b"\\0" * 4096)  # the first bytes of a new zip, then the kill
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = dying_save
train_state.save_atomic({{"model": {{"w": torch.zeros(4)}}, "step": 8}}, {str(path)!r})
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert [p.name for p in tmp_path.glob(".checkpoint.pt.tmp.*")], "the kill came before the write"
    state = train_state.load(path)
    assert state["step"] == 7 and torch.equal(state["model"]["w"], torch.arange(4.0))


@pytest.mark.parametrize("problem", ["fp16_on_cpu", "no_class_folders", "missing_init",
                                     "corrupt_init", "missing_resume", "corrupt_resume"])
def test_bad_input_is_one_clear_error(tmp_path, problem):
    data = tmp_path / "data"
    data.mkdir()
    args, expected = ["--data-dir", str(folder(tmp_path / "ok")), "--batch-size", "4"], ""
    if problem == "fp16_on_cpu":
        if torch.cuda.is_available():
            pytest.skip("fp16 runs on this machine's GPU")
        args, expected = ["--amp", "fp16"], "--amp fp16 needs a CUDA GPU"
    elif problem == "no_class_folders":
        torch.save({}, data / "loose.png")
        args, expected = ["--data-dir", str(data)], "has no class subfolders"
    elif problem == "missing_init":
        args += ["--init", str(tmp_path / "nope.safetensors")]
        expected = "no such file"
    elif problem == "corrupt_init":
        (tmp_path / "bad.pth").write_bytes(b"not a checkpoint" * 64)
        args += ["--init", str(tmp_path / "bad.pth")]
        expected = "cannot start from --init"
    elif problem == "missing_resume":
        args += ["--resume"]
        expected = "no checkpoint at"
    else:
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
        args += ["--resume"]
        expected = "is unreadable"
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, "--out", str(tmp_path / "out"), *args])
    assert str(e.value).startswith("train.py: error: ") and expected in str(e.value), e.value


def test_torchrun_two_processes_train_and_the_loss_goes_down(tmp_path):
    """The README's command on two CPU processes (gloo), on digits, a few steps."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(EXAMPLES / "train.py"), *TINY, "--batch-size", "16", "--epochs", "1",
           "--max-steps", "12", "--warmup-steps", "3", "--lr", "3e-3", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es) on cpu (gloo)" in proc.stderr + proc.stdout
    assert "final: val accuracy" in proc.stderr + proc.stdout
    losses = torch.load(out / "checkpoint.pt", weights_only=True)["history"]["loss"]
    assert len(losses) == 12
    assert sum(losses[-3:]) < sum(losses[:3]), losses
