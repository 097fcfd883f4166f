"""The documentation stays true to the code: the config keys docs/architecture.md lists are config.py's,
and every file of the repository that the user documents name (in prose or in commands) exists."""

import dataclasses
import re

import pytest

from megassm.config import SECTIONS
from tests.commands import ROOT

USER_DOCS = ["README.md", "docs/architecture.md", "bench/RESULTS.md", "bench/ssd.md", "bench/context_parallel.md", "bench/trainer_gpu.md"]
REPO_PATH = re.compile(r"(?<![\w/.])((?:megassm|parallel|tools|launch|configs|tests|bench|docs)/[\w./*-]*[\w*])")
PLACEHOLDER = re.compile(r"(^|/|_)[A-Z]+\b")  # configs/X.toml, checkpoints/step_N


def documented_keys(text: str) -> dict[str, set[str]]:
    """{section: keys} of the key list in section 7 of docs/architecture.md: "[section]  key, key, ..." lines,
    continued on indented lines."""
    block = text.split("## 7.", 1)[1].split("```", 2)[1]
    keys: dict[str, set[str]] = {}
    for line in block.strip().splitlines():
        if line.startswith("["):
            section, _, line = line.partition("]")
            current = keys.setdefault(section.lstrip("["), set())
        current.update(key.strip() for key in line.split(",") if key.strip())
    return keys


def test_the_architecture_lists_every_config_key_and_no_other():
    want = {name: {f.name for f in dataclasses.fields(factory)} for name, factory in SECTIONS.items()}
    want["model"].add("preset")
    assert documented_keys((ROOT / "docs" / "architecture.md").read_text()) == want


@pytest.mark.parametrize("doc", USER_DOCS)
def test_files_the_documents_name_exist(doc):
    named = REPO_PATH.findall((ROOT / doc).read_text())
    assert named, f"{doc} names no file of the repository"
    missing = [path for path in named if not PLACEHOLDER.search(path) and not any(ROOT.glob(path))]
    assert not missing, f"{doc} names {missing}"


def documented_numbers() -> list[tuple[str, str]]:
    """(document, phrase): the numbers the documents give for the trainer's constants, written from the constants."""
    from megassm import auto_choices as auto
    from megassm.checkpoint import OPTIMIZER_READ_BYTES
    from megassm.checkpoint_writer import SLAB_BYTES
    from megassm.data.mixture import MIX_BLOCK
    from megassm.generate import PREFILL_CHUNK_TOKENS
    from megassm.train import ABANDONED_WRITE_WAIT
    from parallel.chunked_loss import LOSS_CHUNK_TOKENS

    share = {0.2: "a fifth"}[auto.KEEP_SSD_STATES_AUTO_SHARE]  # a new share needs its words here and in the documents
    readme, architecture = "README.md", "docs/architecture.md"
    return [
        (readme, f"chunks of {LOSS_CHUNK_TOKENS} tokens"),
        (readme, f"in {auto.CUDA_GRAPH_GROUPS_OVER_REPLICAS} groups of layers"),
        (architecture, f"in {auto.CUDA_GRAPH_GROUPS_OVER_REPLICAS} groups of layers"),
        (readme, f"up to {auto.GRAPHS_AUTO_MAX_TOKENS:,} tokens per rank"),
        (readme, f"{auto.COMMUNICATION_ALLOWANCE >> 30} GiB of each is set aside"),
        (architecture, f"{auto.COMMUNICATION_ALLOWANCE >> 30} GiB set aside"),
        (readme, f"within {auto.RECOMPUTE_ABOVE_SHARE:.0%} of the GPU's memory"),
        (architecture, f"within {auto.RECOMPUTE_ABOVE_SHARE:.0%} of the GPU's memory"),
        (readme, f"at most {share} of the GPU's memory and, with the rest of the step, at most {auto.STEP_MEMORY_MAX_SHARE:.0%}"),
        (architecture, f"at most {share} of the GPU's memory and with the rest at most {auto.STEP_MEMORY_MAX_SHARE:.0%}"),
        (architecture, f"{SLAB_BYTES >> 30} GiB slabs"),
        (architecture, f"({OPTIMIZER_READ_BYTES >> 30} GiB of their logical tensors)"),
        (architecture, f"up to {ABANDONED_WRITE_WAIT.seconds // 60} minutes"),
        (readme, f"every block of {MIX_BLOCK:,} samples"),
        (readme, f"reads its prompt {PREFILL_CHUNK_TOKENS:,} tokens at a time"),
        (architecture, f"runs in pieces of {PREFILL_CHUNK_TOKENS:,} tokens"),
        (architecture, f"block k // {MIX_BLOCK:,}"),
    ]


def test_the_numbers_the_documents_give_are_the_codes():
    texts = {doc: " ".join((ROOT / doc).read_text().split()) for doc in ("README.md", "docs/architecture.md")}  # lines joined
    missing = [(doc, phrase) for doc, phrase in documented_numbers() if phrase not in texts[doc]]
    assert not missing, missing
