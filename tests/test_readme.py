"""The README's Python example runs as written (on a tiny data set), so it cannot drift."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(fake_mnist, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block.replace("../shared/data", str(fake_mnist)), "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "ece" in printed
