"""The docs and the results they cite: every cited result folder exists, every folder is cited."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CITING_DOCS = [REPO / "README.md", REPO / "checkpoints" / "README.md"]


def expand_braces(path: str) -> list[str]:
    """``a/{b,c}_d`` -> ``["a/b_d", "a/c_d"]`` (one level, as the docs' shell commands write)."""
    found = re.search(r"\{([^{}]*)\}", path)
    if not found:
        return [path]
    head, tail = path[: found.start()], path[found.end() :]
    return [p for part in found.group(1).split(",") for p in expand_braces(head + part + tail)]


def cited_result_folders() -> set[str]:
    cited = set()
    for document in CITING_DOCS:
        for path in re.findall(r"results/[\w{},./-]+", document.read_text(encoding="utf-8")):
            cited.update(p.rstrip("/.,") for p in expand_braces(path))
    return {path for path in cited if not Path(path).suffix}  # folders, not files such as .md


#: What a result folder holds: a validation table, or the results of a ttsr-eval run.
TABLE_NAMES = ("table.json", "results.json")


def result_folders() -> set[str]:
    tables = [t for name in TABLE_NAMES for t in (REPO / "results").rglob(name)]
    return {str(table.parent.relative_to(REPO)) for table in tables}


def test_every_cited_result_folder_holds_a_table() -> None:
    cited = cited_result_folders()
    assert "results/demo_step5000_ref-lr" in cited
    missing = sorted(
        path for path in cited if not any((REPO / path / n).is_file() for n in TABLE_NAMES)
    )
    assert not missing, f"cited but absent: {missing}"


def test_every_result_folder_is_cited_by_the_docs() -> None:
    uncited = sorted(result_folders() - cited_result_folders())
    assert not uncited, f"in results/ but cited by neither README: {uncited}"
