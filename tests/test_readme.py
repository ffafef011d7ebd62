"""The README's Python examples run as written, each on its own (on a tiny data set), so they cannot drift."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(fake_mnist, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    for block in blocks:  # each in a fresh namespace: a reader copies one block, not the page
        exec(compile(block.replace("../shared/data", str(fake_mnist)), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "ece" in printed
