"""Write a benchmark's results into its own section of docs/benchmarks.md.

Each script owns the text between ``<!-- BEGIN name -->`` and ``<!-- END name -->``; other
sections are left as they are. The file is written to a temporary path and renamed.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import re

import torch

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def machine_line() -> str:
    """One line naming the machine and software the numbers were measured with."""
    import transformers

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"Measured {datetime.date.today().isoformat()} on {platform.machine()} "
        f"({os.cpu_count()} CPU cores, {dev}); Python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}."
    )


def update_section(name: str, markdown: str, doc: pathlib.Path = DOC) -> None:
    """Replace (or append) the section ``name`` of ``doc`` with ``markdown``."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = doc.read_text(encoding="utf-8") if doc.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = (
        pattern.sub(lambda _: block, text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + block + "\n"
    )
    tmp = doc.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(doc)
