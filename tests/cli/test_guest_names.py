"""Every command takes a bundled guest by name; a path still works (issue #9, item 6)."""

import json
import os
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from hypervisor.cli import main
from hypervisor.options import bundled_names, resolve_image
from hypervisor.sim import GUEST_IMAGES

SHORT = ["--cmdline", "pages=2 passes=2 spin=2000"]


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def elsewhere(tmp_path: Path) -> Iterator[Path]:
    """Run from a directory that has no guest_images/."""
    old = os.getcwd()
    os.chdir(tmp_path)
    yield tmp_path
    os.chdir(old)


@pytest.mark.parametrize("command", [["run"], ["run", "--ksm"], ["compare"], ["ksm"]])
@pytest.mark.parametrize("name", ["samepage", "samepage.bin"])
def test_every_command_takes_a_bundled_guest_by_name(elsewhere: Path, command: list[str], name: str) -> None:
    code, out, err = invoke(command[0], name, *command[1:], *SHORT, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["config"]["image"] == str(GUEST_IMAGES / "samepage.bin")


def test_a_path_still_works_and_wins_over_a_bundled_name(elsewhere: Path) -> None:
    (elsewhere / "hello").write_bytes(b"\xb0\x07\xe6\xf4\xf4")  # mov al,7; out 0xf4,al; hlt
    code, out, _ = invoke("run", "hello", "--json")
    assert code == 0 and json.loads(out)["vms"][0]["exit_status"] == 7
    code, out, _ = invoke("run", str(GUEST_IMAGES / "hello.bin"), "--json")
    assert code == 0 and "hello from hvsim" in json.loads(out)["vms"][0]["console"]


def test_an_unknown_name_lists_the_bundled_guests(elsewhere: Path) -> None:
    code, out, err = invoke("run", "samepgae")
    assert code == 3 and out == ""
    names = ", ".join(bundled_names())
    assert {"hello", "samepage", "cowstorm", "memtouch", "kernels"} <= set(bundled_names())
    assert err == ("hvsim: no guest image 'samepgae': it is not a file, nor the name of a bundled guest "
                   f"({names}; see `hvsim images`).\n")


def test_an_empty_image_name_is_refused(elsewhere: Path) -> None:
    code, _, err = invoke("run", "")
    assert code == 3 and err.startswith("hvsim: IMAGE is empty")


def test_a_bundled_source_file_is_not_an_image(elsewhere: Path) -> None:
    code, _, err = invoke("run", "samepage.S")
    assert code == 3 and "no guest image 'samepage.S'" in err


def test_a_missing_path_says_why_it_cannot_be_read(elsewhere: Path) -> None:
    code, _, err = invoke("run", "guest_images/nothere.bin")
    assert code == 3 and "cannot read guest image 'guest_images/nothere.bin': No such file or directory" in err


def test_images_tells_how_to_run_a_guest_by_name() -> None:
    code, out, _ = invoke("images")
    assert code == 0 and "hvsim run NAME" in out


def help_examples() -> list[list[str]]:
    out = []
    for command in [main, *main.commands.values()]:
        for line in (command.help or "").splitlines():
            if not line.strip().startswith("hvsim "):
                continue
            words = shlex.split(line.split("  #")[0].split("&&")[0])
            if len(words) > 2 and words[1] in ("run", "compare", "ksm"):
                out.append(words[1:])
    return out


def test_every_help_example_names_an_image_that_exists_from_any_directory(elsewhere: Path) -> None:
    examples = help_examples()
    assert len(examples) >= 8
    for words in examples:
        command = main.commands[words[0]]
        ctx = command.make_context(words[0], list(words[1:]))  # the options parse
        image = ctx.params["image"]
        if image is not None and not image.endswith(".elf"):  # build-guest's own output aside
            assert Path(resolve_image(image)).is_file(), words
