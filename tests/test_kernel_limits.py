"""Runs the Triton kernels could not run (addressing past 2^31 elements, head dimensions, norm group widths) are refused
before a model is built, with what fits."""

import re

import pytest

from megassm.config import ConfigError, load_config
from megassm.auto_choices import check_kernel_limits


def config(seq_len: int, micro_batch: int = 1, cp: int = 1, tp: int = 1):
    return load_config(None, ["--model.preset=mamba2-780m", "--data.path=unused", f"--data.seq_len={seq_len}",
                              f"--data.micro_batch={micro_batch}", f"--data.global_batch={micro_batch}", f"--parallel.cp={cp}",
                              f"--parallel.tp={tp}", "--model.ngroups=8"], world_size=cp * tp)


def in_proj_elements(seq_len: int, micro_batch: int, cp: int, tp: int) -> int:
    """780m with 8 groups: z and x 3072 channels each, B and C 8 x 128, dt 48 heads; split over tp."""
    return micro_batch * seq_len // cp * (2 * 3072 + 2 * 8 * 128 + 48) // tp


@pytest.mark.parametrize("seq_len, micro_batch, cp, tp", [(524288, 1, 1, 1), (65536, 8, 1, 1), (1048576, 1, 2, 1), (524288, 1, 1, 2)])
def test_within_2_31_elements_runs(seq_len, micro_batch, cp, tp):
    fits = in_proj_elements(seq_len, micro_batch, cp, tp) < 2**31
    cfg = config(seq_len, micro_batch, cp, tp)
    if fits:
        check_kernel_limits(cfg, "triton")
        return
    with pytest.raises(ConfigError) as error:
        check_kernel_limits(cfg, "triton")
    longest = (2**31 - 1) // ((2 * 3072 + 2 * 8 * 128 + 48) // tp)
    assert re.search(rf"at most {longest:,} tokens fit; lower data.micro_batch or data.seq_len, or raise parallel.cp", str(error.value))
    check_kernel_limits(cfg, "torch")  # the PyTorch reference addresses with 64-bit offsets


def test_the_limit_is_exact():
    width = 2 * 3072 + 2 * 8 * 128 + 48
    longest = (2**31 - 1) // width
    check_kernel_limits(config(longest), "triton")
    with pytest.raises(ConfigError):
        check_kernel_limits(config(longest + 1), "triton")


def test_a_head_dimension_or_norm_group_the_kernels_cannot_take_is_refused():
    def shaped(*overrides: str):
        return load_config(None, ["--model.preset=debug", "--data.path=unused", "--parallel.tp=1", "--parallel.cp=1",
                                  "--parallel.sequence_parallel=false", "--model.ngroups=1", *overrides], world_size=1)

    check_kernel_limits(shaped("--model.d_model=256", "--model.headdim=256"), "triton")
    with pytest.raises(ConfigError, match=r"^model.headdim = 512: megassm's SSD kernels take head dimensions up to 256 "):
        check_kernel_limits(shaped("--model.d_model=512", "--model.headdim=512"), "triton")
    check_kernel_limits(shaped("--model.d_model=512", "--model.headdim=512", "--kernels.ssd=mamba-ssm"), "triton")
    check_kernel_limits(shaped("--model.d_model=512", "--model.headdim=512"), "torch")
    wide = ["--model.d_model=16384", "--model.headdim=64"]  # 32,768 channels in its one group
    check_kernel_limits(shaped(*wide, "--train.precision=bf16"), "triton")
    mlp_only = ["--model.n_layer=2", "--model.pattern=--", "--model.mlp_hidden=64"]  # no Mamba-2 block: neither limit applies
    check_kernel_limits(shaped(*wide, *mlp_only, "--train.precision=fp32", "--model.headdim=512"), "triton")
    with pytest.raises(ConfigError, match=r"^model.d_inner / model.ngroups = 32,768 channels per norm group: .* at most 16,384 in fp32"):
        check_kernel_limits(shaped(*wide, "--train.precision=fp32"), "triton")
