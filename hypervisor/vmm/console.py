"""The VMM's COM1 console: what a guest writes to port 0x3F8, kept bounded, optionally streamed to a file.

A guest that writes in a loop must not grow hvsim's memory without limit, so the
console keeps its first HEAD_BYTES and its last TAIL_BYTES and counts the bytes in
between that it dropped; `--console FILE` streams every byte to a file as well.
"""

from typing import BinaryIO, Final

HEAD_BYTES: Final = 64 << 10
TAIL_BYTES: Final = 64 << 10


class Console:
    def __init__(self) -> None:
        self.head = bytearray()
        self._tail = bytearray()
        self.total = 0
        self.stream: BinaryIO | None = None
        self.stream_error: OSError | None = None

    def write(self, byte: int) -> None:
        self.total += 1
        if len(self.head) < HEAD_BYTES:
            self.head.append(byte)
        else:
            tail = self._tail
            tail.append(byte)
            if len(tail) >= 2 * TAIL_BYTES:
                del tail[:-TAIL_BYTES]  # amortised: one move per TAIL_BYTES bytes
        if self.stream is not None:
            try:
                self.stream.write(bytes((byte,)))
            except OSError as err:  # a full disk must not end the run: the report says so after it
                self.stream_error, self.stream = err, None

    @property
    def tail(self) -> bytes:
        return bytes(self._tail[-TAIL_BYTES:])

    @property
    def dropped(self) -> int:
        return self.total - len(self.head) - len(self.tail)

    def text(self) -> str:
        """What the report shows: the head, a line saying how much was dropped, the tail."""
        out = self.head.decode("utf-8", "replace")
        if self.dropped:
            out += f"\n[hvsim: {self.dropped} bytes of console output dropped here]\n"
        return out + self.tail.decode("utf-8", "replace")

    def __bytes__(self) -> bytes:
        return bytes(self.head) + self.tail


def console_paths(path: str, vms: int) -> list[str]:
    """Where `--console PATH` streams each VM's console: PATH itself for one VM, else PATH.vm0, PATH.vm1, ..."""
    return [path] if vms == 1 else [f"{path}.vm{i}" for i in range(vms)]


__all__ = ["HEAD_BYTES", "TAIL_BYTES", "Console", "console_paths"]
