"""How long training waits for a checkpoint, written in the background (checkpoint.async_save) or not, on one device.

A preset's model with AdamW state (one real optimizer step) in the trainer's engine, saved by start_checkpoint as the
trainer calls it. "waited" is the time until training may change the state again (in the background: DCP's plans and
the host copy; otherwise the whole write), "complete" the time until the checkpoint is. As soon as training may go on,
the weights and AdamW's moments are changed in place; the checkpoint read back must hold them exactly as they were
when the save began, which is what a background write has to guarantee (its copies from the GPU finished first).
The background mode runs twice: the second reuses the first's page-locked host memory, as every later checkpoint of a
run does.

    python tools/bench_checkpoint.py --preset mamba2-780m --dir /tmp/bench_checkpoint
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

from megassm.checkpoint import load_checkpoint, start_checkpoint
from megassm.checkpoint_writer import HostCopies
from megassm.config import Config
from megassm.model import Mamba2LM, ModelConfig
from megassm.model.config import PRESETS
from parallel import ParallelContext
from parallel.data_parallel import DDPEngine


def engine_with_state(model: Mamba2LM) -> DDPEngine:
    """The trainer's engine on one process, after one AdamW step from random gradients (its moments are then set)."""
    engine = DDPEngine(model, ParallelContext(), [{"params": list(model.parameters())}], lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    engine.optimizer.step()
    return engine


def on_host(model: Mamba2LM, engine: DDPEngine) -> dict[str, torch.Tensor]:
    """Every weight and first moment, copied to host memory."""
    state = {}
    for name, p in model.named_parameters():
        state[name] = p.detach().to("cpu", copy=True)
        state[f"{name}.exp_avg"] = engine.optimizer.state[p]["exp_avg"].to("cpu", copy=True)
    return state


def changed_after(model: Mamba2LM, engine: DDPEngine) -> None:
    """What the next steps do to the state, in place."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
            engine.optimizer.state[p]["exp_avg"].mul_(-1.0)


def restored(model: Mamba2LM, engine: DDPEngine, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state[name])
            engine.optimizer.state[p]["exp_avg"].copy_(state[f"{name}.exp_avg"])


def differing(path: Path, cfg: Config, want: dict[str, torch.Tensor]) -> list[str]:
    """The tensors of the checkpoint at `path`, read into a model on the host, that differ from `want`."""
    model = Mamba2LM(cfg.model)
    engine = DDPEngine(model, ParallelContext(), [{"params": list(model.parameters())}], lr=1e-4)
    load_checkpoint(path, model, engine, ParallelContext())
    got = on_host(model, engine)
    return [name for name in want if not torch.equal(got[name], want[name])]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mamba2-780m", choices=PRESETS)
    parser.add_argument("--dir", type=Path, required=True, help="a scratch folder, deleted first")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    cfg = Config(model=ModelConfig.from_preset(args.preset))
    model = Mamba2LM(cfg.model).to(device)
    engine = engine_with_state(model)
    before = on_host(model, engine)
    gib = sum(t.numel() * t.element_size() for t in before.values()) * 1.5 / 2**30  # with the second moments
    print(f"{args.preset} on {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}: {gib:.1f} GiB of weights "
          f"and AdamW state", flush=True)
    shutil.rmtree(args.dir, ignore_errors=True)
    copies, failures = HostCopies(), 0
    for step, mode in enumerate(["background", "background", "waited for"], start=1):
        start = time.perf_counter()
        write = start_checkpoint(args.dir, cfg, model, engine, ParallelContext(), {"step": step, "samples": 0, "skipped_steps": 0},
                                 copies=copies if mode == "background" else None)
        if not write.copied:
            write.wait()
        waited = time.perf_counter() - start
        changed_after(model, engine)
        write.wait()
        complete = time.perf_counter() - start
        wrong = differing(write.result, cfg, before)
        failures += bool(wrong)
        print(f"{mode:>10}: training waited {waited:6.2f} s, checkpoint complete after {complete:6.1f} s; read back: "
              + (f"{len(wrong)} tensors differ from the state when the save began, e.g. {wrong[:3]}" if wrong else
                 "equal to the state when the save began"), flush=True)
        shutil.rmtree(write.result)
        restored(model, engine, before)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
