"""Every timeout in the tests scales with the machine's measured slowdown (tests/machine.py): no call
passes a literal `timeout=` and no deadline adds literal seconds to the clock."""

import ast
import pathlib

TESTS = pathlib.Path(__file__).resolve().parent


def _literal(node) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, (int, float))


def unscaled_timeouts(source: str) -> list[int]:
    """Line numbers of `f(..., timeout=<number>)` and `time.monotonic() + <number>`."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            lines += [node.lineno for k in node.keywords if k.arg == "timeout" and _literal(k.value)]
        if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add) and _literal(node.right)
                and isinstance(node.left, ast.Call) and ast.unparse(node.left.func).endswith(
                    ("monotonic", "time.time", "perf_counter"))):
            lines.append(node.lineno)
    return lines


def test_the_checker_flags_literal_timeouts():
    src = ("subprocess.run(cmd, timeout=900)\nproc.wait(timeout=scaled(60))\n"
           "deadline = time.monotonic() + 30\nlater = time.monotonic() + scaled(30)\n")
    assert unscaled_timeouts(src) == [1, 3]


def test_no_test_uses_an_unscaled_timeout():
    found = {f"{path.relative_to(TESTS)}:{line}" for path in sorted(TESTS.rglob("*.py"))
             for line in unscaled_timeouts(path.read_text())}
    assert not found, f"wrap these in machine.scaled(): {sorted(found)}"
