"""Issue #9 item 3 end to end: host events fired right after every replace_page of a real
two-VM samepage run, under --check, in every profile."""

import pytest

from hypervisor.profiles import PROFILES
from hypervisor.sim import KsmConfig, SimConfig, Simulation

from .guests import image

# The command: hvsim run samepage.bin --vms 2 --ksm --ksm-sleep-ms 0
#   --cmdline 'pages=4 passes=3 spin=2000' --inject ksm_after_replace_page:EVENT@all --check
CMDLINE = "pages=4 passes=3 spin=2000"


def _run(profile: str, event: str) -> Simulation:
    cfg = SimConfig(image=image("samepage.bin"), vms=2, profile=profile, cmdline=CMDLINE,
                    ksm=KsmConfig(enabled=True, sleep_millisecs=0),
                    inject=(f"ksm_after_replace_page:{event}@all",))
    return Simulation(cfg, check=True)


@pytest.mark.parametrize("profile", list(PROFILES))
def test_a_vmm_write_after_every_replace_page_never_leaves_a_ksm_page_writable_or_a_frame_dirty(
    profile: str,
) -> None:
    result = _run(profile, "cow").run()
    assert result.violation is None and not result.errors
    assert result.injected and result.injected["ksm_after_replace_page:cow@all"] > 0
    for vm in result.vms:
        assert vm.state == "exited" and vm.exit_status == 0
        assert vm.console.count("checksum 6969696969696968") == 3  # 4 * 0x5a5a... mod 2^64


@pytest.mark.parametrize("profile", list(PROFILES))
def test_madv_dontneed_after_every_replace_page_breaks_no_invariant(profile: str) -> None:
    # The guests' page-table pages are identical too, so they merge and are then dropped: the
    # guests may crash (that is what MADV_DONTNEED of guest RAM does), but no invariant breaks.
    result = _run(profile, "invalidate_range").run()
    assert result.violation is None
    assert result.injected and result.injected["ksm_after_replace_page:invalidate_range@all"] > 0
