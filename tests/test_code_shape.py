"""The house rules that a script can check: no file in vlm_tune/ over 400 lines, no function over 60 lines
unless the line above it says why (`# over 60 lines: <reason>`)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "vlm_tune"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
EXCEPTION_MARK = "# over 60 lines:"


def _sources() -> dict[str, list[str]]:
    return {str(path.relative_to(PACKAGE.parent)): path.read_text().splitlines() for path in PACKAGE.rglob("*.py")}


def _long_functions(lines: list[str]) -> list[tuple[str, int, int]]:
    """(name, first line, length) of every function longer than the limit without a reason above it."""
    found = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        length = node.end_lineno - node.lineno + 1
        first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        above = lines[first - 2].strip() if first >= 2 else ""
        has_reason = above.startswith(EXCEPTION_MARK) and above.removeprefix(EXCEPTION_MARK).strip()
        if length > MAX_FUNCTION_LINES and not has_reason:
            found.append((node.name, node.lineno, length))
    return found


def test_no_file_is_over_400_lines():
    too_long = {name: len(lines) for name, lines in _sources().items() if len(lines) > MAX_FILE_LINES}
    assert not too_long, f"split these files (lines): {too_long}"


def test_no_function_is_over_60_lines_without_a_reason():
    too_long = {name: found for name, lines in _sources().items() if (found := _long_functions(lines))}
    assert not too_long, f"split these functions (name, line, length), or say why above them: {too_long}"


def test_the_check_sees_a_long_function_and_its_reason():
    body = ["def f():"] + ["    x = 1"] * MAX_FUNCTION_LINES
    assert _long_functions(body) == [("f", 1, MAX_FUNCTION_LINES + 1)]
    assert _long_functions([f"{EXCEPTION_MARK} one table, read top to bottom", *body]) == []
    assert _long_functions([EXCEPTION_MARK, *body]) != []  # the mark alone gives no reason
