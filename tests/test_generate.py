"""Generation through the model's forward with states, against the parallel forward without: prefill +
step give the logits of model(ids) at every position (float64), so do pieces of any length continuing
each other's states and blocks of a kind that keeps no state, greedy generation equals re-running the
whole sequence, the state stays the same size, sampling keeps to its settings, and tools/generate.py
runs on a run folder, a checkpoint and a transformers folder, naming what is missing."""

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from megassm.checkpoint import save_checkpoint, save_model_checkpoint
from megassm.config import Config, DataConfig
from megassm.data import load_tokenizer
from megassm.data.shards import TOKENIZER_DIR
from megassm.generate import generate, prefill, sample_next, step
from megassm.model import MIXERS, Block, KVCache, Mamba2LM, ModelConfig
from megassm.pretrained import save_transformers
from parallel import DDPEngine, ParallelContext
from tests.commands import load_tool, run_tool
from tests.test_model import TwoLayerMLP

CONFIGS = [
    ModelConfig.from_preset("debug"),  # 8 heads in 4 groups, tied head
    # Init draws dt log-uniformly in [0.001, 0.1]: most heads are clamped by this limit.
    ModelConfig.from_preset("debug-g1", dt_limit=(0.02, 0.05), tie_embeddings=False),
    ModelConfig.from_preset("debug-hybrid", chunk_size=8),  # KV caches and MLP blocks (no state) among the Mamba-2 states
]
CONFIG_IDS = ["ngroups4", "ngroups1-dt_limit-untied", "hybrid"]


def nontrivial(model: Mamba2LM) -> Mamba2LM:
    """D and the norm weights moved off their init values (1), so a wrong use of them shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("D", "norm_weight", "norm.weight")):
                p.add_(torch.randn_like(p) * 0.3)
    return model


def stepped_logits(model: Mamba2LM, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Logits at positions prompt_len - 1 ... end: prefill of the prompt, then one step per further token."""
    logits, states = prefill(model, ids[:, :prompt_len])
    found = [logits]
    for t in range(prompt_len, ids.shape[1]):
        logits, states = step(model, ids[:, t], states)
        found.append(logits)
    return torch.stack(found, dim=1)


def greedy_by_full_forward(model: Mamba2LM, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(new_tokens):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("prompt_len", [1, 2, 19], ids=lambda n: f"prompt{n}")  # 1, 2 < d_conv - 1; 19 > a chunk
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_prefill_and_steps_give_the_parallel_forward_logits(cfg, prompt_len):
    model = nontrivial(Mamba2LM(cfg).double())
    ids = torch.randint(0, cfg.vocab_size, (2, 2 * cfg.chunk_size + 3))
    with torch.no_grad():
        want = model(ids)[:, prompt_len - 1 :]
    assert torch.allclose(stepped_logits(model, ids, prompt_len), want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_pieces_continuing_each_others_states_give_the_parallel_forward_logits(cfg):
    """Each piece starts from the conv window and SSM state the one before left (pieces shorter than the
    window, one token, and longer than a chunk), and ends with the logits of its last token."""
    model = nontrivial(Mamba2LM(cfg).double())
    ids = torch.randint(0, cfg.vocab_size, (2, 3 * cfg.chunk_size + 10))
    with torch.no_grad():
        want = model(ids)
    lengths = [cfg.chunk_size + 3, 2, 1, cfg.chunk_size - 1, 5, cfg.chunk_size]
    assert sum(lengths) == ids.shape[1]
    states, end = model.empty_states(2), 0
    for piece in ids.split(lengths, dim=1):
        with torch.no_grad():
            logits, states = model(piece, states=states)
        end += piece.shape[1]
        assert torch.allclose(logits, want[:, end - 1], rtol=0, atol=1e-10), end


def test_a_hybrids_prompt_is_prefilled_in_pieces_with_the_same_logits_and_states(monkeypatch):
    """A prompt of 2.5 pieces: every attention block sees pieces of at most PREFILL_CHUNK_TOKENS queries, and the
    logits and states after it are those of the whole prompt at once."""
    import megassm.generate

    model = nontrivial(Mamba2LM(CONFIGS[2]).double())
    ids = torch.randint(0, CONFIGS[2].vocab_size, (2, 25))
    with torch.no_grad():
        whole_logits, whole_states = model(ids, states=model.empty_states(2))
    monkeypatch.setattr(megassm.generate, "PREFILL_CHUNK_TOKENS", 10)
    queries, attend = [], megassm.model.attention.causal_document_attention
    monkeypatch.setattr(megassm.model.attention, "causal_document_attention", lambda q, *args, **kwargs: queries.append(q.shape[2])
                        or attend(q, *args, **kwargs))
    logits, states = prefill(model, ids)
    assert queries and max(queries) == 10
    assert torch.allclose(logits, whole_logits, rtol=0, atol=1e-10)
    def tensors(state) -> list[torch.Tensor]:  # a cache's tokens (its buffers' capacities differ), a state's fields, none
        if isinstance(state, KVCache):
            return [state.k, state.v, state.seq_idx]
        return [getattr(state, f.name) for f in dataclasses.fields(state)] if dataclasses.is_dataclass(state) else []

    assert [type(s) for s in states] == [type(s) for s in whole_states]
    for got, want in zip(states, whole_states):
        for a, b in zip(tensors(got), tensors(want), strict=True):
            assert torch.allclose(a.double(), b.double(), rtol=0, atol=1e-10)


def test_generation_steps_through_a_kind_that_keeps_no_state(monkeypatch):
    cfg = dataclasses.replace(CONFIGS[0], n_layer=3)
    monkeypatch.setitem(MIXERS, "-", TwoLayerMLP)
    model = Mamba2LM(cfg)
    model.layers[1] = Block(cfg, model.ctx, "-")
    model = nontrivial(model.double())
    ids = torch.randint(0, cfg.vocab_size, (2, 25))
    with torch.no_grad():
        want = model(ids)[:, 9:]
    assert torch.allclose(stepped_logits(model, ids, 10), want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_greedy_generation_equals_argmax_of_full_forward(cfg):
    model = nontrivial(Mamba2LM(cfg).double())
    prompt = torch.randint(0, cfg.vocab_size, (2, 5))
    got = generate(model, prompt, 12, temperature=0)
    assert torch.equal(got, greedy_by_full_forward(model, prompt, 12))


def test_state_size_does_not_grow():
    model = Mamba2LM(CONFIGS[0])
    _, states = prefill(model, torch.randint(0, 512, (3, 4)))
    shapes = [(s.conv.shape, s.conv.dtype, s.ssm.shape, s.ssm.dtype) for s in states]
    for token in torch.randint(0, 512, (50, 3)):
        _, states = step(model, token, states)
    assert [(s.conv.shape, s.conv.dtype, s.ssm.shape, s.ssm.dtype) for s in states] == shapes
    _, long_prompt = prefill(model, torch.randint(0, 512, (3, 70)))
    assert [(s.conv.shape, s.conv.dtype, s.ssm.shape, s.ssm.dtype) for s in long_prompt] == shapes
    cfg = model.cfg
    assert shapes[0] == ((3, cfg.d_conv - 1, cfg.d_inner + 2 * cfg.ngroups * cfg.d_state), torch.float32,
                         (3, cfg.nheads, cfg.headdim, cfg.d_state), torch.float32)


def test_bf16_weights_follow_the_fp32_model():
    model = nontrivial(Mamba2LM(CONFIGS[0]))
    ids = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        want = model(ids)[:, 19:]
    got = stepped_logits(copy.deepcopy(model).to(torch.bfloat16), ids, 20)
    assert got.dtype == torch.bfloat16
    assert ((got.float() - want).abs().max() / want.abs().max()).item() < 3e-2


def test_eos_finishes_a_row_and_stops_when_all_are_finished():
    model = Mamba2LM(CONFIGS[0])
    prompt = torch.randint(0, 512, (2, 3))
    free = generate(model, prompt, 10, temperature=0)[:, 3:]
    eos = free[0, 2].item()
    ends = [row.tolist().index(eos) if eos in row else None for row in free]
    got = generate(model, prompt, 10, temperature=0, eos_id=eos)[:, 3:]
    length = 10 if None in ends else max(ends) + 1
    assert got.shape == (2, length)
    for row, end in enumerate(ends):
        want = free[row, :length].clone()
        if end is not None:
            want[end:] = eos
        assert torch.equal(got[row], want)


def test_sampling_keeps_to_its_settings():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0]]).expand(4000, 6)
    draw = torch.Generator().manual_seed(1)
    assert torch.equal(sample_next(logits, temperature=0), torch.full((4000,), 5))
    assert set(sample_next(logits, 1.0, top_k=3, generator=draw).tolist()) == {5, 0, 1}
    probs = logits[0].softmax(-1)  # 0.61, 0.22, 0.08, ...: top_p = 0.8 needs the two most likely
    assert probs[5] < 0.8 < probs[5] + probs[0]
    assert set(sample_next(logits, 1.0, top_p=0.8, generator=draw).tolist()) == {5, 0}
    counts = torch.bincount(sample_next(logits, 1.0, generator=draw), minlength=6) / 4000
    assert torch.allclose(counts, probs, atol=0.03)
    again = [sample_next(logits, 0.7, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(*again)
    assert torch.equal(sample_next(logits, 1e-39, generator=draw), torch.full((4000,), 5))  # logits / T past fp32's range
    with pytest.raises(ValueError, match="top_p"):
        generate(Mamba2LM(CONFIGS[1]), torch.zeros(1, 2, dtype=torch.long), 3, top_p=0)


def test_vocab_size_limits_the_sampled_ids():
    model = Mamba2LM(CONFIGS[1])
    got = generate(model, torch.zeros(4, 2, dtype=torch.long), 20, temperature=1.0, vocab_size=7)
    assert got[:, 2:].max() < 7


# ---------------------------------------------------------------------------------------------- the command line


def trained_checkpoint(run_dir: Path, step_number: int, model: Mamba2LM, data_path: Path) -> Path:
    """The checkpoint a run on `data_path` writes, by megassm.checkpoint itself."""
    cfg = Config(model=model.cfg, data=DataConfig(path=str(data_path)))
    engine = DDPEngine(model, ParallelContext(), [{"params": list(model.parameters())}], lr=0.0)
    return save_checkpoint(run_dir, cfg, model, engine, ParallelContext(), {"step": step_number, "samples": 0, "skipped_steps": 0})


def greedy_text(model: Mamba2LM, tokenizer, prompt: str, new_tokens: int) -> str:
    """What the command line should print: the greedy continuation of [eos] + prompt, up to the next eos."""
    ids = torch.tensor([[tokenizer.eos_id, *tokenizer.encode(prompt)]])
    new = generate(model, ids, new_tokens, temperature=0, eos_id=tokenizer.eos_id)[0, ids.shape[1] :].tolist()
    return tokenizer.decode(new[: new.index(tokenizer.eos_id)] if tokenizer.eos_id in new else new)


def test_command_line_continues_a_prompt(tmp_path, prepared_data, capsys):
    tool = load_tool("generate.py")
    tokenizer = load_tokenizer(prepared_data / TOKENIZER_DIR)
    old, new = Mamba2LM(CONFIGS[0]), Mamba2LM(CONFIGS[0])
    trained_checkpoint(tmp_path / "run", 1, old, prepared_data)
    trained_checkpoint(tmp_path / "run", 2, new, prepared_data)
    want = greedy_text(new, tokenizer, "def fibonacci(", 15)
    assert want and want != greedy_text(old, tokenizer, "def fibonacci(", 15)

    greedy = ["--prompt", "def fibonacci(", "--max-new-tokens", "15", "--temperature", "0"]
    tool.main([str(tmp_path / "run"), *greedy])  # a run folder: its newest checkpoint, the tokenizer of its data
    assert capsys.readouterr().out == want + "\n"
    save_transformers(new.cfg, new.state_dict(), tmp_path / "hf")  # a published format, its tokenizer given
    tool.main([str(tmp_path / "hf"), *greedy, "--tokenizer", str(prepared_data / TOKENIZER_DIR)])
    assert capsys.readouterr().out == want + "\n"

    sampled = [str(tmp_path / "run" / "checkpoints" / "step_1"), "--prompt", "x = ", "--max-new-tokens", "8", "--temperature", "0.8",
               "--top-k", "50", "--top-p", "0.9", "--seed", "3"]
    done = run_tool("generate.py", *sampled, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    tool.main(sampled)
    assert capsys.readouterr().out == done.stdout  # the seed fixes the sample


def test_command_line_names_what_is_missing(tmp_path, prepared_data, capsys):
    tool = load_tool("generate.py")
    model = Mamba2LM(CONFIGS[1])
    save_model_checkpoint(model.cfg, model.state_dict(), tmp_path / "converted")  # model.toml, no run config
    given = ["--tokenizer", str(prepared_data / TOKENIZER_DIR)]
    cases = [
        ([str(tmp_path / "missing"), *given], f"{tmp_path / 'missing'}: no such folder"),
        ([str(tmp_path / "converted")], f"{tmp_path / 'converted' / 'config.toml'} not found, which names the run's data "
                                        "and so its tokenizer; or give the model's tokenizer with --tokenizer"),
        ([str(tmp_path / "converted"), "--tokenizer", str(tmp_path / "missing.model")],
         f"tokenizer {tmp_path / 'missing.model'}: no such file or folder; make one with python tools/train_tokenizer.py "
         "--input CORPUS --vocab-size N --out DIR"),
        ([str(tmp_path / "converted"), *given, "--top-p", "0"], "top_p must be in (0, 1] (1: off), got 0.0"),
        ([str(tmp_path / "converted"), *given, "--temperature", "inf"], "temperature must be 0 (greedy) or a positive number, got inf"),
        ([str(tmp_path / "converted"), *given, "--max-new-tokens", "-1"], "max_new_tokens must be 0 or more, got -1"),
        ([str(tmp_path / "converted"), *given, "--device", "foo"], "--device foo: give cpu, cuda or cuda:N"),
        ([str(tmp_path / "converted"), *given, "--device", "meta"], "--device meta: give cpu, cuda or cuda:N"),
        ([str(tmp_path / "converted"), *given, "--seed", str(2**64)], f"--seed must be within [-2^63, 2^64), got {2**64}"),
        ([str(tmp_path / "converted"), *given, "--prompt", b"caf\xe9".decode(errors="surrogateescape")],  # as Python reads such argv
         "--prompt caf\\udce9 is not UTF-8 text: give the prompt in UTF-8"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as stopped:
            tool.main(args)
        assert (stopped.value.code, capsys.readouterr().err) == (2, f"generate.py: error: {message}\n")  # as the trainer's


def test_a_damaged_newest_checkpoint_is_skipped_and_named(tmp_path, prepared_data, capsys):
    """As when the trainer resumes: a run folder gives its newest checkpoint whose files are all there."""
    tool = load_tool("generate.py")
    tokenizer = load_tokenizer(prepared_data / TOKENIZER_DIR)
    old, new = Mamba2LM(CONFIGS[0]), Mamba2LM(CONFIGS[0])
    trained_checkpoint(tmp_path / "run", 1, old, prepared_data)
    damaged = trained_checkpoint(tmp_path / "run", 2, new, prepared_data)
    shard = damaged / "__0_0.distcp"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    greedy = ["--prompt", "def fibonacci(", "--max-new-tokens", "15", "--temperature", "0"]
    tool.main([str(tmp_path / "run"), *greedy])
    out, err = capsys.readouterr()
    assert out == greedy_text(old, tokenizer, "def fibonacci(", 15) + "\n"
    cut = f"{shard} is cut short ({size // 2} of {size} bytes)"
    assert err.splitlines()[0] == f"warning: skipping damaged checkpoint {damaged}: {cut}"
    with pytest.raises(SystemExit) as stopped:
        tool.main([str(damaged), *greedy])
    assert stopped.value.code == 2
    assert capsys.readouterr().err == f"generate.py: error: checkpoint {damaged} is damaged: {cut}; use an earlier one " \
                                      "(checkpoints/step_N), or the run folder for its newest complete one\n"
