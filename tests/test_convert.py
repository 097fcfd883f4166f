"""Checkpoint conversion: a trained checkpoint exported to transformers gives the same logits there and
generates text with its converted tokenizer; every format round-trips bit-exactly; the mamba-ssm files
match mamba-ssm's layout as its source builds it; the command line and its errors."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, pipeline

from megassm.checkpoint import load_checkpoint, save_checkpoint, save_model_checkpoint
from megassm.config import Config, DataConfig, load_config
from megassm.data import load_tokenizer
from megassm.model import Mamba2LM, ModelConfig
from megassm.pretrained import PretrainedError, load_pretrained, save_mamba_ssm, save_transformers
from parallel import DDPEngine, ParallelContext
from tests.commands import load_tool, run_tool, user_error
from tests.test_hybrid_hf import BAMBA
from tests.test_model import relative_error


tool = load_tool("convert_checkpoint.py")


def perturbed_model(cfg: ModelConfig) -> Mamba2LM:
    """A model whose D and norm weights are not their init values, so that a wrong mapping shows."""
    model = Mamba2LM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("D", "norm_weight", "norm.weight")):
                p.add_(torch.randn_like(p) * 0.3)
    return model


def engine_for(model: Mamba2LM) -> DDPEngine:
    """The trainer's data-parallel engine (with its AdamW) on one process."""
    return DDPEngine(model, ParallelContext(), [{"params": list(model.parameters())}], lr=0.0)


def trained_checkpoint(run_dir: Path, model: Mamba2LM, data_path: Path, step: int = 7, cfg: Config | None = None) -> Path:
    """The checkpoint a run on `data_path` (or with the config `cfg`) writes, by megassm.checkpoint itself."""
    cfg = cfg or Config(model=model.cfg, data=DataConfig(path=str(data_path)))
    state = {"step": step, "samples": 8 * step, "skipped_steps": 0}
    return save_checkpoint(run_dir, cfg, model, engine_for(model), ParallelContext(), state)


# ---------------------------------------------------------------------------------------------- against transformers


@pytest.mark.parametrize("cfg", [ModelConfig.from_preset("debug-g1", vocab_size=512), ModelConfig.from_preset("debug", ngroups=2)],
                         ids=["ngroups1", "ngroups2"])
def test_exported_checkpoint_runs_in_transformers(cfg, prepared_data, tmp_path):
    model = perturbed_model(cfg)
    checkpoint = trained_checkpoint(tmp_path / "run", model, prepared_data)
    out = tmp_path / "hf"
    tool.main(["to-hf", str(tmp_path / "run"), str(out)])  # a run folder: its newest checkpoint

    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert "lm_head.weight" not in load_file(out / "model.safetensors")  # tied: transformers ties it on load
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 3 * cfg.chunk_size + 5))
    with torch.no_grad():
        assert relative_error(model(ids), hf(ids, use_cache=False).logits) < 1e-5

    sentencepiece = load_tokenizer(prepared_data / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = "def main():\n    print('hello')  # 42\n"
    eos = sentencepiece.eos_id
    assert tokenizer(text)["input_ids"] == [eos, *sentencepiece.encode(text)]  # as training saw each document
    assert tokenizer("print('</s>')")["input_ids"] == [eos, *sentencepiece.encode("print('</s>')")]  # a name read as text
    assert (hf.config.bos_token_id, hf.config.eos_token_id, hf.config.pad_token_id) == (eos, eos, None)
    if cfg.ngroups == 1:
        generated = pipeline("text-generation", model=str(out), tokenizer=str(out))("import os", max_new_tokens=8, do_sample=False)
        assert generated[0]["generated_text"].startswith("import os") and len(generated[0]["generated_text"]) > len("import os")
        greedy = torch.tensor([sentencepiece.encode("import os")])
        with torch.no_grad():  # transformers' cached decoding picks the tokens our full forward does
            for _ in range(8):
                greedy = torch.cat([greedy, model(greedy)[:, -1:].argmax(-1)], dim=1)
        assert torch.equal(hf.generate(greedy[:, :-8], max_new_tokens=8, do_sample=False), greedy)
        prompt = tokenizer("import os", return_tensors="pt")["input_ids"]  # the eos first, as tools/generate.py does
        megassm_greedy = prompt
        with torch.no_grad():
            for _ in range(8):
                megassm_greedy = torch.cat([megassm_greedy, model(megassm_greedy)[:, -1:].argmax(-1)], dim=1)
        assert torch.equal(hf.generate(prompt, max_new_tokens=8, do_sample=False), megassm_greedy)
    _, state = load_pretrained(checkpoint)  # what the trainer wrote reads back whole
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())


# ---------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("cfg", [ModelConfig.from_preset("debug"),
                                 ModelConfig.from_preset("debug-g1", tie_embeddings=False, proj_bias=True, conv_bias=False, dt_limit=(0.0, 0.5))],
                         ids=["tied", "untied-biases"])
@pytest.mark.parametrize("save", [save_model_checkpoint, save_transformers, save_mamba_ssm], ids=["megassm", "transformers", "mamba-ssm"])
def test_round_trip_is_bit_exact(cfg, save, tmp_path):
    state = perturbed_model(cfg).state_dict()
    save(cfg, state, tmp_path)
    cfg_back, state_back = load_pretrained(tmp_path)
    assert cfg_back == cfg
    assert state_back.keys() == state.keys()
    for name in state:
        assert torch.equal(state_back[name], state[name]), name


@pytest.mark.parametrize("dt_limit", [(0.0, math.inf), (0.0, 0.5)])
def test_an_export_says_what_transformers_generation_leaves_out(dt_limit, prepared_data, tmp_path, capsys):
    cfg = ModelConfig.from_preset("debug-g1", vocab_size=512, dt_limit=dt_limit)
    trained_checkpoint(tmp_path / "run", perturbed_model(cfg), prepared_data)
    tool.main(["to-hf", str(tmp_path / "run"), str(tmp_path / "hf")])
    note = "note: transformers' cached generation leaves out time_step_limit = [0.0, 0.5] (its full forward applies it)"
    assert (note in capsys.readouterr().out) == (dt_limit != (0.0, math.inf))


def test_bf16_export_is_bf16(tmp_path):
    cfg = ModelConfig.from_preset("debug-g1")
    state = Mamba2LM(cfg).state_dict()
    save_transformers(cfg, state, tmp_path, torch.bfloat16)
    assert {t.dtype for t in load_file(tmp_path / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    modes = {file.name: file.stat().st_mode & 0o777 for file in tmp_path.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes  # readable by others as the umask lets them
    assert torch.equal(load_pretrained(tmp_path)[1]["embedding.weight"], state["embedding.weight"].bfloat16().float())


# ---------------------------------------------------------------------------------------------- mamba-ssm's layout


def mamba_ssm_reference(d_model, n_layer, vocab, d_state, headdim, ngroups, d_conv, expand=2) -> dict[str, tuple]:
    """Names and shapes of MambaLMHeadModel(MambaConfig(ssm_cfg={"layer": "Mamba2", ...})).state_dict() as
    mamba_ssm/models/mixer_seq_simple.py and mamba_ssm/modules/mamba2.py build it: d_intermediate = 0 (no MLP,
    no norm2), in_proj over [z, x, B, C, dt] without bias, a depthwise Conv1d over [x, B, C] with bias, the gated
    RMSNorm `norm`, lm_head.weight listed even when tied to the embedding."""
    d_inner = expand * d_model
    nheads, conv_dim = d_inner // headdim, d_inner + 2 * ngroups * d_state
    shapes = {"backbone.embedding.weight": (vocab, d_model), "backbone.norm_f.weight": (d_model,), "lm_head.weight": (vocab, d_model)}
    for i in range(n_layer):
        layer = f"backbone.layers.{i}."
        shapes |= {layer + "norm.weight": (d_model,), layer + "mixer.in_proj.weight": (2 * d_inner + 2 * ngroups * d_state + nheads, d_model),
                   layer + "mixer.conv1d.weight": (conv_dim, 1, d_conv), layer + "mixer.conv1d.bias": (conv_dim,),
                   layer + "mixer.dt_bias": (nheads,), layer + "mixer.A_log": (nheads,), layer + "mixer.D": (nheads,),
                   layer + "mixer.norm.weight": (d_inner,), layer + "mixer.out_proj.weight": (d_model, d_inner)}
    return shapes


MAMBA_CONFIG_FIELDS = {"d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx", "attn_cfg", "rms_norm",
                       "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings"}  # mamba_ssm's MambaConfig
MAMBA2_ARGUMENTS = {"d_state", "d_conv", "conv_init", "expand", "headdim", "d_ssm", "ngroups", "A_init_range", "D_has_hdim", "rmsnorm",
                    "norm_before_gate", "dt_min", "dt_max", "dt_init_floor", "dt_limit", "bias", "conv_bias", "chunk_size", "use_mem_eff_path"}


def test_mamba_ssm_export_has_its_names_shapes_and_config(tmp_path):
    cfg = ModelConfig.from_preset("debug")  # ngroups 4, d_state 16, headdim 16, chunk_size 16
    state = Mamba2LM(cfg).state_dict()
    save_mamba_ssm(cfg, state, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    weights = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)

    assert config.keys() == MAMBA_CONFIG_FIELDS  # MambaConfig(**config) accepts nothing else
    ssm_cfg = dict(config["ssm_cfg"])
    assert ssm_cfg.pop("layer") == "Mamba2" and ssm_cfg.keys() <= MAMBA2_ARGUMENTS
    assert ssm_cfg == {"d_state": 16, "headdim": 16, "ngroups": 4, "chunk_size": 16}  # the rest: Mamba2's defaults
    padded = -(-config["vocab_size"] // config["pad_vocab_size_multiple"]) * config["pad_vocab_size_multiple"]
    reference = mamba_ssm_reference(64, 2, padded, d_state=16, headdim=16, ngroups=4, d_conv=4)
    assert {name: tuple(t.shape) for name, t in weights.items()} == reference
    assert torch.equal(weights["lm_head.weight"], weights["backbone.embedding.weight"]) and config["tie_embeddings"]


def test_published_mamba_ssm_folder_loads_into_the_right_segments(tmp_path, capsys):
    """A folder in the published style: unpadded vocab_size, only non-default ssm_cfg keys, tensors by the reference."""
    config = {"d_model": 32, "d_intermediate": 0, "n_layer": 2, "vocab_size": 250, "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 8},
              "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
              "pad_vocab_size_multiple": 16, "tie_embeddings": True}
    weights = {name: torch.randn(shape) for name, shape in mamba_ssm_reference(32, 2, 256, d_state=8, headdim=8, ngroups=1, d_conv=4).items()}
    weights["lm_head.weight"] = weights["backbone.embedding.weight"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.save(weights, tmp_path / "pytorch_model.bin")

    cfg, state = load_pretrained(tmp_path)
    assert (cfg.vocab_size, cfg.d_state, cfg.headdim, cfg.ngroups, cfg.chunk_size, cfg.tie_embeddings) == (256, 8, 8, 1, 256, True)
    in_proj, conv = weights["backbone.layers.1.mixer.in_proj.weight"], weights["backbone.layers.1.mixer.conv1d.weight"]
    d_inner, gn = 64, 8
    assert torch.equal(state["layers.1.mixer.in_proj.weight.z"], in_proj[:d_inner])
    assert torch.equal(state["layers.1.mixer.in_proj.weight.C"], in_proj[2 * d_inner + gn : 2 * d_inner + 2 * gn])
    assert torch.equal(state["layers.1.mixer.in_proj.weight.dt"], in_proj[-cfg.nheads :])
    assert torch.equal(state["layers.1.mixer.conv1d.weight.B"], conv[d_inner : d_inner + gn, 0])
    assert torch.equal(state["layers.1.mixer.norm_weight"], weights["backbone.layers.1.mixer.norm.weight"])
    assert "lm_head.weight" not in state and Mamba2LM(cfg).load_state_dict(state) is not None


# ---------------------------------------------------------------------------------------------- errors


def test_unreadable_folders_fail_with_their_name(tmp_path):
    cfg = ModelConfig.from_preset("debug-g1")
    hf = tmp_path / "hf"
    save_transformers(cfg, Mamba2LM(cfg).state_dict(), hf)
    with pytest.raises(PretrainedError, match=f"{hf} does not fit the configured model; it has d_model 32 \\(configured: 64\\)"):
        load_pretrained(hf, expect=ModelConfig.from_preset("debug-g1", d_model=64))
    # The same tensors' shapes, another computation: B and C split into other groups, another eps
    same_shapes = ModelConfig.from_preset("debug-g1", ngroups=2 * cfg.ngroups, d_state=cfg.d_state // 2, norm_eps=1e-3)
    with pytest.raises(PretrainedError, match=f"it has d_state {cfg.d_state} \\(configured: {cfg.d_state // 2}\\), ngroups "
                                              f"{cfg.ngroups} \\(configured: {2 * cfg.ngroups}\\), norm_eps {cfg.norm_eps} "):
        load_pretrained(hf, expect=same_shapes)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "hidden_size": "32"}))  # transformers' validation refuses it
    with pytest.raises(PretrainedError, match=f"{hf / 'config.json'}: .*hidden_size"):
        load_pretrained(hf)
    (hf / "config.json").write_text(json.dumps(config))
    weights = load_file(hf / "model.safetensors")
    weights["backbone.layers.1.mixer.D"] = weights["backbone.layers.1.mixer.D"][:-1]
    torch.save(weights, hf / "pytorch_model.bin")
    (hf / "model.safetensors").unlink()
    with pytest.raises(PretrainedError, match=r"backbone.layers.1.mixer.D has shape \(7,\), its config implies \(8,\)"):
        load_pretrained(hf)

    mamba1 = tmp_path / "mamba1"
    mamba1.mkdir()
    (mamba1 / "config.json").write_text(json.dumps({"d_model": 32, "n_layer": 2, "vocab_size": 256, "ssm_cfg": {}}))
    with pytest.raises(PretrainedError, match=r"ssm_cfg.layer = 'Mamba1' is not supported"):
        load_pretrained(mamba1)
    (tmp_path / "neither").mkdir()
    with pytest.raises(PretrainedError, match="neither is none of: a megassm checkpoint"):
        load_pretrained(tmp_path / "neither")
    (tmp_path / "starting" / "checkpoints").mkdir(parents=True)  # a run before its first save
    with pytest.raises(PretrainedError, match=r"starting is a run's folder without a complete checkpoint yet \(checkpoints/step_N/\)"):
        load_pretrained(tmp_path / "starting")


@pytest.mark.parametrize("model_type, cfg", [("mamba2", ModelConfig.from_preset("debug-g1")), ("bamba", BAMBA)], ids=["mamba2", "bamba"])
def test_a_tied_folder_whose_lm_head_differs_is_refused(model_type, cfg, tmp_path):
    """tie_word_embeddings = true beside an lm_head.weight of its own: transformers computes with that lm_head (it warns
    and does not tie), so reading the folder as tied would give other logits; an lm_head equal to the embedding loads."""
    cfg = dataclasses.replace(cfg, tie_embeddings=False)
    state = Mamba2LM(cfg).state_dict()
    save_transformers(cfg, state, tmp_path, model_type=model_type)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(hf.lm_head.weight, state["lm_head.weight"])  # what the message says transformers does
    with pytest.raises(PretrainedError, match=r"tie_word_embeddings is true, but lm_head.weight is not .*embed.*, and transformers' "
                                              r".* computes with lm_head.weight: set tie_word_embeddings to false"):
        load_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["lm_head.weight"] = weights[next(name for name in weights if "embed" in name)].clone()
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    tied, _ = load_pretrained(tmp_path)
    assert tied.tie_embeddings


def test_a_single_weight_file_is_read_before_a_left_over_index(tmp_path):
    """Saving unsharded into a folder saved sharded leaves the shards' index behind; transformers reads the single file."""
    cfg = ModelConfig.from_preset("debug-g1")
    save_transformers(cfg, Mamba2LM(cfg).state_dict(), tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    index = {"metadata": {}, "weight_map": {name: "model-00001-of-00001.safetensors" for name in weights}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg_read, state = load_pretrained(tmp_path)
    assert torch.equal(state["layers.0.mixer.D"], weights["backbone.layers.0.mixer.D"])


def test_command_line(tmp_path, capsys):
    cfg = ModelConfig.from_preset("debug-g1")
    state = Mamba2LM(cfg).state_dict()
    save_mamba_ssm(cfg, state, tmp_path / "published")
    done = run_tool("convert_checkpoint.py", "from-mamba-ssm", tmp_path / "published", tmp_path / "ours", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert {"model.toml", "trainer.json", ".metadata"} <= {p.name for p in (tmp_path / "ours").iterdir()}
    assert torch.equal(load_pretrained(tmp_path / "ours")[1]["layers.0.mixer.D"], state["layers.0.mixer.D"])
    model = Mamba2LM(cfg)  # the trainer can also resume from it, at step 0 with a fresh optimizer
    assert load_checkpoint(tmp_path / "ours", model, engine_for(model), ParallelContext())["step"] == 0
    assert torch.equal(model.layers[1].mixer.in_proj.weight["dt"], state["layers.1.mixer.in_proj.weight.dt"])

    assert user_error(capsys, tool.main, ["to-hf", str(tmp_path / "published"), str(tmp_path / "hf")]) == \
        f"convert_checkpoint.py: error: {tmp_path / 'published'} is a mamba-ssm folder (config.json with d_model, n_layer, ssm_cfg), " \
        "not a megassm checkpoint (trainer.json and DCP files) or run folder (checkpoints/step_N/): use from-mamba-ssm"
    (tmp_path / "neither").mkdir()
    assert user_error(capsys, tool.main, ["from-hf", str(tmp_path / "neither"), str(tmp_path / "out")]).startswith(
        f"convert_checkpoint.py: error: {tmp_path / 'neither'} is none of")
    assert not (tmp_path / "out").exists()


def test_tokenizer_export_without_conversion(tmp_path, prepared_data, monkeypatch):
    """An HF tokenizer is saved as it is; a sentencepiece model transformers cannot reproduce is copied."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel()
    backend.train_from_iterator(["import os\nprint(os.getcwd())"] * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"]))
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>").save_pretrained(tmp_path / "hf-tok")
    ids, note = tool.export_tokenizer(tmp_path / "hf-tok", tmp_path / "out", 300)
    assert ids == {"bos_token_id": 1, "eos_token_id": 1, "pad_token_id": None} and "each text preceded by <eos> as in training" in note
    assert AutoTokenizer.from_pretrained(tmp_path / "out")("print(os)")["input_ids"] == [1, *backend.encode("print(os)").ids]

    tokens = load_tokenizer(tmp_path / "hf-tok").vocab_size
    with pytest.raises(ValueError, match=f"has {tokens} tokens, the model only {tokens - 1}: give the tokenizer the model was trained"):
        tool.export_tokenizer(tmp_path / "hf-tok", tmp_path / "too-small", tokens - 1)
    assert not (tmp_path / "too-small").exists()

    monkeypatch.setattr(tool, "converted_sentencepiece", lambda tokenizer: None)
    ids, note = tool.export_tokenizer(prepared_data / "tokenizer", tmp_path / "copied", 512)
    assert ids == {"bos_token_id": 2, "eos_token_id": 2, "pad_token_id": None} and "copied it as tokenizer.model" in note
    assert [p.name for p in (tmp_path / "copied").iterdir()] == ["tokenizer.model"]


def test_export_from_another_folder_finds_the_runs_tokenizer(prepared_data, tmp_path, monkeypatch):
    """The run was started next to its data with a relative data.path; the export runs from elsewhere."""
    model = perturbed_model(ModelConfig.from_preset("debug-g1", vocab_size=512))
    monkeypatch.chdir(prepared_data.parent)
    cfg = load_config(None, [f"--data.path={prepared_data.name}"], world_size=1)  # as the trainer loads it
    trained_checkpoint(tmp_path / "run", model, Path(), cfg=dataclasses.replace(cfg, model=model.cfg))
    monkeypatch.chdir(tmp_path)
    tool.main(["to-hf", "run", "hf"])
    text = "def main():\n    return 42\n"
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")(text, add_special_tokens=False)["input_ids"] == \
        load_tokenizer(prepared_data / "tokenizer").encode(text)


def test_an_export_whose_tokenizer_is_not_found_fails_before_writing(prepared_data, tmp_path, monkeypatch, capsys):
    model = perturbed_model(ModelConfig.from_preset("debug-g1", vocab_size=512))
    trained_checkpoint(tmp_path / "run", model, Path(prepared_data.name))  # a relative data.path, as a config not made absolute holds
    monkeypatch.chdir(tmp_path)
    config = Path("run", "checkpoints", "step_7", "config.toml")
    assert user_error(capsys, tool.main, ["to-hf", "run", "hf"]) == \
        f"convert_checkpoint.py: error: the run's data.path = {prepared_data.name} (in {config}) is not a prepared data folder here, " \
        "relative to the folder the run was started from, so its tokenizer cannot be found; " \
        "give the tokenizer to export with --tokenizer"
    assert not (tmp_path / "hf").exists()


def test_a_damaged_newest_checkpoint_is_skipped_and_named(tmp_path, capsys):
    """As when the trainer resumes: the newest checkpoint whose files are all there; the missing file named."""
    cfg = ModelConfig.from_preset("debug-g1")
    older, newer = perturbed_model(cfg), perturbed_model(cfg)
    trained_checkpoint(tmp_path / "run", older, tmp_path, step=7)
    damaged = trained_checkpoint(tmp_path / "run", newer, tmp_path, step=8)
    (damaged / "__0_0.distcp").unlink()
    tool.main(["to-mamba-ssm", str(tmp_path / "run"), str(tmp_path / "exported")])
    assert capsys.readouterr().err == f"warning: skipping damaged checkpoint {damaged}: {damaged / '__0_0.distcp'} is missing\n"
    exported = load_pretrained(tmp_path / "exported")[1]
    assert all(torch.equal(exported[name], tensor) for name, tensor in older.state_dict().items())
    assert user_error(capsys, tool.main, ["to-mamba-ssm", str(damaged), str(tmp_path / "not-written")]) == \
        f"convert_checkpoint.py: error: checkpoint {damaged} is damaged: {damaged / '__0_0.distcp'} is missing; use an earlier one " \
        "(checkpoints/step_N), or the run folder for its newest complete one"
    assert not (tmp_path / "not-written").exists()


def test_an_export_casts_the_read_state_in_place(prepared_data, tmp_path, monkeypatch):
    """to-hf --dtype bf16 lets each read fp32 tensor go as it is cast: the export never holds both copies of the model
    (an 8B model's fp32 weights alone are 32 GB)."""
    import weakref

    trained_checkpoint(tmp_path / "run", perturbed_model(ModelConfig.from_preset("debug")), prepared_data)
    read, load = [], tool.load_pretrained

    def loading(path):
        cfg, state = load(path)
        read.extend(weakref.ref(t) for t in state.values())
        return cfg, state

    def saving(cfg, state, out, dtype, *args):
        assert all(t.dtype == torch.bfloat16 for t in state.values()) and all(ref() is None for ref in read)

    monkeypatch.setattr(tool, "load_pretrained", loading)
    monkeypatch.setattr(tool, "save_transformers", saving)
    tool.main(["to-hf", str(tmp_path / "run"), str(tmp_path / "hf"), "--dtype", "bf16"])
    assert read
