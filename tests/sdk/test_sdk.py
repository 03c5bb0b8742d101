"""The guest SDK (hvsim.h): what guests built with `hvsim build-guest` see, and how the build reports failures."""

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from click.testing import CliRunner

from hypervisor.cli import main
from hypervisor.guest.build import SDK_DIR
from tests.checkout import copy_checkout
from tests.scenario.guests import run

from .conftest import build_program

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_a_null_dereference_gets_the_idt_message_and_status(tmp_path: Path) -> None:
    img = build_program(tmp_path, "null", '#include <hvsim.h>\n'
                        'int main(void) { volatile int *p = 0; hv_puts("before\\n"); return *p; }\n')
    vm = run(img).vms[0]
    lines = vm.console.splitlines()
    assert lines[0] == "before"
    assert lines[1].startswith("hvsim guest: #PF page fault (vector 14) at RIP 0x")
    assert lines[1].endswith(", CR2 0x0, error code 0x0")
    assert vm.state == "exited" and vm.exit_status == 128 + 14
    assert vm.exits.get("TRIPLE_FAULT", 0) == 0


def test_a_write_to_a_read_only_mapping_reports_cr2_and_a_present_write_error_code(tmp_path: Path) -> None:
    img = build_program(tmp_path, "ro", """#include <hvsim.h>
int main(void)
{
    unsigned long va = HV_USER_BASE + 5 * HV_PAGE_SIZE;
    hv_printf("map %d\\n", hv_map(va, (unsigned long)hv_heap(), 0));
    hv_printf("read %lu\\n", *(volatile unsigned long *)va);
    *(volatile unsigned long *)va = 1;
    return 0;
}
""")
    vm = run(img).vms[0]
    lines = vm.console.splitlines()
    assert lines[:2] == ["map 0", "read 0"]
    assert lines[2].endswith(", CR2 0x40005000, error code 0x3")
    assert vm.exit_status == 142


def test_a_handler_resumes_the_guest_and_repeated_divide_errors_stay_divide_errors(tmp_path: Path) -> None:
    # QEMU would turn the second #DE into #DF if hvsim did not reset its old_exception after delivery.
    img = build_program(tmp_path, "de", """#include <hvsim.h>
static volatile int seen;
static void on_de(hv_frame *f) { seen++; f->rip += 2; f->rax = 1000 + f->vector; }
int main(void)
{
    hv_set_handler(0, on_de);
    for (int i = 0; i < 3; i++) {
        unsigned long q;
        __asm__ volatile("xor %%ecx, %%ecx\\n\\tdiv %%ecx" : "=a"(q) : "a"(7UL), "d"(0UL) : "rcx");
        hv_printf("div %d gave %lu\\n", i, q);
    }
    hv_printf("handled %d\\n", seen);
    __asm__ volatile("ud2");
    return 0;
}
""")
    vm = run(img).vms[0]
    lines = vm.console.splitlines()
    assert lines[:4] == ["div 0 gave 1000", "div 1 gave 1000", "div 2 gave 1000", "handled 3"]
    assert lines[4].startswith("hvsim guest: #UD invalid opcode (vector 6) at RIP 0x")
    assert vm.exit_status == 128 + 6


def test_hv_printf_formats_widths_zero_padding_and_left_alignment(tmp_path: Path) -> None:
    img = build_program(tmp_path, "fmt", r"""#include <hvsim.h>
int main(void)
{
    int n = hv_printf("[%d|%5d|%-5d|%05d|%d]", 42, -42, 7, -42, 0);
    hv_printf(" %d\n", n);
    hv_printf("[%u|%x|%08x|%lx|%lu|%ld|%-6lx]\n", 4000000000u, 0xbeefu, 0xbeefu, 0xfedcba9876543210ul,
              18446744073709551615ul, -9223372036854775807l - 1, 0xabul);
    hv_printf("[%s|%8s|%-8s|%c|%3c|%p|%%|%s]\n", "str", "right", "left", 'x', 'y', (void *)0x1234, (char *)0);
    return 0;
}
""")
    assert run(img).vms[0].console == (
        "[42|  -42|7    |-0042|0] 24\n"
        "[4000000000|beef|0000beef|fedcba9876543210|18446744073709551615|-9223372036854775808|ab    ]\n"
        "[str|   right|left    |x|  y|0x1234|%|(null)]\n")


def test_hv_param_reads_the_command_line_with_the_assembly_guests_rules(tmp_path: Path) -> None:
    img = build_program(tmp_path, "param", r"""#include <hvsim.h>
int main(void)
{
    const char *keys[] = {"a", "b", "c", "d", "e", "f", "missing", "ab"};
    for (int i = 0; i < 8; i++)
        hv_printf("%s=%lx\n", keys[i], hv_param(keys[i], 0x99));
    hv_printf("vm %u mem %lu heap %p size %lu\n", hv_vm_index(), hv_mem_size(), hv_heap(), hv_heap_size());
    return 0;
}
""")
    cmdline = "a=10 b=0x1F c=12x c= d=5 d=0x e=0xffffffffffffffff1 f=3\tab=7 a=1 a=nope"
    vm = run(img, cmdline=cmdline, memory=32 << 20).vms[0]
    assert vm.console == ("a=1\nb=1f\nc=99\nd=5\ne=fffffffffffffff1\nf=3\nmissing=99\nab=7\n"
                          "vm 0 mem 33554432 heap 0x200000 size 31457280\n")


def test_address_spaces_are_separate_and_unmap_takes_a_mapping_away(tmp_path: Path) -> None:
    img = build_program(tmp_path, "as", r"""#include <hvsim.h>
int main(void)
{
    unsigned long frame = (unsigned long)hv_heap(), va = HV_USER_BASE;
    hv_as_t a = hv_new_address_space(), b = hv_new_address_space();
    hv_switch_address_space(a);
    hv_map(va, frame, HV_MAP_WRITE);
    hv_map(va + HV_PAGE_SIZE, frame + HV_PAGE_SIZE, HV_MAP_WRITE);
    *(unsigned long *)va = 0xaa;
    *(unsigned long *)(va + HV_PAGE_SIZE) = 0xbb;
    hv_switch_address_space(b);
    hv_map(va, frame + HV_PAGE_SIZE, 0); /* b sees a's second frame at the same va */
    hv_printf("b %lx\n", *(volatile unsigned long *)va);
    hv_switch_address_space(a);
    unsigned long seen = *(volatile unsigned long *)va;
    int first = hv_unmap(va), again = hv_unmap(va);
    hv_printf("a %lx unmap %d again %d bad %d\n", seen, first, again, hv_map(0x1000, frame, 0));
    return (int)*(volatile unsigned long *)va;
}
""")
    vm = run(img, quantum=100_000).vms[0]
    lines = vm.console.splitlines()
    assert lines[:2] == ["b bb", "a aa unmap 0 again -1 bad -1"]
    assert lines[2].endswith(", CR2 0x40000000, error code 0x0")


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_a_bad_c_program_gives_the_compilers_message(tmp_path: Path) -> None:
    src = tmp_path / "bad.c"
    src.write_text("#include <hvsim.h>\nint main(void) { return undefined_thing; }\n")
    code, _, err = invoke("build-guest", str(src), "-o", str(tmp_path / "bad.elf"))
    assert code == 9
    assert err.startswith("hvsim: the C compiler failed")
    assert "bad.c:2" in err and "undefined_thing" in err and "error" in err
    assert "Traceback" not in err
    assert not (tmp_path / "bad.elf").exists()


def test_a_missing_compiler_is_a_clear_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "ok.c"
    src.write_text("int main(void) { return 0; }\n")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    code, _, err = invoke("build-guest", str(src), "-o", str(tmp_path / "ok.elf"))
    assert code == 9
    assert "no C compiler" in err and "no-such-cc" in err and "install gcc or clang" in err


def test_build_guest_without_output_or_sources_says_what_to_give(tmp_path: Path) -> None:
    code, _, err = invoke("build-guest", str(tmp_path / "x.c"))
    assert code == 2 and "-o" in err
    code, _, err = invoke("build-guest", "-o", str(tmp_path / "x.elf"))
    assert code == 9 and "no source files" in err
    code, _, err = invoke("build-guest", str(tmp_path / "missing.c"), "-o", str(tmp_path / "x.elf"))
    assert code == 9 and "does not exist" in err


def test_print_include_dir_names_the_directory_of_hvsim_h() -> None:
    code, out, _ = invoke("build-guest", "--print-include-dir")
    assert code == 0 and Path(out.strip()) == SDK_DIR and (SDK_DIR / "hvsim.h").is_file()


def test_build_guest_works_from_a_non_editable_install_in_another_directory(tmp_path: Path) -> None:
    # A wheel built from this checkout, installed (not editable) into a fresh venv that sees the
    # test venv's dependencies; the guest is built and run from an unrelated directory.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=False, with_pip=False)
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = subprocess.run([str(env_dir / "bin" / "python"), "-c", purelib], capture_output=True, text=True,
                          check=True).stdout.strip()
    deps = [p for p in sys.path if p.endswith("site-packages")]
    Path(site, "deps.pth").write_text("\n".join(deps) + "\n")
    wheel_dir = tmp_path / "wheel"
    # Built from a copy: pip builds in the tree it is given, and a pure build there would delete the .so
    # files of a compiled build in the checkout.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                    str(wheel_dir), str(copy_checkout(tmp_path / "src"))], check=True, capture_output=True)
    wheel = next(wheel_dir.glob("hvsim-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, str(wheel)],
                   check=True, capture_output=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "prog.c").write_text('#include <hvsim.h>\nint main(void) { hv_printf("hi %d\\n", 42); return 3; }\n')
    hvsim = [str(env_dir / "bin" / "python"), "-m", "hypervisor"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    where = subprocess.run([*hvsim, "build-guest", "--print-include-dir"], cwd=work, env=env, capture_output=True,
                           text=True, check=True).stdout.strip()
    assert where.startswith(site) and not where.startswith(str(REPO_ROOT))
    built = subprocess.run([*hvsim, "build-guest", "prog.c", "-o", "prog.elf"], cwd=work, env=env,
                           capture_output=True, text=True, check=False)
    assert built.returncode == 0, built.stderr
    ran = subprocess.run([*hvsim, "run", "prog.elf", "--json"], cwd=work, env=env, capture_output=True, text=True,
                         check=False)
    assert '"console": "hi 42\\n"' in ran.stdout and '"exit_status": 3' in ran.stdout


def test_an_idt_whose_gate_is_not_present_is_a_triple_fault_naming_the_gate(tmp_path: Path) -> None:
    img = build_program(tmp_path, "gate", """#include <hvsim.h>
int main(void)
{
    struct { unsigned short limit; unsigned long base; } __attribute__((packed)) idtr = {0xfff, 0x300000};
    __asm__ volatile("lidt %0" : : "m"(idtr));
    return *(volatile int *)0;
}
""")
    vm = run(img).vms[0]
    assert vm.state == "shutdown" and vm.exits["TRIPLE_FAULT"] == 1
    assert vm.error is not None and "#PF page not present at gva 0x0 and IDT gate 14 is not present" in vm.error


def test_hvsim_images_lists_the_c_workloads_with_their_parameters() -> None:
    code, out, _ = invoke("images")
    assert code == 0
    for line in ("keys=4096 ops=50000 get_pct=90 value_size=64 zipf=1 seed=1", "pages=64 children=4 write_pct=25",
                 "image=256 diverge=4 passes=40 spin=200000", "kvstore.elf", "samepage_c.elf"):
        assert line in out


def test_a_guest_can_be_built_from_several_sources(tmp_path: Path) -> None:
    (tmp_path / "main.c").write_text('#include <hvsim.h>\nunsigned long twice(unsigned long);\n'
                                     'int main(void) { hv_printf("%lu\\n", twice(hv_param("n", 4))); return 0; }\n')
    (tmp_path / "twice.c").write_text("unsigned long twice(unsigned long x) { return 2 * x; }\n")
    code, out, err = invoke("build-guest", str(tmp_path / "main.c"), str(tmp_path / "twice.c"), "-o",
                            str(tmp_path / "two.elf"))
    assert code == 0, err
    assert "wrote" in out
    assert run(str(tmp_path / "two.elf"), cmdline="n=21").vms[0].console == "42\n"
