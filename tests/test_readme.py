"""Every Python block of the README runs as written, in order."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_run() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "the README has no Python example"
    namespace: dict[str, object] = {}  # the blocks read as one session, top to bottom
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
