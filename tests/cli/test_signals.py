"""CLI tests: SIGINT stops any run, whatever the guest or the injection, and the report is still printed."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hypervisor.sim import GUEST_IMAGES


def interrupt(args: list[str]) -> tuple[int, str, str, float]:
    proc = subprocess.Popen([sys.executable, "-m", "hypervisor", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(2.5)  # well inside runs that take many seconds
    assert proc.poll() is None, "the run ended before it could be interrupted"
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    return proc.returncode, out, err, time.monotonic() - sent


@pytest.mark.parametrize("case", ["endless_loop", "fault_retry_storm"])
def test_sigint_stops_the_run_and_prints_what_it_reached(case: str, tmp_path: Path) -> None:
    if case == "endless_loop":
        img = tmp_path / "loop.bin"
        img.write_bytes(b"\xeb\xfe")
        args = ["run", str(img)]
    else:
        # ksmd woken inside every fault: the fault-retry storm of issue #9 item 2.
        args = ["run", str(GUEST_IMAGES / "samepage.bin"), "--vms", "2", "--ksm", "--ksm-sleep-ms", "0",
                "--profile", "3.7", "--cmdline", "pages=4 passes=100000 spin=2000",
                "--inject", "after_gfn_to_pfn:ksm_scan@all"]
    code, out, err, took = interrupt(args)
    assert code == 130, err
    assert "INTERRUPTED" in out and "kvm_exit(" in out
    assert "Traceback" not in err
    assert took < 10
