"""Every Profile field is read by the model: an era behaviour nobody reads is a flag that does nothing.

The model is hypervisor/ without the modules that define and list the profiles.  A field
counts as read where some module takes it as an attribute (`profile.<field>`).
"""

import ast
from dataclasses import fields
from pathlib import Path

import hypervisor
from hypervisor.profiles import Profile

# The modules that define profiles (and the table they are computed from), not the model.
DEFINERS = {"profiles.py", "kernels.py"}


def attributes_read_by_the_model() -> set[str]:
    root = Path(hypervisor.__file__).parent
    names: set[str] = set()
    for path in root.rglob("*.py"):
        if path.parent == root and path.name in DEFINERS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                names.add(node.attr)
    return names


def test_every_profile_field_is_read_by_the_model() -> None:
    read = attributes_read_by_the_model()
    unread = [f.name for f in fields(Profile) if f.name not in read]
    assert unread == [], f"Profile fields no module of the model reads: {unread}"
