"""Where train.cuda_graphs = "auto" replays the blocks as CUDA graphs, and what it says when it does not."""

import pytest
import torch

from megassm.config import ConfigError, load_config
from megassm.train import GRAPHS_AUTO_MAX_TOKENS, cuda_graphs_choice

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


def config(*overrides: str, world_size: int = 1):
    return load_config(None, ["--model.preset=debug", "--data.path=unused", "--data.seq_len=2048", "--data.micro_batch=8",
                              "--data.global_batch=8", *overrides], world_size=world_size)


@pytest.mark.parametrize("overrides, world, expected", [
    ([], 1, (True, "CUDA graphs")),
    (["--parallel.tp=2"], 2, (False, "no CUDA graphs (they need parallel.tp = 1)")),
    (["--parallel.cp=2", "--parallel.tp=2"], 4, (False, "no CUDA graphs (they need parallel.tp = 1 and parallel.cp = 1)")),
    (["--train.activation_checkpointing=true"], 1,
     (False, "no CUDA graphs (activation checkpointing; train.cuda_graphs = true adds them)")),
    (["--train.activation_checkpointing=true", "--train.cuda_graphs=true"], 1, (True, "CUDA graphs")),
    (["--data.micro_batch=1", "--data.global_batch=1", f"--data.seq_len={2 * GRAPHS_AUTO_MAX_TOKENS}"], 1,
     (False, "no CUDA graphs (65,536 tokens per micro batch launch few kernels per token; train.cuda_graphs = true adds them)")),
    (["--data.micro_batch=1", "--data.global_batch=1", f"--data.seq_len={2 * GRAPHS_AUTO_MAX_TOKENS}", "--parallel.cp=2"], 2,
     (False, "no CUDA graphs (they need parallel.cp = 1)")),
    (["--train.cuda_graphs=false"], 1, (False, "no CUDA graphs")),
    (["--model.preset=debug-hybrid"], 1, (True, "CUDA graphs")),
    (["--model.preset=debug-hybrid", "--kernels.compile=false"], 1,
     (False, "no CUDA graphs (they need kernels.compile = true with attention blocks ('*'))")),
])
def test_auto_graphs_where_correct_and_worth_it(overrides, world, expected):
    assert cuda_graphs_choice(config(*overrides, world_size=world), CUDA) == expected
    assert cuda_graphs_choice(config(*overrides, world_size=world), CPU) == (False, "no CUDA graphs")


@pytest.mark.parametrize("overrides, world, message", [
    (["--train.cuda_graphs=true", "--parallel.tp=2"], 2, "train.cuda_graphs = true needs parallel.tp = 1: switch one of them"),
    (["--train.cuda_graphs=true", "--parallel.engine=deepspeed"], 1, "train.cuda_graphs = true needs parallel.engine = 'ddp'"),
    (["--train.cuda_graphs=sometimes"], 1, "train.cuda_graphs = 'sometimes': choose true, false or \"auto\""),
])
def test_graphs_that_cannot_run_are_refused(overrides, world, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config(*overrides, world_size=world)
