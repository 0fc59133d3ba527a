"""The README's Python examples run as written."""

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 4
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["sweep"].stack().shape[0] == 2 + len(namespace["sweep"].injected)


def test_store_docs_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    doc = README.parent / "docs" / "store.md"
    blocks = [b for b in re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S) if "import layerscope" in b]
    assert blocks  # the runnable examples (the others are fragments about a store named in the text)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block.replace("/tmp/ls-xarray-demo", str(tmp_path / "demo")), "docs/store.md", "exec"), namespace)
    assert namespace["ds"]["mid_block"].shape[0] == 2


def test_arch_docs_python_blocks_run():
    doc = README.parent / "docs" / "arch.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert blocks
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/arch.md", "exec"), namespace)
    assert namespace["sdxl"].layers("mid_block")[0].shape == (1280, 32, 32)


def test_attention_docs_python_blocks_run():
    doc = README.parent / "docs" / "attention.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert len(blocks) == 3
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/attention.md", "exec"), namespace)
    assert namespace["p"].shape == (2, 4, 2, 256, 77)
    plain, louder = namespace["plain"], namespace["louder"].images
    assert (louder[0] - plain[0]).abs().max() > 1e-4 and (louder[1] - plain[1]).abs().max() < 1e-5
