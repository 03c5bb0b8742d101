"""Unit tests of the VMM's bounded COM1 console (vmm/console.py)."""

import io

from hypervisor.vmm.console import HEAD_BYTES, TAIL_BYTES, Console, console_paths


def fill(console: Console, data: bytes) -> None:
    for b in data:
        console.write(b)


def test_short_output_is_kept_whole() -> None:
    c = Console()
    fill(c, b"hello\n")
    assert (c.text(), c.dropped, bytes(c)) == ("hello\n", 0, b"hello\n")


def test_long_output_keeps_head_and_tail_and_counts_what_it_dropped() -> None:
    data = bytes(i % 251 for i in range(HEAD_BYTES + TAIL_BYTES + 12345))
    c = Console()
    fill(c, data)
    assert c.dropped == 12345 and c.total == len(data)
    assert bytes(c) == data[:HEAD_BYTES] + data[-TAIL_BYTES:]
    assert "[hvsim: 12345 bytes of console output dropped here]" in c.text()


def test_memory_stays_bounded_however_much_the_guest_writes() -> None:
    c = Console()
    fill(c, b"x" * (HEAD_BYTES + 10 * TAIL_BYTES))
    assert len(c.head) == HEAD_BYTES and len(c._tail) < 2 * TAIL_BYTES


def test_stream_gets_every_byte() -> None:
    c = Console()
    sink = io.BytesIO()
    c.stream = sink
    data = b"y" * (HEAD_BYTES + TAIL_BYTES + 7)
    fill(c, data)
    assert sink.getvalue() == data


def test_a_failing_stream_is_dropped_and_its_error_kept() -> None:
    class Full(io.RawIOBase):
        def write(self, _b: object) -> int:
            raise OSError(28, "No space left on device")

    c = Console()
    c.stream = Full()  # type: ignore[assignment]
    fill(c, b"abc")
    assert c.stream is None and c.stream_error is not None and c.text() == "abc"


def test_console_paths_name_one_file_per_vm() -> None:
    assert console_paths("out.txt", 1) == ["out.txt"]
    assert console_paths("out.txt", 3) == ["out.txt.vm0", "out.txt.vm1", "out.txt.vm2"]
