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
