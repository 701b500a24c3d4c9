"""megatron-core's private members are touched in one module, rlef_hpc.models.megatron_private,
which names the megatron-core version it was read against (the one pyproject.toml pins)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "rlef_hpc"
ADAPTER = PACKAGE / "models" / "megatron_private.py"
# Underscored members of other libraries, outside this rule: os._exit, sys._getframe, torch's
# ProcessGroupNCCL options._timeout, submitit's command builders, the flags vLLM's layer-wise
# reload sets on the model (rlef_hpc.rollout.vllm_engine._abandon_reload puts them back).
OTHER_LIBRARIES = {
    "_exit",
    "_getframe",
    "_timeout",
    "_make_submission_file_text",
    "_submitit_command_str",
    "_do_torchao_reload",
    "_original_do_torchao_reload",
}


def _ours(trees: dict[Path, ast.Module]) -> set[str]:
    """Every private name rlef_hpc defines itself (functions, classes, module globals,
    attributes it assigns), wherever it is used."""
    names = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                    names.add(node.attr)
            elif isinstance(node, ast.alias):
                names.add(node.asname or node.name.split(".")[-1])
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return {n for n in names if n.startswith("_")}


def test_only_the_adapter_touches_private_members_of_megatron():
    trees = {p: ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}
    ours = _ours({p: t for p, t in trees.items() if p != ADAPTER})
    found = []
    for path, tree in trees.items():
        if path == ADAPTER:
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            name = node.attr
            if not name.startswith("_") or name.startswith("__") or name in ours:
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            if name not in OTHER_LIBRARIES:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{name}")
    assert not found, "\n".join(found)


def test_the_adapter_names_the_pinned_megatron_version():
    import megatron.core

    from rlef_hpc.models import megatron_private

    pin = re.search(r'"megatron-core==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin is not None
    assert megatron_private.READ_AGAINST == pin.group(1) == megatron.core.__version__
    assert f"megatron-core {megatron_private.READ_AGAINST}" in megatron_private.__doc__.replace(
        "\n", " "
    )
