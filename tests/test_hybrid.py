"""Hybrid models (Mamba-2, attention and MLP blocks): attention against a naive float64 reference, the hybrid
LM on every parallel layout against one process, generation through packed documents, and config errors that
name the key."""

import dataclasses
import itertools
import math

import pytest
import torch

from megassm.hf import hf_config_dict, mamba_ssm_config_dict
from megassm.model import MIXERS, Attention, KVCache, Mamba2LM, ModelConfig
from megassm.model.config import LAYER_KINDS
from megassm.ops.attention import causal_document_attention, shared_block_masks
from tests.distributed import run_distributed
from tests.test_generate import nontrivial
from tests.test_parallel import check_layout, count_mixer_collectives

HYBRID = ModelConfig.from_preset("debug-hybrid", chunk_size=8)  # "M-M*-M*-"; 44-token rows = 5.5 chunks


def test_the_pattern_symbols_are_the_registrys():
    assert set(MIXERS) == set(LAYER_KINDS)
    assert [type(layer.mixer).__name__ for layer in Mamba2LM(HYBRID).layers] == \
           ["Mamba2Mixer", "MLP", "Mamba2Mixer", "Attention", "MLP", "Mamba2Mixer", "Attention", "MLP"]


def rotated(x: torch.Tensor, rope_dim: int, theta: float) -> torch.Tensor:
    """RoPE by its formula: channel pairs (i, i + rope_dim/2) of the token at position p turned by p * theta^(-2i/rope_dim)."""
    half = rope_dim // 2
    angle = torch.arange(x.shape[1], dtype=torch.float64)[:, None] * theta ** (-2 * torch.arange(half, dtype=torch.float64) / rope_dim)
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]  # (l, 1, half): the same for every head
    first, second = x[..., :half], x[..., half:rope_dim]
    return torch.cat([first * cos - second * sin, second * cos + first * sin, x[..., rope_dim:]], dim=-1)


def naive_attention(mixer: Attention, u: torch.Tensor, seq_idx: torch.Tensor) -> torch.Tensor:
    """Per row, head and query: a softmax over the earlier keys of its own document, one at a time."""
    cfg, weight = mixer.cfg, mixer.qkv_proj.weight
    q, k, v = ((u @ weight[name].T).unflatten(-1, (-1, cfg.attn_head_dim)) for name in "qkv")  # (b, l, heads, head_dim)
    q, k = rotated(q, cfg.rope_dim, cfg.rope_theta), rotated(k, cfg.rope_dim, cfg.rope_theta)
    out = torch.zeros_like(q)
    group = cfg.attn_heads // cfg.attn_kv_heads
    for b, i, h in itertools.product(*map(range, q.shape[:3])):
        keys = [j for j in range(i + 1) if seq_idx[b, j] == seq_idx[b, i]]
        scores = torch.stack([q[b, i, h] @ k[b, j, h // group] for j in keys]) / math.sqrt(cfg.attn_head_dim)
        out[b, i, h] = sum(p * v[b, j, h // group] for p, j in zip(scores.softmax(0), keys))
    return out.flatten(2) @ mixer.o_proj.weight.T


ATTENTION = ModelConfig(d_model=32, n_layer=1, vocab_size=16, pattern="*", attn_heads=4, attn_kv_heads=2, attn_head_dim=8)


@pytest.mark.parametrize("cfg", [
    dataclasses.replace(ATTENTION, rope_fraction=0.5),
    dataclasses.replace(ATTENTION, attn_kv_heads=4, rope_theta=50.0),
    dataclasses.replace(ATTENTION, attn_kv_heads=1, rope=False),
], ids=["gqa-partial-rope", "mha-rope", "mqa-no-rope"])
def test_attention_matches_a_naive_reference(cfg):
    mixer = Attention(cfg).double()
    u = torch.randn(2, 13, cfg.d_model, dtype=torch.float64)
    seq_idx = torch.tensor([[0] * 4 + [1] * 8 + [2], [3] * 13])  # several documents, a one-token one; one document
    torch.testing.assert_close(mixer(u, seq_idx), naive_attention(mixer, u, seq_idx), rtol=1e-12, atol=1e-12)
    with torch.autocast("cpu", torch.bfloat16):
        low = mixer.float()(u.float(), seq_idx)
    assert low.dtype == torch.bfloat16
    want = naive_attention(mixer.double(), u, seq_idx)
    assert ((low.double() - want).abs().max() / want.abs().max()).item() < 3e-2


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_masks_as_the_reference():
    """The CUDA path's block mask (flex_attention, eager here: forward only on CPU) against the reference: grouped-query
    heads, queries after earlier keys (a CP rank's, a KV cache's), documents running through both."""
    q, k, v = torch.randn(2, 4, 40, 16), torch.randn(2, 2, 56, 16), torch.randn(2, 2, 56, 16)
    q_seq_idx = torch.tensor([[0] * 10 + [1] * 30, [2] * 40])
    k_seq_idx = torch.cat([torch.tensor([[0] * 16, [1] * 16]), q_seq_idx], dim=1)
    for ids in ((q_seq_idx, k_seq_idx), (None, None)):
        want = causal_document_attention(q, k, v, *ids)
        torch.testing.assert_close(causal_document_attention(q, k, v, *ids, flex=True), want, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_block_mask_built_once_per_scope(monkeypatch):
    """Within shared_block_masks() a second call over the same document ids reuses the first's block mask; other ids,
    other lengths or a new scope build their own, and every call still equals the reference."""
    import torch.nn.attention.flex_attention as flex

    built = []
    create = flex.create_block_mask
    monkeypatch.setattr(flex, "create_block_mask", lambda *args, **kwargs: built.append(args[3:5]) or create(*args, **kwargs))
    q, k, v = torch.randn(2, 2, 24, 8), torch.randn(2, 2, 24, 8), torch.randn(2, 2, 24, 8)
    ids, other = torch.tensor([[0] * 5 + [1] * 19, [2] * 24]), torch.tensor([[0] * 12 + [1] * 12, [0] * 24])
    with shared_block_masks():
        for seq_idx in (ids, ids, other, ids):
            got = causal_document_attention(q, k, v, seq_idx, seq_idx, flex=True)
            torch.testing.assert_close(got, causal_document_attention(q, k, v, seq_idx, seq_idx), rtol=1e-5, atol=1e-6)
        causal_document_attention(q[:, :, 8:], k, v, ids[:, 8:], ids, flex=True)
    assert built == [(24, 24), (24, 24), (16, 24)]
    with shared_block_masks():
        causal_document_attention(q, k, v, ids, ids, flex=True)
    assert len(built) == 4


# (model, tp, cp, dp, sequence_parallel); cp4: slices of 11 tokens, not whole chunks of 8
HYBRID_LAYOUTS = [(HYBRID, 4, 1, 1, False), (HYBRID, 2, 2, 1, False), (HYBRID, 2, 1, 2, True), (HYBRID, 1, 2, 2, False),
                  (HYBRID, 1, 4, 1, False), (dataclasses.replace(HYBRID, attn_kv_heads=1), 2, 2, 1, True)]


def layouts_and_collectives() -> None:
    """In one group of 4 processes: tp4 (key/value heads replicated), tp2 x cp2, dp2 x tp2 with SP, dp2 x cp2, cp4, tp2 x cp2
    with SP and one key/value head (replicated) against one process; the attention and MLP mixers' collectives.
    (tests/test_train.py resumes a hybrid's checkpoint on another layout.)"""
    for layout in HYBRID_LAYOUTS:
        check_layout(*layout, torch.float32)
    for kind in "*-":
        for sequence_parallel in (False, True):
            count_mixer_collectives(sequence_parallel, HYBRID, kind)


def test_blocks_in_groups_as_in_one_pass():
    """CUDA graphs run the blocks in groups of layers, each group from the previous one's (h, update)
    (megassm/model/cuda_graphs.py): the same outputs and gradients as one pass over all blocks."""
    torch.manual_seed(0)
    model = nontrivial(Mamba2LM(HYBRID).double())
    h = torch.randn(2, 44, HYBRID.d_model, dtype=torch.float64, requires_grad=True)
    seq_idx = torch.tensor([[0] * 20 + [1] * 24, [0] * 44])
    weights = [torch.randn_like(h) for _ in range(2)]
    wrt = [h, *model.layers.parameters()]

    def outputs_and_grads(groups: list[slice]) -> list[torch.Tensor]:
        out, update = h, None
        for layers in groups:
            out, update, _ = model.run_blocks(out, seq_idx, update=update, layers=layers)
        loss = sum((o * w).sum() for o, w in zip((out, update), weights))
        return [out, update, *torch.autograd.grad(loss, wrt)]

    want = outputs_and_grads([slice(None)])
    got = outputs_and_grads([slice(0, 3), slice(3, 4), slice(4, None)])  # across an MLP, attention and Mamba-2 block
    for name, g, w in zip(["h", "update", "d h", *(n for n, _ in model.layers.named_parameters())], got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_hybrid_layouts_match_one_process():
    run_distributed(layouts_and_collectives, 4)


def test_generation_continues_packed_documents():
    """A prompt of two documents, then one token at a time: each step's logits are those of the parallel forward
    over the whole sequence, the new tokens continuing the prompt's last document (in the KV cache as in the Mamba-2
    state). The second row's last document starts 2 tokens before the prompt ends: within the conv's window."""
    model = nontrivial(Mamba2LM(HYBRID).double())
    ids = torch.randint(0, HYBRID.vocab_size, (2, 30))
    seq_idx = torch.tensor([[0] * 7 + [1] * 23, [4] * 18 + [5] * 12])
    with torch.no_grad():
        want = model(ids, seq_idx)
        logits, states = model(ids[:, :20], seq_idx[:, :20], states=model.empty_states(2))
        got = [logits]
        for t in range(20, 30):
            logits, states = model(ids[:, t : t + 1], states=states)
            got.append(logits)
    torch.testing.assert_close(torch.stack(got, dim=1), want[:, 19:], rtol=0, atol=1e-10)
    kinds = [None if state is None else type(state).__name__ for state in states]
    assert kinds == ["Mamba2State", None, "Mamba2State", "KVCache", None, "Mamba2State", "KVCache", None]  # "M-M*-M*-"


@pytest.mark.parametrize("changes, message", [
    ({"n_layer": 7}, r"model.pattern has 8 symbols but model.n_layer = 7: give one symbol per block, or set model.n_layer"),
    ({"pattern": "M-M*-MEx"}, r"model.pattern = 'M-M\*-MEx' has unknown symbols 'E', 'x'; the symbols are 'M' Mamba-2, '\*' attention"),
    ({"attn_kv_heads": 3}, r"model.attn_kv_heads = 3 must divide model.attn_heads = 4"),
    ({"rope_fraction": 0.1875}, r"model.rope_fraction = 0.1875 must be in \(0, 1\] and rotate an even number of the "
                                r"model.attn_head_dim = 16 channels, got 3"),
    ({"attn_head_dim": 0}, r"model.attn_head_dim must be a positive integer, got 0"),
    ({"mlp_hidden": 0}, r"model.mlp_hidden must be a positive integer when model.pattern has MLP blocks"),
    ({"mlp_activation": "gelu"}, r"model.mlp_activation = 'gelu': choose one of swiglu, relu2"),
])
def test_config_errors_name_the_key(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(HYBRID, **changes)


def test_mamba2_formats_refuse_a_hybrid():
    for export in (hf_config_dict, mamba_ssm_config_dict):
        with pytest.raises(ValueError, match=r"model.pattern = 'M-M\*-M\*-' has attention or MLP blocks: the transformers Mamba2"):
            export(HYBRID)


def test_unused_keys_are_not_checked_and_tp_checks_the_blocks_used():
    dataclasses.replace(HYBRID, pattern="MMMMMMMM", mlp_hidden=0, attn_kv_heads=3)  # no attention, no MLP
    for changes, tp, message in [
        ({"pattern": "*-*-*-*-"}, 8, r"parallel.tp = 8 must divide the model's 4 attention heads \(model.attn_heads\)"),
        ({"attn_heads": 6, "attn_kv_heads": 3}, 2, r"parallel.tp = 2 must divide the model's 3 key/value heads \(model.attn_kv_heads\) "
                                                   r"or be a multiple of them"),
        ({"mlp_hidden": 66}, 4, r"parallel.tp = 4 must divide the model's 66 MLP channels \(model.mlp_hidden\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(HYBRID, **changes).check_tensor_parallel(tp)
    dataclasses.replace(HYBRID, attn_kv_heads=1).check_tensor_parallel(4)  # one key/value head, replicated


def test_the_kv_cache_appends_in_place_and_grows_geometrically():
    """A prompt of two documents then 100 tokens one at a time: the cache holds what torch.cat of every token's keys,
    values and document ids would, in the keys' dtype, from 10 buffers at most (each half as large again), not one per
    token."""
    empty = torch.zeros(2, 3, 0, 4)
    cache = KVCache(empty, empty.clone(), torch.zeros(2, 0, dtype=torch.long))
    prompt_ids = torch.tensor([[3, 3, 4, 4, 4], [7, 7, 7, 7, 8]])
    keys, values, ids, buffers = [], [], [prompt_ids - prompt_ids[:, :1]], set()
    for step in range(101):
        length = 5 if step == 0 else 1
        k, v = torch.randn(2, 3, length, 4, dtype=torch.bfloat16), torch.randn(2, 3, length, 4, dtype=torch.bfloat16)
        cache = cache.extend(k, v, prompt_ids if step == 0 else None)
        keys, values = keys + [k], values + [v]
        ids += [] if step == 0 else [ids[-1][:, -1:]]
        buffers.add(cache.k_buffer.data_ptr())
    assert cache.length == 105 and cache.k.dtype == torch.bfloat16
    assert torch.equal(cache.k, torch.cat(keys, dim=2)) and torch.equal(cache.v, torch.cat(values, dim=2))
    assert torch.equal(cache.seq_idx, torch.cat(ids, dim=1)) and cache.seq_idx[:, -1].tolist() == [1, 1]
    assert len(buffers) <= 10


def test_two_continuations_of_one_kv_cache_keep_their_own_tokens():
    empty = torch.zeros(1, 1, 0, 2)
    cache = KVCache(empty, empty.clone(), torch.zeros(1, 0, dtype=torch.long)).extend(torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2), None)
    first = cache.extend(torch.full((1, 1, 1, 2), 2.0), torch.full((1, 1, 1, 2), 2.0), None)
    second = cache.extend(torch.full((1, 1, 1, 2), 3.0), torch.full((1, 1, 1, 2), 3.0), None)
    first = first.extend(torch.full((1, 1, 1, 2), 4.0), torch.full((1, 1, 1, 2), 4.0), None)
    assert first.k[0, 0, :, 0].tolist() == [1, 1, 1, 2, 4] and second.k[0, 0, :, 0].tolist() == [1, 1, 1, 3]
    assert second.v[0, 0, :, 1].tolist() == [1, 1, 1, 3] and cache.k[0, 0, :, 0].tolist() == [1, 1, 1]
