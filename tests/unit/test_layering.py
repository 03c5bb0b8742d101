"""The layering of DESIGN.md, checked on the imports of every module: who may import unicorn, the VMM, the host."""

import ast
from pathlib import Path

import hypervisor

ROOT = Path(hypervisor.__file__).parent


def imports_of(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved against its package)."""
    package = path.relative_to(ROOT.parent).with_suffix("").parts[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            out.add(module)
            out |= {f"{module}.{alias.name}" for alias in node.names}
    return out


def modules(under: str = "") -> dict[str, set[str]]:
    return {str(p.relative_to(ROOT)): imports_of(p) for p in sorted((ROOT / under).rglob("*.py"))}


def test_only_cpu_imports_unicorn() -> None:
    offenders = [name for name, imps in modules().items()
                 if not name.startswith("cpu/") and any(i == "unicorn" or i.startswith("unicorn.") for i in imps)]
    assert offenders == []


def test_only_the_binding_module_reaches_into_unicorns_private_binding() -> None:
    offenders = [name for name, imps in modules("cpu").items()
                 if name != "cpu/binding.py" and any(i.startswith("unicorn.unicorn_py3") for i in imps)]
    assert offenders == []


def test_kvm_knows_the_vmm_only_through_the_port_bus_protocol() -> None:
    offenders = [name for name, imps in modules("kvm").items()
                 if any(i.startswith(("hypervisor.vmm", "hypervisor.cpu", "hypervisor.sim")) for i in imps)]
    assert offenders == []


def test_host_never_imports_kvm_cpu_vmm_or_the_simulation() -> None:
    banned = ("hypervisor.kvm", "hypervisor.cpu", "hypervisor.vmm", "hypervisor.sim", "hypervisor.cli")
    offenders = [name for name, imps in modules("host").items() if any(i.startswith(banned) for i in imps)]
    assert offenders == []
