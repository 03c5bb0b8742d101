"""CLI tests: SIGINT stops any run, whatever the guest or the injection, and the report is still printed."""

import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hypervisor.sim import GUEST_IMAGES


def interrupt(args: list[str]) -> tuple[int, str, str, float]:
    """Run hvsim with stderr on a terminal, as a user does, and press Ctrl-C once its progress line shows."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "hypervisor", *args], stdout=subprocess.PIPE,
                            stderr=slave, text=True)
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 60
    while b" insns " not in seen:  # the progress line: the run is under way
        assert time.monotonic() < deadline and proc.poll() is None, seen.decode(errors="replace")
        if select.select([master], [], [], 0.5)[0]:
            seen += os.read(master, 4096)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    while select.select([master], [], [], 0.2)[0]:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    return proc.returncode, out, seen.decode(errors="replace"), took


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
