"""The language model against Hugging Face transformers on the same weights, and packed documents; the
names its parameters keep, the mixer's layout, and blocks built from the registry of layer kinds."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from transformers import Mamba2Config, Mamba2ForCausalLM

from megassm.hf import from_hf_state_dict, hf_config_dict, model_config_from_hf, to_hf_state_dict
from megassm.model import MIXERS, Block, Mamba2LM, Mamba2Mixer, ModelConfig, apply_activation_checkpointing
from parallel import ParallelContext, param_roles
from tests.dispatch import Operators


def hf_twin(model: Mamba2LM) -> Mamba2ForCausalLM:
    """A transformers Mamba2ForCausalLM holding `model`'s weights."""
    cfg = model.cfg
    fields = {k: v for k, v in hf_config_dict(cfg).items() if k not in ("model_type", "architectures")}
    twin = Mamba2ForCausalLM(Mamba2Config(**fields)).eval()
    twin.load_state_dict(to_hf_state_dict(model.state_dict(), cfg), strict=True)
    return twin


def relative_error(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig.from_preset("debug-g1"),
        ModelConfig.from_preset("debug", ngroups=2),
        ModelConfig.from_preset("debug", tie_embeddings=False, chunk_size=8),
    ],
    ids=["ngroups1", "ngroups2", "untied-ngroups2"],
)
def test_logits_and_gradients_match_transformers(cfg):
    model = Mamba2LM(cfg)
    with torch.no_grad():  # make D and the norms non-trivial so a wrong mapping shows
        for name, p in model.named_parameters():
            if name.endswith(("D", "norm_weight", "norm.weight")):
                p.add_(torch.randn_like(p) * 0.3)
    twin = hf_twin(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 3 * cfg.chunk_size + 5))  # not a whole number of chunks

    logits = model(ids)
    want = twin(ids, use_cache=False).logits
    assert relative_error(logits, want) < 1e-5

    labels = torch.randint(0, cfg.vocab_size, ids.shape)
    F.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
    F.cross_entropy(want.flatten(0, 1), labels.flatten()).backward()
    grads = to_hf_state_dict({n: p.grad for n, p in model.named_parameters()}, cfg)
    for name, p in twin.named_parameters():
        assert relative_error(grads[name], p.grad) < 1e-4, name


def test_state_dict_round_trip_through_hf_format():
    cfg = ModelConfig.from_preset("debug", tie_embeddings=False, proj_bias=True)
    state = Mamba2LM(cfg).state_dict()
    hf_state = to_hf_state_dict(state, cfg)
    assert hf_state["backbone.layers.1.mixer.in_proj.weight"].shape == (2 * cfg.d_inner + 2 * cfg.ngroups * cfg.d_state + cfg.nheads, cfg.d_model)
    assert hf_state["backbone.layers.1.mixer.conv1d.weight"].shape == (cfg.d_inner + 2 * cfg.ngroups * cfg.d_state, 1, cfg.d_conv)
    back = from_hf_state_dict(hf_state, cfg)
    assert back.keys() == state.keys()
    for name in state:
        assert torch.equal(back[name], state[name]), name
    assert model_config_from_hf(hf_config_dict(cfg)) == cfg


def test_packed_documents_equal_separate_documents():
    cfg = ModelConfig.from_preset("debug")
    model = Mamba2LM(cfg).double()
    lengths = [5, 16, 19, 1, 23]  # boundaries inside chunks, on a chunk edge, a one-token document
    docs = [torch.randint(0, cfg.vocab_size, (1, n)) for n in lengths]
    packed = torch.cat(docs, dim=1)
    seq_idx = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    weights = torch.randn(1, packed.shape[1], cfg.vocab_size, dtype=torch.float64)

    logits = model(packed, seq_idx=seq_idx)
    packed_grads = torch.autograd.grad((logits * weights).sum(), list(model.parameters()))
    separate = [model(doc) for doc in docs]
    separate_loss = sum((out * w).sum() for out, w in zip(separate, weights.split(lengths, dim=1)))
    separate_grads = torch.autograd.grad(separate_loss, list(model.parameters()))

    torch.testing.assert_close(logits, torch.cat(separate, dim=1), rtol=1e-12, atol=1e-12)
    for (name, _), got, want in zip(model.named_parameters(), packed_grads, separate_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")
    # ... and without seq_idx the documents would leak into each other:
    assert not torch.allclose(model(packed), logits, atol=1e-3)


@pytest.mark.parametrize("blocks, recomputed", [(None, 3), (2, 2), (1, 1)])
def test_activation_checkpointing_gives_the_same_gradients(blocks, recomputed):
    """Per-block checkpointing (the add before each block, so one tensor kept per block) of every block or of the first
    few gives the gradients of no checkpointing, and backward really recomputes: each recomputed block's in_proj matmul
    once (recomputation stops before out_proj, whose output backward does not need)."""
    cfg = ModelConfig.from_preset("debug", ngroups=2, n_layer=3)
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    seq_idx = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])
    runs = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = Mamba2LM(cfg).double()
        if checkpointing:
            apply_activation_checkpointing(model, blocks)
            assert [layer.recompute for layer in model.layers] == [i < recomputed for i in range(cfg.n_layer)]
        loss = model(ids, seq_idx=seq_idx, labels=ids.roll(-1, 1)).sum()
        with Operators() as backward:
            runs.append((backward, torch.autograd.grad(loss, list(model.parameters()))))
    (plain, want), (checkpointed, got) = runs
    for (name, _), g, w in zip(model.named_parameters(), got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")
    projections = [run.calls[torch.ops.aten.mm] + run.calls[torch.ops.aten.addmm] for run in (plain, checkpointed)]
    assert projections[1] - projections[0] == recomputed


def test_init_follows_mamba_ssm():
    cfg = ModelConfig.from_preset("mamba2-130m", n_layer=4)
    model = Mamba2LM(cfg)
    mixer = model.layers[0].mixer
    dt = F.softplus(mixer.dt_bias)
    assert cfg.dt_init_floor <= dt.min() and dt.max() <= cfg.dt_max * 1.0001
    A = torch.exp(mixer.A_log)
    assert 1 <= A.min() and A.max() <= 16
    assert torch.equal(mixer.D, torch.ones(cfg.nheads))
    assert abs(model.embedding.weight.std().item() - cfg.init_std) < 1e-3
    # out_proj: kaiming-uniform bound 1/sqrt(fan_in), rescaled by 1/sqrt(n_layer)
    bound = 1 / cfg.d_inner**0.5 / cfg.n_layer**0.5
    assert mixer.out_proj.weight.abs().max() <= bound and mixer.out_proj.weight.abs().max() > 0.95 * bound
    bound_in = 1 / cfg.d_model**0.5
    assert 0.95 * bound_in < mixer.in_proj.weight["x"].abs().max() <= bound_in
    assert model.lm_head is None


@pytest.mark.parametrize("name, millions", [("mamba2-130m", 130), ("mamba2-370m", 370), ("mamba2-780m", 780), ("mamba2-1.3b", 1300), ("mamba2-2.7b", 2700)])
def test_published_presets_have_their_sizes(name, millions):
    cfg = ModelConfig.from_preset(name)
    one_layer = Mamba2LM(dataclasses.replace(cfg, n_layer=1))  # the same widths, built cheaply
    block = sum(p.numel() for p in one_layer.layers[0].parameters())
    total = cfg.vocab_size * cfg.d_model + cfg.n_layer * block + cfg.d_model  # tied head
    assert total / 1e6 == pytest.approx(millions, rel=0.04)


def test_bad_model_config_names_the_key():
    with pytest.raises(ValueError, match="model.ngroups = 3 must divide the number of heads 8"):
        ModelConfig.from_preset("debug", ngroups=3)
    with pytest.raises(ValueError, match="model.preset = 'mamba2-7b' is not one of"):
        ModelConfig.from_preset("mamba2-7b")
    with pytest.raises(ValueError, match="model.headdim = 100 must divide"):
        dataclasses.replace(ModelConfig(), headdim=100)


def test_parameter_names_are_those_checkpoints_hold():
    """Checkpoints and converted models address tensors by these names: they must not change."""
    cfg = ModelConfig.from_preset("debug", tie_embeddings=False, proj_bias=True)
    mixer = [f"in_proj.{kind}.{s}" for kind in ("weight", "bias") for s in ("z", "x", "B", "C", "dt")]
    mixer += [f"conv1d.{kind}.{s}" for kind in ("weight", "bias") for s in ("x", "B", "C")]
    mixer += ["dt_bias", "A_log", "D", "norm_weight", "out_proj.weight", "out_proj.bias"]
    layer = ["norm.weight", *(f"mixer.{name}" for name in mixer)]
    want = {"embedding.weight", "norm_f.weight", "lm_head.weight", *(f"layers.{i}.{name}" for i in range(2) for name in layer)}
    assert set(Mamba2LM(cfg).state_dict()) == want


@pytest.mark.parametrize("tp, heads, groups", [(1, 8, 4), (2, 4, 2), (4, 2, 1)])
def test_mamba_layout_gives_each_ranks_channels(tp, heads, groups):
    cfg = ModelConfig.from_preset("debug")  # d_inner 128 in 8 heads of 16, 4 groups, d_state 16
    layout = cfg.mamba_layout(tp)
    d_inner, bc = 128 // tp, 4 // tp * 16
    assert (layout.nheads, layout.ngroups, layout.d_inner, layout.group_size) == (heads, groups, d_inner, 32)
    assert layout.in_proj_segments == {"z": d_inner, "x": d_inner, "B": bc, "C": bc, "dt": heads}
    assert layout.conv_segments == {"x": d_inner, "B": bc, "C": bc}
    assert (layout.in_proj_width, layout.conv_channels) == (2 * d_inner + 2 * bc + heads, d_inner + 2 * bc)
    assert cfg.in_proj_width == 392

    zxbcdt = torch.arange(layout.in_proj_width).expand(2, 3, -1)
    z, xBC, dt = layout.split_in_proj(zxbcdt)
    assert (z[0, 0, 0], xBC[0, 0, 0], dt[0, 0, 0]) == (0, d_inner, 2 * d_inner + 2 * bc)
    x, B, C = layout.split_conv(xBC - d_inner)
    assert (x.shape, B.shape, C.shape) == ((2, 3, heads, 16), (2, 3, groups, 16), (2, 3, groups, 16))
    assert (x[0, 0, 1, 0], B[0, 0, 0, 0], C[0, 0, 0, 0]) == (16, d_inner, d_inner + bc)


class TwoLayerMLP(torch.nn.Module):
    """A layer kind of its own, one that keeps no state between calls (its empty state is None)."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext):
        super().__init__()
        self.up, self.down = torch.nn.Linear(cfg.d_model, 3 * cfg.d_model), torch.nn.Linear(3 * cfg.d_model, cfg.d_model)

    def forward(self, u, seq_idx=None, halo_seq_idx=None):
        return self.down(F.silu(self.up(u)))

    def empty_state(self, batch: int) -> None:
        return None


def test_a_new_layer_kind_is_one_registry_line(monkeypatch):
    cfg = ModelConfig.from_preset("debug-g1")
    assert cfg.layer_kinds == "MM" and all(isinstance(layer.mixer, Mamba2Mixer) for layer in Mamba2LM(cfg).layers)
    monkeypatch.setitem(MIXERS, "-", TwoLayerMLP)
    block = Block(cfg, ParallelContext(), "-").double()
    h, update = torch.randn(2, 5, cfg.d_model, dtype=torch.float64), torch.randn(2, 5, cfg.d_model, dtype=torch.float64)
    got_h, out, state = block(h, update)
    normed = (h + update) * torch.rsqrt((h + update).pow(2).mean(-1, keepdim=True) + cfg.norm_eps)
    torch.testing.assert_close(got_h, h + update)
    torch.testing.assert_close(out, block.mixer.down(F.silu(block.mixer.up(normed))))
    assert state is None
    assert sorted(block.state_dict()) == ["mixer.down.bias", "mixer.down.weight", "mixer.up.bias", "mixer.up.weight", "norm.weight"]


def test_every_parameter_declares_its_parallel_role():
    """The roles checkpoints, the gradient norm and the engines read: split with the heads, channels or
    vocabulary on dim 0, out_proj's input dim 1, norms whole; kept when a wrapper re-creates a parameter."""
    model = Mamba2LM(ModelConfig.from_preset("debug", n_layer=1, tie_embeddings=False))
    mixer = model.layers[0].mixer
    mixer.D = torch.nn.Parameter(mixer.D.detach().clone())  # as FSDP2 re-creates parameters
    split = {name: role.tp_dim for name, role in param_roles(model).items()}
    assert split == {"embedding.weight": 0, "layers.0.norm.weight": None, "layers.0.mixer.dt_bias": 0, "layers.0.mixer.A_log": 0,
                     "layers.0.mixer.D": 0, "layers.0.mixer.norm_weight": 0,
                     **{f"layers.0.mixer.in_proj.weight.{n}": 0 for n in ("z", "x", "B", "C", "dt")},
                     **{f"layers.0.mixer.conv1d.{kind}.{n}": 0 for kind in ("weight", "bias") for n in "xBC"},
                     "layers.0.mixer.out_proj.weight": 1, "norm_f.weight": None, "lm_head.weight": 0}
