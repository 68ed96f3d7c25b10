"""scalechat.py reads top to bottom: the map in its docstring and its section banners agree, and
each definition uses only names defined in its own section or above (annotations aside)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

SOURCE = (Path(__file__).resolve().parent / "scalechat.py").read_text()
TREE = ast.parse(SOURCE)
LINES = SOURCE.splitlines()
BANNER = re.compile(r"# (\d+)\. (.+)")


def banners() -> list[tuple[int, int, str]]:
    """(line, number, title) of each section banner: a numbered comment between two rules."""
    return [(i + 1, int(m[1]), m[2]) for i, line in enumerate(LINES)
            if (m := BANNER.fullmatch(line)) and LINES[i - 1].startswith("# ---") and LINES[i + 1].startswith("# ---")]


def section_of(line: int, starts: list[int]) -> int:
    return sum(1 for s in starts if s <= line)


def test_the_map_names_the_sections_in_order():
    """The module docstring's map lists each banner's number and title, in the file's order."""
    doc = ast.get_docstring(TREE)
    mapped = [(int(m[1]), m[2]) for m in re.finditer(r"^(\d+)\. (.+?)(?:\.\s|\.$|$)", doc, re.MULTILINE)]
    found = banners()
    assert [n for _, n, _ in found] == list(range(1, len(found) + 1)) and len(found) == 8
    for (number, title), (_, banner_number, banner_title) in zip(mapped, found, strict=True):
        assert (number, title) == (banner_number, banner_title)


def test_each_definition_uses_only_what_stands_above_its_section():
    starts = [line for line, _, _ in banners()]
    defined: dict[str, int] = {}
    for node in TREE.body:
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else [
            n.id for t in getattr(node, "targets", []) for n in ast.walk(t) if isinstance(n, ast.Name)]
        for name in names:
            defined.setdefault(name, node.lineno)
    later = []
    for node in TREE.body:
        annotations = {id(x) for sub in ast.walk(node)
                       for a in (getattr(sub, "returns", None), getattr(sub, "annotation", None)) if a is not None
                       for x in ast.walk(a)}
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name) and id(sub) not in annotations and sub.id in defined \
                    and section_of(defined[sub.id], starts) > section_of(node.lineno, starts):
                later.append(f"{getattr(node, 'name', node.lineno)} uses {sub.id}")
    assert later == []


def test_no_class_is_a_file_of_its_own():
    sizes = {n.name: n.end_lineno - n.lineno + 1 for n in TREE.body if isinstance(n, ast.ClassDef)}
    assert sizes["Server"] <= 300
    assert max(sizes.values()) <= 400, max(sizes.items(), key=lambda kv: kv[1])
