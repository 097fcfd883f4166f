"""launch/torchrun.sh and megassm.torchrun: a config that does not fit the world size about to start
stops with the trainer's one line before any process starts; a trainer that fails under torchrun ends
with its own line, never torchrun's traceback; the launch scripts pass the trainer's arguments on."""

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import megassm.torchrun
from tests.commands import ROOT
from tests.distributed import RDZV_ENDPOINT  # port 0: see there

DEBUG = str(ROOT / "configs" / "debug.toml")  # tp 2 x cp 2: fits 4 processes


def launch(script: str, *args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """bash launch/<script> args, with this Python's environment first on PATH."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    env = {**os.environ, "PATH": path, "MASTER_PORT": "0", **env}  # the port of RDZV_ENDPOINT
    return subprocess.run(["bash", str(ROOT / "launch" / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("nodes, nproc, overrides, message", [
    ("2", "2", ["--parallel.dp=2"], "parallel.tp * parallel.cp * parallel.dp = 2 * 2 * 2 = 8, but the world size is 4 "
     "(set parallel.dp = -1 to use the rest)"),
    ("1", "6", [], "parallel.tp * parallel.cp = 4 does not divide the world size 6"),
    ("2", "4", ["--parallel.tp=8", "--parallel.cp=1"], "parallel.tp = 8 must divide the model's 4 groups (model.ngroups: B and C "
     "are split by group; raise it to a multiple of parallel.tp, which widens in_proj, or lower parallel.tp)"),
    ("1", "4", ["--data.seq_len=255"], "data.seq_len = 255 must be divisible by parallel.cp = 2"),
], ids=["layout-vs-world-size", "world-not-divisible", "tp-vs-groups", "seq-len-vs-cp"])
def test_a_config_that_does_not_fit_starts_no_process(monkeypatch, capsys, nodes, nproc, overrides, message):
    monkeypatch.setattr(megassm.torchrun, "run", lambda args: pytest.fail("torchrun started processes"))
    argv = ["--nnodes", nodes, "--nproc-per-node", nproc, "-m", "megassm.train", "--config", DEBUG, *overrides]
    assert megassm.torchrun.main(argv) == 2
    assert capsys.readouterr().err == f"megassm-train: error: {message}\n"


def test_torchrun_sh_stops_a_bad_layout_with_one_line(tmp_path):
    done = launch("torchrun.sh", "--config", DEBUG, "--parallel.tp=3", cwd=tmp_path, NPROC_PER_NODE="4")
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["megassm-train: error: parallel.tp * parallel.cp = 6 does not divide the world size 4"], done.stderr


def test_torchrun_sh_counts_the_gpus_it_is_given_and_needs_a_rendezvous_host_for_several_nodes(tmp_path):
    """CUDA_VISIBLE_DEVICES (a node shared by several jobs) rather than every GPU nvidia-smi lists; NNODES > 1 without
    MASTER_ADDR would have each node meet itself."""
    done = launch("torchrun.sh", "--config", DEBUG, "--parallel.tp=3", cwd=tmp_path, CUDA_VISIBLE_DEVICES="4,5,6,7")
    assert done.stderr.splitlines() == ["megassm-train: error: parallel.tp * parallel.cp = 6 does not divide the world size 4"], done.stderr
    done = launch("torchrun.sh", "--config", DEBUG, cwd=tmp_path, NNODES="2", MASTER_ADDR="")
    assert done.returncode == 2 and done.stderr.splitlines() == [
        "launch/torchrun.sh: NNODES=2 needs MASTER_ADDR, the host name of one of the nodes, set alike on every node"], done.stderr


@pytest.mark.parametrize("variable, value, least", [("NPROC_PER_NODE", "abc", 1), ("NPROC_PER_NODE", "0", 1), ("NNODES", "-2", 1),
                                                     ("MASTER_PORT", "http", 0), ("MAX_RESTARTS", "-1", 0)])
def test_torchrun_sh_refuses_a_variable_that_is_not_a_count(tmp_path, variable, value, least):
    done = launch("torchrun.sh", "--config", DEBUG, cwd=tmp_path, **{variable: value})
    assert done.returncode == 2 and done.stderr.splitlines() == [
        f"launch/torchrun.sh: {variable}={value} must be a whole number of at least {least}"], done.stderr


def test_a_rendezvous_port_in_use_is_said_at_once(tmp_path):
    """On one node, an explicit MASTER_PORT another program listens on (torchrun would wait out its rendezvous timeout)."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        done = launch("torchrun.sh", "--config", DEBUG, cwd=tmp_path, MASTER_PORT=str(port), NPROC_PER_NODE="4")
    assert done.returncode == 2 and done.stderr.splitlines() == [
        f"megassm-torchrun: the rendezvous port 127.0.0.1:{port} is in use by another program (another run on this host?): set "
        "MASTER_PORT to a free port, or leave it unset on one node"], done.stderr


def test_torchrun_sh_names_the_python_it_needs(tmp_path):
    """An interpreter without megassm (a shell where its environment is not active) stops with one line saying what to do."""
    bare = tmp_path / "python"
    bare.write_text("#!/bin/sh\nexit 1\n")  # finds no megassm
    bare.chmod(0o755)
    done = launch("torchrun.sh", "--config", DEBUG, cwd=tmp_path, PYTHON=bare)
    assert done.returncode == 2 and done.stderr.splitlines() == [
        f"launch/torchrun.sh: {bare} has no megassm: activate the environment it is installed in (source .venv/bin/activate after "
        "launch/quickstart.sh or launch/setup.sh) or set PYTHON=/path/to/its/python"], done.stderr


def test_torchrun_sh_takes_the_checkouts_environment_where_python_on_path_has_no_torch(tmp_path):
    """A shell where .venv is not active, in the checkout's root: python on PATH finds the megassm folder there but no
    torch (it ended with a traceback); the checkout's .venv runs the job."""
    bare = tmp_path / "bin" / "python"
    bare.parent.mkdir()
    bare.write_text("#!/bin/sh\nexit 1\n")  # finds neither
    bare.chmod(0o755)
    done = launch("torchrun.sh", "--config", DEBUG, "--parallel.tp=3", cwd=tmp_path, NPROC_PER_NODE="4",
                  PATH=f"{bare.parent}{os.pathsep}{os.environ['PATH']}")
    assert done.stderr.splitlines() == ["megassm-train: error: parallel.tp * parallel.cp = 6 does not divide the world size 4"], done.stderr


def test_torchrun_sh_tells_the_trainer_how_it_was_launched(tmp_path):
    """The command a stop's line gives to resume: this script with the variables it read, as they were."""
    python = tmp_path / "python"
    python.write_text('#!/bin/sh\nif [ "$1" = -c ]; then exit 0; fi\necho "$MEGASSM_LAUNCH"\n')  # has megassm; prints
    python.chmod(0o755)
    done = launch("torchrun.sh", "--config", DEBUG, cwd=tmp_path, PYTHON=python, NPROC_PER_NODE="4", RDZV_ID="my job")
    assert done.stdout.splitlines() == [f"NPROC_PER_NODE=4 MASTER_PORT=0 RDZV_ID=my\\ job PYTHON={python} bash launch/torchrun.sh"]


def test_a_trainer_failing_under_torchrun_ends_with_its_own_line(tmp_path):
    """The config fits, the data folder is missing: every rank stops; one line, the trainer's exit code; restarts
    allowed, none is made (it would stop at the same mistake)."""
    done = launch("torchrun.sh", "--config", DEBUG, "--parallel.tp=1", f"--data.path={tmp_path / 'none'}", cwd=tmp_path,
                  NPROC_PER_NODE="2", MAX_RESTARTS="2")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"megassm-train: error: {tmp_path / 'none'}: no such data folder; make one with "
                                        f"python tools/prepare_data.py --out {tmp_path / 'none'} ..."], done.stderr


def test_the_line_comes_where_rank_0_meets_the_mistake_after_another_rank(tmp_path):
    """Rank 0 slowed down (a loaded machine): rank 1 meets the missing data folder first. Had it ended at once, torchrun
    would have stopped rank 0 before it said why: exit 2 and no line at all."""
    hook = tmp_path / "slow_rank_0"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text("import os, time\nif os.environ.get('RANK') == '0':\n    time.sleep(4)\n")
    done = launch("torchrun.sh", "--config", DEBUG, "--parallel.tp=1", f"--data.path={tmp_path / 'none'}", cwd=tmp_path,
                  NPROC_PER_NODE="2", PYTHONPATH=os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"megassm-train: error: {tmp_path / 'none'}: no such data folder; make one with "
                                        f"python tools/prepare_data.py --out {tmp_path / 'none'} ..."], done.stderr


def test_a_killed_process_is_reported_in_one_line(tmp_path):
    (tmp_path / "die.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-m", "megassm.torchrun", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                           "--rdzv-endpoint", RDZV_ENDPOINT, "die.py"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 128 + 9
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("megassm-torchrun: rank 0 (pid ") and lines[0].endswith("killed by signal 9 (SIGKILL)")


def test_the_trainers_help_is_printed_once(capsys):
    with pytest.raises(SystemExit) as stopped:
        megassm.torchrun.main(["--nproc-per-node", "4", "-m", "megassm.train", "--help"])
    assert stopped.value.code == 0 and capsys.readouterr().out.count("usage: megassm-train") == 1


@pytest.fixture
def stubbed_checkout(tmp_path) -> Path:
    """A copy of the launch and test scripts whose .venv holds stand-ins for python and pip that record their
    arguments, and whose launch/torchrun.sh records the trainer's: the scripts run as on a fresh machine."""
    shutil.copytree(ROOT / "launch", tmp_path / "launch")
    (tmp_path / "tests").mkdir()
    shutil.copy(ROOT / "tests" / "run.sh", tmp_path / "tests")
    (tmp_path / "data" / "builtin").mkdir(parents=True)
    (tmp_path / "data" / "builtin" / "meta.json").write_text("{}")  # the quickstart's data: already made
    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "activate").write_text(f'PATH="{venv}:$PATH"\n')
    for name in ("python", "pip"):
        (venv / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "{tmp_path}/calls"\n')
        (venv / name).chmod(0o755)
    (tmp_path / "launch" / "torchrun.sh").write_text(f'echo "torchrun.sh $*" >> "{tmp_path}/calls"\n')
    return tmp_path


@pytest.mark.parametrize("script, args, want", [
    ("launch/quickstart.sh", ["--train.steps=50"],
     ["python -m pip install -q -e .", r"torchrun.sh --config configs/debug.toml --run.dir=runs/quickstart-\d+-\d+ --train.steps=50",
      r"python tools/plot_metrics.py runs/quickstart-.*"]),
    ("tests/run.sh", ["-k", "ssd"], [r"python -m pip install -q -e .\[dev\]", "python -m pytest -n 2 -k ssd"]),
], ids=["quickstart", "tests"])
def test_scripts_give_their_arguments_to_the_trainer_or_pytest_not_to_pip(stubbed_checkout, script, args, want):
    done = subprocess.run(["bash", str(stubbed_checkout / script), *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    calls = [call for call in (stubbed_checkout / "calls").read_text().splitlines()
             if call not in ("python -c import torch", "python -m pip --version")]
    assert len(calls) == len(want) and all(re.fullmatch(pattern, call) for pattern, call in zip(want, calls)), calls


def test_a_venv_without_pip_is_made_again(stubbed_checkout):
    """python3 -m venv that failed half-way leaves a .venv whose pip is another interpreter's: it is not trusted."""
    venv = stubbed_checkout / ".venv" / "bin"
    (venv / "python").write_text('#!/bin/sh\n[ "$*" = "-m pip --version" ] && exit 1\nexit 0\n')
    tools = stubbed_checkout / "tools"
    tools.mkdir()
    (tools / "python3").write_text(f'#!/bin/sh\necho "python3 $*" >> "{stubbed_checkout}/calls"\nrm -rf .venv\n'
                                   f'cp -r "{stubbed_checkout}/good" .venv\n')
    (tools / "python3").chmod(0o755)
    good = stubbed_checkout / "good" / "bin"
    good.mkdir(parents=True)
    (good / "activate").write_text(f'PATH="{stubbed_checkout}/.venv/bin:$PATH"\n')
    (good / "python").write_text(f'#!/bin/sh\necho "python $*" >> "{stubbed_checkout}/calls"\n')
    (good / "python").chmod(0o755)
    done = subprocess.run(["bash", "tests/run.sh"], cwd=stubbed_checkout, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}"})
    assert done.returncode == 0, done.stderr
    assert (stubbed_checkout / "calls").read_text().splitlines()[:2] == ["python3 -m venv .venv", "python -c import torch"]


def recorded_launch(tmp_path: Path, script: str, **env: str) -> str:
    """The command line launch/<script> runs, with python and Slurm's srun and scontrol replaced by recorders."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stubs = {"python": 'echo "python $*"', "srun": 'echo "srun MASTER_PORT=$MASTER_PORT NPROC_PER_NODE=$NPROC_PER_NODE $*"',
             "scontrol": "echo node7"}
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    done = subprocess.run(["bash", str(ROOT / "launch" / script), "--config", DEBUG], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env})
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_runs_on_one_host_never_share_a_rendezvous(tmp_path):
    """One node: a port the kernel picks (two runs on a fixed port would join each other's launcher); several nodes
    meet at MASTER_ADDR's; Slurm jobs at a port of their own, from the job id."""
    env = {"MASTER_ADDR": "", "MASTER_PORT": "", "NNODES": "1", "CUDA_VISIBLE_DEVICES": "0"}
    assert "--rdzv-endpoint 127.0.0.1:0 " in recorded_launch(tmp_path, "torchrun.sh", **env)
    assert "--rdzv-endpoint node0:29500 " in recorded_launch(tmp_path, "torchrun.sh", **{**env, "NNODES": "2", "MASTER_ADDR": "node0"})
    slurm = {"SLURM_JOB_ID": "123456", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[7-8]", "SLURM_SUBMIT_DIR": str(ROOT),
             "SLURM_CPUS_PER_TASK": "8", "MASTER_PORT": ""}
    assert recorded_launch(tmp_path, "slurm.sbatch", **slurm).startswith(f"srun MASTER_PORT={10000 + 123456 % 20000} ")


def test_slurm_sbatch_takes_the_gpus_and_cpus_slurm_gives(tmp_path):
    """--gpus-per-node (with a type or without) sets the processes per node; with --gres the GPUs Slurm makes visible
    count (torchrun.sh), not a guess; without --cpus-per-task srun gets no such option (set -u would stop the script)."""
    slurm = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[7-8]", "SLURM_SUBMIT_DIR": str(ROOT), "MASTER_PORT": ""}
    given = recorded_launch(tmp_path, "slurm.sbatch", **slurm, SLURM_GPUS_PER_NODE="h100:4", SLURM_CPUS_PER_TASK="16")
    assert " NPROC_PER_NODE=4 --kill-on-bad-exit=1 --cpus-per-task=16 bash launch/torchrun.sh" in given, given
    gres = recorded_launch(tmp_path, "slurm.sbatch", **slurm, SLURM_GPUS_PER_NODE="", SLURM_CPUS_PER_TASK="", NPROC_PER_NODE="")
    assert " NPROC_PER_NODE= --kill-on-bad-exit=1 bash launch/torchrun.sh" in gres, gres
