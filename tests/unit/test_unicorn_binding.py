"""cpu/binding.py: the private-binding plumbing runs only on the Unicorn it was written for."""

from collections.abc import Iterator

import pytest
import unicorn

from hypervisor.cpu import binding
from hypervisor.errors import UnsupportedUnicorn


@pytest.fixture
def fresh_check() -> Iterator[None]:
    binding.unicorn_version_problem.cache_clear()
    yield
    binding.unicorn_version_problem.cache_clear()


def test_the_installed_unicorn_is_the_one_the_binding_module_was_written_for(fresh_check: None) -> None:
    assert unicorn.__version__ == binding.UNICORN_VERSION
    assert binding.unicorn_version_problem() is None
    binding.new_x86_64()


def test_another_unicorn_is_refused_with_a_message_that_says_what_to_install(
        fresh_check: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(unicorn, "__version__", "2.2.0")
    with pytest.raises(UnsupportedUnicorn) as err:
        binding.new_x86_64()
    message = str(err.value)
    assert "binding is 2.2.0" in message and f"pip install unicorn=={binding.UNICORN_VERSION}" in message
    assert err.value.exit_code == 69


def test_a_library_of_another_version_is_refused_even_under_the_right_binding(
        fresh_check: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(unicorn, "uc_version", lambda: (2, 2, 0x020200FF))
    with pytest.raises(UnsupportedUnicorn, match=r"libunicorn is 2\.2"):
        binding.require_unicorn()


def test_hvsim_run_under_another_unicorn_is_one_line_and_exit_69(
        fresh_check: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from hypervisor.cli import main

    monkeypatch.setattr(unicorn, "__version__", "2.2.0")
    result = CliRunner().invoke(main, ["run", "hello"])
    assert result.exit_code == 69
    assert result.output.startswith("hvsim: the installed Unicorn Python binding is 2.2.0, but hvsim's CPU model")
    assert "Traceback" not in result.output


# mov al, 0x41; out 0xf4, al; mov al, 0x42; out 0xf4, al; hlt
_TWO_OUTS = bytes.fromhex("b041" "e6f4" "b042" "e6f4" "f4")


def _scratch_uc() -> unicorn.Uc:
    uc = binding.new_x86_64()
    uc.mem_map(0, 0x10000)
    uc.mem_write(0x1000, _TWO_OUTS)
    return uc


def test_the_raw_out_hook_sees_every_port_write_with_its_port_size_and_value() -> None:
    uc = _scratch_uc()
    seen: list[tuple[int, int, int]] = []
    callback = binding.add_out_hook(uc, lambda port, size, value: seen.append((port, size, value)))
    assert binding.emu_start(uc, 0x1000, 0x1000 + len(_TWO_OUTS) - 1) is None
    assert seen == [(0xF4, 1, 0x41), (0xF4, 1, 0x42)]
    del callback


def test_an_exception_in_the_raw_out_hook_stops_the_run_and_is_raised_as_the_binding_raises_its_own() -> None:
    uc = _scratch_uc()
    seen: list[int] = []

    def out(port: int, size: int, value: int) -> None:
        seen.append(value)
        raise ValueError(f"the device broke at {value:#x}")

    callback = binding.add_out_hook(uc, out)
    with pytest.raises(ValueError, match="the device broke at 0x41"):  # the first exception is the one kept
        binding.emu_start(uc, 0x1000, 0x1000 + len(_TWO_OUTS) - 1)
    assert seen[0] == 0x41  # (Unicorn sees the stop request at its next check: the block may go on)
    del callback


def test_the_raw_tlb_flush_makes_the_next_access_to_a_page_take_a_tlb_fill_again() -> None:
    uc = binding.new_x86_64()
    uc.ctl_set_tlb_mode(unicorn.UC_TLB_VIRTUAL)
    uc.mem_map(0, 0x10000)
    uc.mem_write(0x1000, bytes.fromhex("f4"))  # hlt
    fills: list[int] = []

    def fill(vaddr: int, access: int, entry: object) -> bool:
        fills.append(vaddr & ~0xFFF)
        entry.paddr = vaddr & ~0xFFF  # type: ignore[attr-defined]
        entry.perms = unicorn.UC_PROT_ALL  # type: ignore[attr-defined]
        return True

    callback = binding.add_tlb_fill_hook(uc, fill)
    binding.emu_start(uc, 0x1000, 0x1001)
    binding.emu_start(uc, 0x1000, 0x1001)
    assert fills.count(0x1000) == 1  # the second run hit Unicorn's TLB
    binding.tlb_flusher(uc)()
    binding.emu_start(uc, 0x1000, 0x1001)
    assert fills.count(0x1000) == 2
    del callback
