"""The bundled C workloads, built from source in the test run: their console output, computed independently."""

from hypervisor.sim import KsmConfig
from tests.scenario.guests import image, run

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def xorshift64(x: int) -> int:
    x ^= (x << 13) & MASK64
    x ^= x >> 7
    x ^= (x << 17) & MASK64
    return x


def test_every_c_guest_builds_and_exits_zero_with_its_defaults(c_guests: dict[str, str]) -> None:
    assert set(c_guests) == {"bootstorm", "forkserver", "kvstore", "samepage_c", "procs", "ptwrite"}
    for name in ("forkserver", "kvstore", "samepage_c", "procs", "ptwrite"):
        vm = run(c_guests[name]).vms[0]
        assert (vm.state, vm.exit_status) == ("exited", 0), (name, vm.console, vm.error)


def test_samepage_in_c_prints_the_same_checksums_as_samepage_in_assembly(c_guests: dict[str, str]) -> None:
    for cmdline in ("pages=64 passes=3 spin=100", "pages=7 pattern=0x1ff passes=2 spin=0", "pages=100000"):
        c_vm = run(c_guests["samepage_c"], cmdline=cmdline).vms[0]
        asm_vm = run(image("samepage.bin"), cmdline=cmdline).vms[0]
        assert c_vm.console == asm_vm.console and c_vm.console
        assert c_vm.exit_status == asm_vm.exit_status


def kvstore_model(keys: int, ops: int, get_pct: int, value_size: int, zipf: int, seed: int) -> str:
    """kvstore.c's output, from a Python model of its hash table and PRNG."""
    state = seed

    def splitmix64() -> int:
        nonlocal state
        state = (state + GOLDEN) & MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    vq = (value_size + 7) // 8
    cdf, total = [], 0
    for r in range(keys):
        total += (1 << 40) // (r + 1)
        cdf.append(total)
    values: dict[int, list[int]] = {}
    gets = puts = hits = checksum = 0
    for op in range(ops):
        x = splitmix64()
        if zipf:
            target = x % total
            key = next(r for r in range(keys) if cdf[r] > target)
        else:
            key = x % keys
        if splitmix64() % 100 < get_pct:
            gets += 1
            if key in values:
                hits += 1
                checksum = (checksum + sum(values[key])) & MASK64
        else:
            puts += 1
            values[key] = [((key << 32) ^ ((op * GOLDEN) & MASK64) ^ i) for i in range(vq)]
    return f"kvstore: keys={keys} ops={ops} gets={gets} puts={puts} hits={hits} checksum {checksum:016x}\n"


def test_kvstore_output_matches_a_model_of_its_table_uniform_and_zipfian(c_guests: dict[str, str]) -> None:
    for zipf in (0, 1):
        params = {"keys": 200, "ops": 3000, "get_pct": 70, "value_size": 20, "zipf": zipf, "seed": 7}
        cmdline = " ".join(f"{k}={v}" for k, v in params.items())
        vm = run(c_guests["kvstore"], cmdline=cmdline).vms[0]
        assert vm.console == kvstore_model(**params)
        assert vm.exit_status == 0


def test_kvstore_zipfian_keys_hit_more_than_uniform_keys(c_guests: dict[str, str]) -> None:
    hits = {}
    for zipf in (0, 1):
        console = run(c_guests["kvstore"], cmdline=f"keys=1000 ops=4000 zipf={zipf}").vms[0].console
        hits[zipf] = int(console.split("hits=")[1].split()[0])
    assert hits[1] > hits[0]


def test_forkserver_children_see_private_copies_and_the_parent_is_untouched(c_guests: dict[str, str]) -> None:
    pages, children, write_pct = 32, 3, 40
    vm = run(c_guests["forkserver"], cmdline=f"pages={pages} children={children} write_pct={write_pct}",
             quantum=1_000).vms[0]
    base = [(((i + 1) * GOLDEN) & MASK64, ((i + 1) * GOLDEN & MASK64) ^ 1) for i in range(pages)]
    parent = sum(q0 + q1 for q0, q1 in base) & MASK64
    expected, total = [], 0
    for c in range(children):
        rng, wrote, checksum = ((c + 1) * 0x2545F4914F6CDD1D) & MASK64, 0, 0
        for i in range(pages):
            rng = xorshift64(rng)
            q1 = base[i][1]
            if rng % 100 < write_pct:
                q1, wrote = rng, wrote + 1
            checksum = (checksum + base[i][0] + q1) & MASK64
        total += wrote
        expected.append(f"forkserver: child {c + 1} wrote {wrote} pages copied {wrote} checksum {checksum:016x}\n")
    expected.append(f"forkserver: parent checksum {parent:016x} copies {total}\n")
    assert vm.console == "".join(expected)
    assert vm.exit_status == 0


def test_bootstorm_vms_load_the_same_image_then_diverge_and_ksm_merges_them(c_guests: dict[str, str]) -> None:
    result = run(c_guests["bootstorm"], vms=2, cmdline="image=64 diverge=2 passes=6 spin=20000",
                 ksm=KsmConfig(enabled=True, sleep_millisecs=0, pages_to_scan=1000))
    x, image_sum = 0x2545F4914F6CDD1D, 0
    for _ in range(64 * 512):
        x = xorshift64(x)
        image_sum = (image_sum + x) & MASK64
    lines = [vm.console.splitlines() for vm in result.vms]
    for vm_lines in lines:
        assert vm_lines[0] == f"bootstorm: booted 64 pages image {image_sum:016x}"
        assert len(vm_lines) == 7
    assert lines[0][1:] != lines[1][1:]  # seeded by the VM index: they diverge
    assert result.ksm is not None and result.ksm["pages_sharing"] > 32


def test_guest_exceptions_do_not_depend_on_where_time_slices_end(c_guests: dict[str, str]) -> None:
    # forkserver takes a #PF per copied page and switches CR3 per child: same counts at any --quantum.
    runs = [run(c_guests["forkserver"], cmdline="pages=16 children=2 write_pct=50", quantum=q).vms[0]
            for q in (10_000, 7, 1)]
    assert len({(vm.console, vm.insns, tuple(sorted(vm.exits.items()))) for vm in runs}) == 1


def procs_model(n: int, s: int, a: int, p: int, rounds: int) -> str:
    """procs.c's output, computed independently: shared qwords are 0x5a bytes, private ones count up."""
    out, total = [], 0
    for r in range(1, rounds + 1):
        total_round = 0
        for q in range(n):
            total_round += a * s * 0x5A5A5A5A5A5A5A5A
            total_round += sum(((q * p + i + 1) * GOLDEN & MASK64) + r for i in range(p))
        out.append(f"procs: round {r} checksum {total_round & MASK64:016x}\n")
        total += total_round
    return "".join(out) + f"procs: done procs={n} shared={s} aliases={a} checksum {total & MASK64:016x}\n"


def ptwrite_model(pages: int, rounds: int) -> str:
    """ptwrite.c's output, computed independently (qword 0 of frame f is (f+1) * GOLDEN)."""
    def q0(f: int) -> int:
        return ((f % pages) + 1) * GOLDEN & MASK64

    out, total = [], 0
    for r in range(rounds):
        s = sum(q0(i + r) for i in range(pages)) + sum(q0(i + r + 1) for i in range(pages)) + q0(r)
        out.append(f"ptwrite: round {r + 1} checksum {s & MASK64:016x} faults {r + 1}\n")
        total += s
    done = f"ptwrite: done pages={pages} rounds={rounds} checksum {total & MASK64:016x} faults {rounds}\n"
    return "".join(out) + done


def test_procs_and_ptwrite_print_what_a_model_of_them_computes(c_guests: dict[str, str]) -> None:
    for mmu in ("tdp", "shadow"):
        vm = run(c_guests["procs"], cmdline="procs=3 shared=5 aliases=3 private=2 rounds=3 spin=10", mmu=mmu).vms[0]
        assert vm.console == procs_model(3, 5, 3, 2, 3) and vm.exit_status == 0
        vm = run(c_guests["ptwrite"], cmdline="pages=5 rounds=3", mmu=mmu).vms[0]
        assert vm.console == ptwrite_model(5, 3) and vm.exit_status == 0
