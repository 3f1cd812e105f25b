"""arpo.trainer.checkpoint: complete-or-absent step dirs, keep-last-K, exact state and RNG restore."""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from arpo.trainer.checkpoint import (CheckpointError, capture_rng, latest_checkpoint, list_checkpoints,
                                     load_checkpoint, resolve_resume, restore_rng, save_checkpoint)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _setup():
    torch.manual_seed(1)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    return model, opt, sched


def _train_step(model, opt, sched):
    loss = model(torch.randn(5, 4)).square().mean()
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    return loss.item()


def _saver(model):
    def save(d):
        save_file(model.state_dict(), os.path.join(d, "model.safetensors"))
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump({"in": 4, "out": 3}, f)
    return save


def _names(run_dir):
    return sorted(os.listdir(run_dir))


def test_round_trip_continues_exactly(tmp_path):
    """Resuming from a checkpoint gives the same next losses as not stopping (model, optimizer, lr, RNG)."""
    model, opt, sched = _setup()
    for _ in range(3):
        _train_step(model, opt, sched)
    path = save_checkpoint(str(tmp_path), 3, save_model=_saver(model), optimizer=opt, scheduler=sched,
                           state={"metrics": [{"step": 3, "reward": 0.5}], "config": {"train": {"steps": 9}}},
                           save_tokenizer=lambda d: open(os.path.join(d, "tokenizer.json"), "w").write("{}"))
    expected = [_train_step(model, opt, sched) for _ in range(3)]

    random.random(), np.random.rand(), torch.rand(3)  # disturb every generator
    model2, opt2, sched2 = _setup()
    ckpt = load_checkpoint(path)
    assert ckpt.step == 3 and ckpt.state["metrics"] == [{"step": 3, "reward": 0.5}]
    assert ckpt.state["config"] == {"train": {"steps": 9}}
    model2.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
    opt2.load_state_dict(ckpt.optimizer)
    sched2.load_state_dict(ckpt.scheduler)
    ckpt.restore_rng()
    assert [_train_step(model2, opt2, sched2) for _ in range(3)] == expected
    assert {"model.safetensors", "config.json", "tokenizer.json", "optimizer.pt", "rng_state.pt",
            "trainer_state.json"} <= set(os.listdir(path))


def test_rng_restore_reproduces_draws():
    state = capture_rng()
    first = (random.random(), np.random.rand(4).tolist(), np.random.randn(), torch.rand(4).tolist())
    restore_rng(state)
    assert (random.random(), np.random.rand(4).tolist(), np.random.randn(), torch.rand(4).tolist()) == first


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_restore(tmp_path):
    path = save_checkpoint(str(tmp_path), 1)
    first = torch.rand(4, device="cuda").tolist()
    load_checkpoint(path).restore_rng()
    assert torch.rand(4, device="cuda").tolist() == first


def test_exception_mid_save_leaves_no_step_dir(tmp_path):
    run = str(tmp_path)
    model, opt, sched = _setup()
    good = save_checkpoint(run, 1, save_model=_saver(model), optimizer=opt)

    def broken(d):
        _saver(model)(d)  # half the files are there when it fails
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(run, 2, save_model=broken, optimizer=opt)
    assert _names(run) == ["step_000001"]
    assert latest_checkpoint(run) == good
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C during a save is cleaned up too
        save_checkpoint(run, 3, save_model=lambda d: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert _names(run) == ["step_000001"]


def test_killed_save_never_leaves_a_step_dir(tmp_path):
    """SIGKILL in the middle of a save (files half written): the step dir does not exist; the next save sweeps."""
    run = str(tmp_path / "run")
    code = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {ROOT!r})
        from arpo.trainer.checkpoint import save_checkpoint
        def slow(d):
            open(os.path.join(d, "model.safetensors"), "w").write("partial")
            print("writing", flush=True)
            time.sleep(60)
        save_checkpoint({run!r}, 1, save_model=lambda d: None)
        save_checkpoint({run!r}, 2, save_model=slow)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert [s for s, _ in list_checkpoints(run)] == [1]
    assert not os.path.exists(os.path.join(run, "step_000002"))
    assert any(n.startswith(".tmp-") for n in os.listdir(run))  # the torn save is hidden, not deleted yet
    save_checkpoint(run, 2)
    assert _names(run) == ["step_000001", "step_000002"]


def test_keep_last_k(tmp_path):
    run = str(tmp_path)
    for step in (5, 10, 15, 20, 25):
        save_checkpoint(run, step, state={"n": step}, keep_last=2)
    assert _names(run) == ["step_000020", "step_000025"]
    assert latest_checkpoint(run).endswith("step_000025")
    for step in (30, 35):
        save_checkpoint(run, step, keep_last=0)
    assert [s for s, _ in list_checkpoints(run)] == [20, 25, 30, 35]


def test_resaving_a_step_replaces_it(tmp_path):
    run = str(tmp_path)
    save_checkpoint(run, 4, state={"tag": "old"})
    save_checkpoint(run, 4, state={"tag": "new"})
    assert _names(run) == ["step_000004"]
    assert load_checkpoint(os.path.join(run, "step_000004")).state["tag"] == "new"


def test_state_is_strict_json(tmp_path):
    path = save_checkpoint(str(tmp_path), 1, state={"x": torch.tensor(2.5), "y": np.float32(1.5)})
    assert load_checkpoint(path).state["x"] == 2.5
    with pytest.raises(ValueError):
        save_checkpoint(str(tmp_path), 2, state={"bad": float("nan")})
    with pytest.raises(TypeError, match="not JSON"):
        save_checkpoint(str(tmp_path), 3, state={"bad": object()})
    assert _names(str(tmp_path)) == ["step_000001"]


def test_missing_and_resume(tmp_path):
    run = str(tmp_path)
    assert latest_checkpoint(run) is None and latest_checkpoint(str(tmp_path / "nope")) is None
    assert resolve_resume(run, None) is None and resolve_resume(run, "latest") is None
    os.makedirs(tmp_path / "step_000009")  # no trainer_state.json: not a checkpoint
    assert latest_checkpoint(run) is None
    with pytest.raises(FileNotFoundError, match="trainer_state.json"):
        load_checkpoint(str(tmp_path / "step_000009"))
    with pytest.raises(FileNotFoundError, match="train.resume"):
        resolve_resume(run, str(tmp_path / "step_000009"))
    path = save_checkpoint(run, 3)
    assert resolve_resume(run, "latest") == path == resolve_resume(run, path)
    with pytest.raises(ValueError):
        save_checkpoint(run, -1)


def test_manifest_names_the_bad_file(tmp_path):
    from arpo.trainer.checkpoint import MANIFEST_FILE, STATE_FILE, verify_checkpoint

    run = str(tmp_path)
    model = torch.nn.Linear(4, 4)
    good = save_checkpoint(run, 1, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    bad = save_checkpoint(run, 2, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert verify_checkpoint(good) is None
    with open(os.path.join(good, MANIFEST_FILE)) as f:
        assert set(json.load(f)["files"]) == {STATE_FILE, "optimizer.pt", "rng_state.pt"}
    optim = os.path.join(bad, "optimizer.pt")
    with open(optim, "r+b") as f:  # same size, one byte flipped: only the checksum sees it
        f.seek(10)
        byte = f.read(1)
        f.seek(10)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert "optimizer.pt" in verify_checkpoint(bad) and "checksum" in verify_checkpoint(bad)
    assert verify_checkpoint(bad, checksums=False) is None
    warned = []
    assert latest_checkpoint(run, warn=warned.append) == good and "optimizer.pt" in warned[0]
    with pytest.raises(CheckpointError, match="optimizer.pt"):
        resolve_resume(run, bad)
    os.remove(os.path.join(bad, MANIFEST_FILE))  # a version-2 checkpoint without its manifest is incomplete
    assert MANIFEST_FILE in verify_checkpoint(bad)
    state_path = os.path.join(bad, STATE_FILE)  # a version-1 checkpoint (before manifests) is taken as it is
    with open(state_path) as f:
        state = json.load(f)
    with open(state_path, "w") as f:
        json.dump({**state, "format_version": 1}, f)
    assert verify_checkpoint(bad) is None
