"""`hvsim images`: guests and their parameters read from the header comments of assembly and C sources."""

from pathlib import Path

from hypervisor.guest.catalog import bundled_guests
from hypervisor.sim import GUEST_IMAGES


def test_a_c_guest_is_listed_from_its_comment_block_with_its_elf_image(tmp_path: Path) -> None:
    (tmp_path / "demo.c").write_text(
        "/* demo - a demonstration guest that\n"
        " * spans two lines.\n"
        " *\n"
        " * Command-line parameters:\n"
        " *   pages=N      pages to touch          (default 16)\n"
        " *   seed=S       PRNG seed               (default 0x5)\n"
        " */\n"
        "#include <hvsim.h>\n"
        "/*   late=1   not a parameter (default 9) */\n")
    (tmp_path / "lib.S").write_text("# lib.S - not a guest\n")
    [guest] = bundled_guests(tmp_path)
    assert guest.name == "demo" and guest.image == tmp_path / "demo.elf"
    assert guest.summary == "a demonstration guest that spans two lines."
    assert guest.params == (("pages", "16", "pages to touch"), ("seed", "0x5", "PRNG seed"))


def test_the_bundled_c_guests_are_listed_with_their_committed_images() -> None:
    guests = {g.name: g for g in bundled_guests(GUEST_IMAGES)}
    for name in ("kvstore", "forkserver", "bootstorm", "samepage_c"):
        assert guests[name].image.suffix == ".elf" and guests[name].image.is_file()
        assert guests[name].params
    assert [p[0] for p in guests["kvstore"].params] == ["keys", "ops", "get_pct", "value_size", "zipf", "seed"]
