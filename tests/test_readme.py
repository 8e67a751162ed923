"""The README's API example runs as written and gives consistent results."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1
    scope: dict = {}
    exec(compile(blocks[0], str(README), "exec"), scope)
    assert scope["scores"].shape == (6, 8)
    torch.testing.assert_close(scope["per_hop"].sum(0), scope["scores"])
    assert scope["flow"].shape == scope["truth"].shape == (4, 6)
    # the estimate reaches exactly the nodes the replay reaches, with the same signs
    assert torch.equal(torch.sign(scope["flow"]), torch.sign(scope["truth"]))
