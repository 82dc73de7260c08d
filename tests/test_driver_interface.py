"""The controller's published driver interface (`dart.core.controller.DRIVER_INTERFACE`): the code
that drives or reads a patched model (runtimes, evaluation, lm-eval, shells, benches, scripts
and the patching code in `dart.core.api`) uses only those names, never assigns to the
controller, and the interface's state is read-only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from tiny_models import random_ids, tiny_model

import dart
from dart.core.controller import DRIVER_INTERFACE, HOOK_INTERFACE, Controller

ROOT = Path(__file__).resolve().parents[1]
# Everything above the controller that may hold one: scanned whole, so a new driver is covered.
SCANNED = sorted(
    [
        *(ROOT / "dart").glob("*.py"),
        *(ROOT / "dart" / "runtime").glob("*.py"),
        *(ROOT / "dart" / "evaluate").glob("*.py"),
        *(ROOT / "dart" / "lmeval").glob("*.py"),
        ROOT / "dart" / "core" / "api.py",
        *(ROOT / "bench").glob("*.py"),
        *(ROOT / "scripts").glob("*.py"),
    ]
)
# The patching code also calls the hook methods it installs; the re-trace cost bench times one
# drift event by firing the monitor's poll itself, at a known step (instrumentation, not driving).
ALLOWED = {
    ROOT / "dart" / "core" / "api.py": DRIVER_INTERFACE | HOOK_INTERFACE,
    ROOT / "bench" / "retrace_cost.py": DRIVER_INTERFACE | {"monitor", "step"},
    # a study script that prints the layers' raw sensitivity scores beside the budget it built
    ROOT / "scripts" / "budget_layers.py": DRIVER_INTERFACE | {"selection"},
}


def _is_controller(node: ast.AST) -> bool:
    """``x.controller`` itself, or either branch of ``a if cond else b`` being one."""
    if isinstance(node, ast.IfExp):
        return _is_controller(node.body) or _is_controller(node.orelse)
    return isinstance(node, ast.Attribute) and node.attr == "controller"


def _controller_names(tree: ast.AST) -> set[str]:
    """Names bound to a controller: assigned ``x.controller`` (or a conditional of it), and the
    ``as`` target of a ``with`` over the loop's ``_driving()`` / the controller's
    ``driven()``; ``controller`` itself (parameters so named). A parameter named like a bound
    name in the same file counts too, since the scan is per file, not per scope."""
    names = {"controller"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and _is_controller(node.value):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                ctx, var = item.context_expr, item.optional_vars
                driving = (
                    isinstance(ctx, ast.Call)
                    and isinstance(ctx.func, ast.Attribute)
                    and ctx.func.attr in ("_driving", "driven")
                )
                if isinstance(var, ast.Name) and (driving or _is_controller(ctx)):
                    names.add(var.id)
    return names


def _controller_expr(node: ast.AST, names: set[str]) -> bool:
    if isinstance(node, ast.Name):
        return node.id in names
    return isinstance(node, ast.Attribute) and node.attr == "controller"


def violations(source: str, allowed: frozenset[str] = DRIVER_INTERFACE) -> list[str]:
    """Attributes of a controller read outside ``allowed``, and any assignment to one."""
    tree = ast.parse(source)
    names = _controller_names(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not _controller_expr(node.value, names):
            continue
        where = f"line {node.lineno}: .{node.attr}"
        if isinstance(node.ctx, (ast.Store, ast.Del)):
            found.append(f"{where} assigned")
        elif node.attr not in allowed:
            found.append(f"{where} is not in the driver interface")
        for parent in ast.walk(tree):  # in-place updates (x.counts += ...) are stores too
            if isinstance(parent, ast.AugAssign) and parent.target is node:
                found.append(f"{where} updated in place")
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("setattr", "delattr")
            and node.args
            and _controller_expr(node.args[0], names)
        ):
            found.append(f"line {node.lineno}: {node.func.id} on a controller")
    return found


@pytest.mark.parametrize("path", SCANNED, ids=lambda p: str(p.relative_to(ROOT)))
def test_drivers_use_only_the_driver_interface(path):
    source = path.read_text()
    bad = violations(source, ALLOWED.get(path, DRIVER_INTERFACE))
    assert not bad, f"{path.relative_to(ROOT)}: " + "; ".join(bad)


def test_the_scan_catches_private_reads_and_writes():
    """The scanner is not vacuous: each kind of poke it exists for is reported."""
    source = """
def f(handle, fast):
    c = handle.controller
    c.acc.reset(1)
    handle.controller.phase = []
    c.counts += [1]
    setattr(c, "auto_step", False)
    with fast._driving() as d:
        d.auto_step = False
        step = d.schedule.step
    ok = c.stats(), handle.controller.widths
"""
    bad = violations(source)
    assert len(bad) == 7, bad
    assert any(".acc is not in" in b for b in bad)
    assert any(".phase assigned" in b for b in bad)
    assert any(".counts updated in place" in b for b in bad)
    assert any("setattr on a controller" in b for b in bad)
    assert any(".schedule is not in" in b for b in bad) and any(
        ".auto_step assigned" in b for b in bad
    )


def test_every_interface_name_exists_and_is_documented():
    for name in sorted(DRIVER_INTERFACE):
        member = getattr(Controller, name, None)
        assert member is not None, f"Controller has no {name!r}"
        doc = (member.fget if isinstance(member, property) else member).__doc__
        assert doc, f"Controller.{name}: no docstring"
    for name in HOOK_INTERFACE:
        member = getattr(Controller, name)
        assert callable(member) or isinstance(member, property), name


# every state the interface publishes is a property without a setter
READ_ONLY = sorted(n for n in DRIVER_INTERFACE if isinstance(getattr(Controller, n), property))


def test_interface_state_is_read_only_and_copies_do_not_leak():
    assert {"phase", "counts", "row_counts", "auto_step", "retrace_tokens"} <= set(READ_ONLY)
    model = tiny_model("llama")
    handle = dart.attach(model, dart.DARTConfig(backend="masked", batch_policy="per_sequence"))
    c = handle.controller
    with torch.no_grad():
        model(random_ids(2, 8), use_cache=False)
    handle.controller.select_traced()
    for name in READ_ONLY:
        with pytest.raises(AttributeError):
            setattr(c, name, getattr(c, name))
    phase, rows, widths = c.phase, c.row_counts, c.widths
    phase.clear()
    rows[0][0] = -1
    widths.append(7)
    assert c.phase and c.row_counts[0][0] != -1 and len(c.widths) == c.num_layers
    assert c.sparse_rows == [True, True]
    with c.driven() as driven:
        assert driven is c and not c.auto_step
    assert c.auto_step
    handle.detach()
