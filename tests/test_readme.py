"""The README's Python snippets run as written on a CPU (each block on its own, in a temp dir).

Each block defines its own tensors and states its shapes with asserts, so a snippet that no
longer matches the API, or an API whose shapes changed, fails here.
"""
import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _python_blocks():
    for m in re.finditer(r"```python\n(.*?)```", README, re.S):
        line = README[:m.start()].count("\n") + 2
        yield pytest.param(m.group(1), line, id=f"README-line{line}")


BLOCKS = list(_python_blocks())


def test_readme_has_python_snippets():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("code, line", BLOCKS)
def test_readme_snippet_runs(code, line, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    exec(compile("\n" * (line - 1) + code, "README.md", "exec"), namespace)
    assert any(not k.startswith("__") for k in namespace), "a snippet that defines nothing shows nothing"
