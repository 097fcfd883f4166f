"""A mixture of data folders (data.path = {folder = weight}): the sample assignment against independent counts, the
config's checks, and the trainer on a mixture under torchrun against one process, resumed on another layout."""

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from megassm.config import load_config
from megassm.data import SampleLoader, TokenStream, train_sentencepiece
from megassm.data.corpus import builtin_documents
from megassm.data.mixture import MIX_BLOCK, MixedLoader, Mixture, block_counts
from megassm.data.prepare import prepare
from megassm.train import folder_names, main, open_data, sample_order
from tests.test_train import STEPS, assert_same_run, by_step, config, run_trainer, train  # noqa: F401 (config: a fixture)


def hamilton(weights: list[float], block: int) -> list[int]:
    """Largest-remainder apportionment, written out: floors, then one more for the largest fractional parts."""
    quotas = [w / sum(weights) * block for w in weights]
    counts = [int(q // 1) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: block - sum(counts)]:
        counts[i] += 1
    return counts


@pytest.mark.parametrize("weights, block", [(w, b) for w in ([0.7, 0.2, 0.1], [1, 1, 1], [3, 1], [0.5]) for b in (16, 100, MIX_BLOCK)]
                         + [([1e-3, 1, 2, 5, 0.25], 100), ([1e-3, 1, 2, 5, 0.25], MIX_BLOCK)])
def test_block_counts_apportion_the_block_by_largest_remainders(weights, block):
    assert block_counts(weights, block).tolist() == hamilton(weights, block)


@pytest.mark.parametrize("weights", [[0.7, 0.2, 0.1], [1, 3], [5, 1, 1, 1]])
def test_every_block_holds_each_folders_count_and_each_folder_reads_its_samples_in_its_order(weights):
    """Folder f's samples come in its own order 0, 1, 2, ... (no repeat before its epoch ends), block b holding
    b * count .. (b + 1) * count - 1 of them."""
    block, blocks = 64, 5
    mixture = Mixture(weights, seed=11, block=block)
    folders, numbers = mixture.assign(np.arange(blocks * block + 17))
    counts = hamilton(weights, block)
    for b in range(blocks):
        inside = slice(b * block, (b + 1) * block)
        assert np.bincount(folders[inside], minlength=len(weights)).tolist() == counts
    for f in range(len(weights)):
        assert numbers[folders == f].tolist() == list(range(np.count_nonzero(folders == f)))


def test_huge_weights_keep_their_shares():
    assert block_counts([1e308, 1e308, 0.5e308], 16).tolist() == hamilton([2, 2, 1], 16)


def test_the_mixture_is_a_function_of_the_seed_and_the_sample_number():
    """The same samples whatever pieces a layout reads them in (any DP size, micro batch, resume point)."""
    whole = Mixture([0.6, 0.3, 0.1], seed=5, block=50).assign(np.arange(0, 400))
    pieces = Mixture([0.6, 0.3, 0.1], seed=5, block=50)
    parts = [pieces.assign(np.arange(start, end)) for start, end in [(0, 7), (7, 49), (49, 51), (51, 300), (300, 400)]]
    for got, want in zip((np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])), whole):
        np.testing.assert_array_equal(got, want)
    other = Mixture([0.6, 0.3, 0.1], seed=6, block=50).assign(np.arange(0, 400))
    assert (other[0] != whole[0]).any()
    first, second = whole[0][:50], whole[0][50:100]
    assert (first != second).any()  # each block in another order


def test_read_by_counts_the_samples_each_folder_has_given():
    mixture = Mixture([0.5, 0.3, 0.2], seed=2, block=40)
    folders, _ = mixture.assign(np.arange(200))
    for samples in (0, 1, 39, 40, 41, 117, 200):
        assert mixture.read_by(samples).tolist() == np.bincount(folders[:samples], minlength=3).tolist(), samples


def test_one_folder_reads_its_own_order():
    folders, numbers = Mixture([1.0], seed=3).assign(np.arange(10, 20))
    assert folders.tolist() == [0] * 10 and numbers.tolist() == list(range(10, 20))
    assert Mixture([1.0], seed=3).read_by(123).tolist() == [123]


@pytest.fixture(scope="module")
def other_data(prepared_data: Path, tmp_path_factory) -> Path:
    """A second prepared folder, "other", of other built-in documents, with prepared_data's tokenizer."""
    root = tmp_path_factory.mktemp("other")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in list(builtin_documents())[80:140]))
    tokenizer = prepared_data / TokenStream(prepared_data).meta.tokenizer
    return prepare([corpus], tokenizer, root / "other", num_proc=1, val_fraction=0.1, cache_dir=root / "cache")


def test_a_mixed_loader_reads_each_row_from_its_folders_order(prepared_data, other_data):
    loaders = [SampleLoader(TokenStream(path), seq_len=64, seed=1) for path in (prepared_data, other_data)]
    mixture = Mixture([0.5, 0.5], seed=1, block=16)
    batch = MixedLoader(loaders, mixture).batch(13, 6)
    for row, (folder, number) in enumerate(zip(*mixture.assign(np.arange(13, 19)))):
        start = int(loaders[folder].window_starts(int(number), 1)[0])
        assert batch.input_ids[row].tolist() == loaders[folder].stream.read(start, 64).tolist()
        assert batch.labels[row].tolist() == loaders[folder].stream.read(start + 1, 64).tolist()
    assert set(mixture.assign(np.arange(13, 19))[0].tolist()) == {0, 1}


def test_one_folders_sample_order_digest_is_the_one_checkpoints_hold(config):
    """A single folder's digest as runs before mixtures wrote it: their checkpoints resume without a warning."""
    cfg = load_config(config, world_size=None)
    meta = TokenStream(cfg.data.path).meta
    what = [[shard.sha256 for shard in meta.shards], meta.doc_starts_sha256, meta.val_tokens, cfg.data.seq_len, cfg.run.seed]
    assert sample_order(open_data(cfg), cfg) == hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


@pytest.fixture(scope="module")
def mixture_config(config, prepared_data, other_data, tmp_path_factory) -> Path:
    """The trainer tests' config on a mixture: 3 parts prepared_data, 1 part other_data (a table in TOML)."""
    path = tmp_path_factory.mktemp("mixture") / "mixture.toml"
    path.write_text(config.read_text().replace(f'path = "{prepared_data}"', f'path = {{"{prepared_data}" = 3, "{other_data}" = 1}}'))
    return path


def test_data_path_takes_a_table_of_folders_and_weights_in_toml_and_on_the_command_line(mixture_config, prepared_data, other_data,
                                                                                          monkeypatch):
    assert load_config(mixture_config, world_size=None).data.folders() == {str(prepared_data): 0.75, str(other_data): 0.25}
    monkeypatch.chdir(prepared_data.parent)
    cfg = load_config(None, [f'--data.path={{"{prepared_data.name}" = 1, "{other_data}" = 1.5}}'], world_size=1)
    assert cfg.data.path == {str(prepared_data): 1.0, str(other_data): 1.5}  # folders made absolute


@pytest.mark.parametrize("table, message", [
    ('{{"{a}" = 0, "{b}" = 1}}', "data.path's weight of {a} must be a positive number, got 0.0$"),
    ('{{"{a}" = 1, "{b}" = -2}}', "data.path's weight of {b} must be a positive number, got -2.0$"),
    ('{{"{a}" = 1, "{b}" = 1e-6}}', "data.path's weight of {b}, 1e-06, is below 1/65536 of the weights' sum, the finest share the "
                                    "mixture keeps: raise it or leave the folder out$"),
    ('{{"{a}" = 1, "{a}/." = 1}}', "data.path names one folder 2 times: {a}, {a}/.$"),
    ('{{"{a}" = 1, "{link}" = 1}}', "data.path names one folder 2 times: {a}, {link}$"),
    ('{{"{a}" = 1, "" = 1}}', 'data.path names a folder "" \\(an unset variable\\?\\): name each prepared folder of the mixture$'),
    ('{{"{a}" = 1, "{copy}" = 1}}', "data.path's folders {a} and {copy} hold the same tokens \\(a copy\\): name it once, with the weight "
                                    "of both$"),
    ('{{{a} = 1}}', "--data.path={{{a} = 1}} is not a valid TOML table or list \\(.*\\); quote the strings in it, e.g. "
                    "--data.path='{{\"data/web\" = 3, \"data/code\" = 1}}'$"),
    ('{{"{a}" = "half"}}', "data.path\\['{a}'\\] = 'half' in .* must be a number$"),
    ("{{}}", "data.path is empty: point it at a folder made by tools/prepare_data.py"),
])
def test_a_bad_mixture_fails_with_one_line(config, prepared_data, other_data, tmp_path, table, message, capsys):
    (tmp_path / "link").symlink_to(prepared_data)
    shutil.copytree(prepared_data, tmp_path / "copy")
    folders = dict(a=prepared_data, b=other_data, link=tmp_path / "link", copy=tmp_path / "copy")
    assert main(["--config", str(config), f"--data.path={table.format(**folders)}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("megassm-train: error: "), err
    assert re.search(message.format(**{name: re.escape(str(path)) for name, path in folders.items()}), err[0]), err[0]


def test_folders_of_different_tokenizers_are_refused(config, prepared_data, other_data, tmp_path, capsys):
    tokenizer = train_sentencepiece(list(builtin_documents())[:40], vocab_size=400, out_dir=tmp_path / "tokenizer", max_sentences=5000)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in list(builtin_documents())[:20]))
    third = prepare([corpus], tokenizer, tmp_path / "third", num_proc=1, val_fraction=0.1, cache_dir=tmp_path / "cache")
    capsys.readouterr()  # the preparation's progress
    assert main(["--config", str(config), f'--data.path={{"{prepared_data}" = 1, "{third}" = 1}}']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"megassm-train: error: the folders of data.path were prepared with different tokenizers: {prepared_data}/tokenizer "
                   f"and {third}/tokenizer; a mixture's folders need one tokenizer (prepare them again with one)"]


@pytest.fixture(scope="module")
def mixed_one_process(mixture_config, tmp_path_factory) -> tuple[Path, str, list[dict]]:
    run_dir = tmp_path_factory.mktemp("mixed-one") / "run"
    result = run_trainer(mixture_config, run_dir, 1)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir, result.stdout, [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_mixture_run_says_each_folders_share_and_validates_each_folder(mixed_one_process, prepared_data, other_data):
    _, stdout, records = mixed_one_process
    samples = STEPS * 8
    windows = [SampleLoader(TokenStream(path), seq_len=88, seed=0).num_windows for path in (prepared_data, other_data)]
    assert (f"data: prepared 75.0% of the samples ({windows[0]:,} training samples, read {samples * 0.75 / windows[0]:.2f} times in "
            f"train.steps), other 25.0% of the samples ({windows[1]:,} training samples, read {samples * 0.25 / windows[1]:.2f} times "
            "in train.steps)") in stdout
    validated = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in validated] == [2, 4]
    for r in validated:
        assert r["val_loss"] == pytest.approx(0.75 * r["val_loss/prepared"] + 0.25 * r["val_loss/other"], rel=1e-12)


def test_a_mixture_run_under_torchrun_matches_one_process_and_resumes_on_another_layout(mixture_config, mixed_one_process, tmp_path):
    """dp2 x cp2 under torchrun gives the one-process run's losses, gradients and every folder's validation loss; its
    step-2 checkpoint, resumed in one process, gives the uninterrupted run's steps 3 and 4."""
    _, _, want = mixed_one_process
    got = train(mixture_config, tmp_path / "run", 4, "--parallel.cp=2")
    assert_same_run(got, want)
    for key in ("val_loss/prepared", "val_loss/other"):
        assert by_step(got, key) == pytest.approx(by_step(want, key), rel=1e-5)
    shutil.rmtree(tmp_path / "run" / "checkpoints" / f"step_{STEPS}")
    (tmp_path / "run" / "metrics.jsonl").unlink()
    resumed = train(mixture_config, tmp_path / "run", 1)
    assert min(r["step"] for r in resumed) == 3
    assert_same_run(resumed, [r for r in want if r["step"] > 2])


def test_the_trainer_mixes_with_the_configured_weights_whatever_the_tables_order(mixture_config, prepared_data, other_data, tmp_path,
                                                                                  monkeypatch):
    from megassm.train import Trainer

    monkeypatch.setattr("megassm.train.limit_cpu_threads", lambda device: None)  # this test process's threads stay as they are
    reordered = [f'--data.path={{"{other_data}" = 1, "{prepared_data}" = 3}}', f"--run.dir={tmp_path / 'run'}"]
    for overrides in ([f"--run.dir={tmp_path / 'run'}"], reordered):
        trainer = Trainer(load_config(mixture_config, overrides), command=[])
        assert [str(loader.stream.path) for loader in trainer.train_data.loaders] == [str(prepared_data), str(other_data)]
        assert trainer.train_data.mixture.counts.tolist() == hamilton([3, 1], MIX_BLOCK)


def test_equal_shares_written_otherwise_keep_the_sample_order(mixture_config, prepared_data, other_data):
    def order(weights: tuple[float, float]) -> str:
        cfg = load_config(mixture_config, [f'--data.path={{"{prepared_data}" = {weights[0]}, "{other_data}" = {weights[1]}}}'])
        return sample_order(open_data(cfg), cfg)

    assert order((0.7, 0.3)) == order((7, 3)) == order((70, 30)) != order((0.6, 0.4))


def test_folders_are_named_by_as_many_last_parts_as_tell_them_apart():
    assert folder_names(["/d/web", "/d/code"]) == ["web", "code"]
    assert folder_names(["/a/x/web", "/b/x/web", "/b/code"]) == ["a/x/web", "b/x/web", "b/code"]
    assert folder_names(["/data/web"]) == ["web"]
