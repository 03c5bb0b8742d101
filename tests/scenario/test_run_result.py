"""What a run's result (sim.py's RunResult) carries when a run is checked, injected into, or stopped early,
and the scheduler's configuration checks that no other test reaches."""

from pathlib import Path

import pytest

from hypervisor.errors import ConfigError
from hypervisor.kvm.mmu_interface import IgnoreMmuNotifierRetry
from hypervisor.sim import KsmConfig, SimConfig, Simulation, host_memory_bytes, validate

from .guests import flat_guest, image

# mov rax, [0x200000]; hlt: one read of an untouched page (the guest's 5th EPT violation)
READ_ONE = bytes.fromhex("488b042500002000") + b"\xf4"


def test_a_checked_run_with_injected_races_reports_both_in_its_json(tmp_path: Path) -> None:
    spec = "after_gfn_to_pfn:age@all"
    sim = Simulation(SimConfig(image=flat_guest(tmp_path, "read_one", READ_ONE), inject=(spec,)), check=True)
    d = sim.run().as_dict()
    assert d["check"]["violation"] is None and d["check"]["checks_passed"] > 0
    assert d["injected"] == {spec: 5}  # every EPT violation of the guest
    assert "interrupted" not in d


def test_a_violation_found_by_check_is_one_of_the_run_errors(tmp_path: Path) -> None:
    sim = Simulation(SimConfig(image=flat_guest(tmp_path, "read_one", READ_ONE), profile="3.7",
                               inject=("after_gfn_to_pfn:cow@5",)), check=True)
    sim.vms[0].mmu.hooks = IgnoreMmuNotifierRetry(sim.vms[0].mmu.hooks)
    result = sim.run()
    assert result.violation is not None and result.errors == [result.violation]
    assert result.as_dict()["check"]["violation"] == result.violation


def test_a_run_stopped_after_its_first_time_slice_says_so_and_keeps_what_it_measured() -> None:
    sim = Simulation(SimConfig(image=image("samepage.bin"), cmdline="pages=4 passes=50 spin=20000",
                               ksm=KsmConfig(enabled=True)))

    def stop(s: Simulation) -> None:
        s.interrupted = True

    sim.on_slice.append(stop)
    result = sim.run()
    assert result.interrupted and result.as_dict()["interrupted"] is True
    assert result.sim_insns == sim.config.quantum
    assert result.vms[0].state == "runnable" and result.vms[0].exits["EPT_VIOLATION"] > 0


def test_host_memory_falls_back_to_16_gib_when_the_os_will_not_say(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_sysconf(name: str) -> int:
        raise ValueError(name)

    monkeypatch.setattr("hypervisor.config.os.sysconf", no_sysconf)
    assert host_memory_bytes() == 16 << 30


@pytest.mark.parametrize(("ksm", "option"), [(KsmConfig(enabled=True, run=3), "--ksm-run 3"),
                                             (KsmConfig(enabled=True, run_at=((10, 3),)), "--ksm-run-at 10:3")])
def test_a_ksm_run_value_run_does_not_take_is_a_config_error_naming_the_option(ksm: KsmConfig, option: str) -> None:
    # The CLI refuses --ksm-run 3 itself (a click choice); validate() says it for API callers too.
    with pytest.raises(ConfigError, match=rf"{option}: .*run takes 0 \(stop\), 1 \(run\) or 2"):
        validate(SimConfig(image=image("hello.bin"), ksm=ksm))


def test_a_livelocked_run_names_the_livelock_in_its_json() -> None:
    # Every fault zapped between gfn_to_pfn and the retry check: no fault ever completes.
    sim = Simulation(SimConfig(image=image("hello.bin"), inject=("after_gfn_to_pfn:invalidate_range@all",)))
    d = sim.run().as_dict()
    assert "livelock" in d["livelock"] and d["vms"][0]["state"] == "failed"
