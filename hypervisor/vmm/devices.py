"""The VMM's legacy port devices (COM1, the isa-debug-exit port) on its port I/O bus, apart from KVM's vCPU.

As in Firecracker (its legacy devices live in the VMM, and a vCPU thread that gets
KVM_EXIT_IO hands the access to the VMM's `io_bus`): kvm/vcpu.py counts the
IO_INSTRUCTION exit and passes the access to the bus attached to it, which finds the
device whose port range holds the port.  A port no device decodes reads as all ones
(the ISA bus floats high) and ignores writes.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .console import Console
from .layout import COM1_PORT, EXIT_PORT

COM1_PORTS = 8  # a 16550A UART decodes 8 ports from its base
UART_THR = 0  # transmitter holding register (a write sends the byte)
UART_LSR = 5  # line status register
LSR_THR_EMPTY = 0x60  # transmitter idle: a guest that polls before writing may write


def floating(size: int) -> int:
    """What an IN from a port nothing decodes reads."""
    return (1 << (8 * size)) - 1


class PortDevice(Protocol):
    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class PortBus:
    """Port ranges -> devices (Firecracker's `Bus`, for the PIO address space)."""

    def __init__(self) -> None:
        # Every decoded port -> (offset in its device's range, the device): the few ports of legacy
        # devices, looked up once per port access (a guest's console is one access per byte).
        self._decode: dict[int, tuple[int, PortDevice]] = {}

    def insert(self, base: int, length: int, device: PortDevice) -> None:
        if any(port in self._decode for port in range(base, base + length)):
            raise ValueError(f"ports {base:#x}+{length} overlap a device already on the bus")
        for port in range(base, base + length):
            self._decode[port] = (port - base, device)

    def _find(self, port: int) -> tuple[int, PortDevice] | None:
        return self._decode.get(port)

    def pio_read(self, port: int, size: int) -> int:
        found = self._find(port)
        return floating(size) if found is None else found[1].read(found[0], size)

    def pio_write(self, port: int, size: int, value: int) -> None:
        found = self._find(port)
        if found is not None:
            found[1].write(found[0], size, value)


class Serial:
    """COM1 as a polling guest sees it: a byte written to THR goes to the console; LSR always says idle.

    Simplification: no receive side, no interrupts, no divisor latch; the other
    registers read as an undecoded port does.
    """

    def __init__(self, console: Console) -> None:
        self.console = console

    def read(self, offset: int, size: int) -> int:
        return LSR_THR_EMPTY if offset == UART_LSR else floating(size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == UART_THR:
            self.console.write(value & 0xFF)


class DebugExit:
    """QEMU's isa-debug-exit: the byte written ends the VM with that status (`on_exit`)."""

    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self._on_exit = on_exit

    def read(self, offset: int, size: int) -> int:
        return floating(size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._on_exit(value & 0xFF)


@dataclass
class LegacyDevices:
    """One VM's port devices and the bus they sit on."""

    bus: PortBus
    console: Console


def legacy_devices(on_exit: Callable[[int], None]) -> LegacyDevices:
    """COM1 at 0x3F8 and the exit port at 0xF4 on a new bus; on_exit(status) ends the VM."""
    console = Console()
    bus = PortBus()
    bus.insert(COM1_PORT, COM1_PORTS, Serial(console))
    bus.insert(EXIT_PORT, 1, DebugExit(on_exit))
    return LegacyDevices(bus, console)


__all__ = ["DebugExit", "LegacyDevices", "PortBus", "PortDevice", "Serial", "legacy_devices"]
