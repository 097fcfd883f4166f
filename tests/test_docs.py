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
