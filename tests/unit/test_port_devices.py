"""The VMM's port bus and legacy devices (vmm/devices.py), apart from the vCPU: no Unicorn."""

import pytest

from hypervisor.vmm.console import Console
from hypervisor.vmm.devices import LSR_THR_EMPTY, PortBus, Serial, legacy_devices
from hypervisor.vmm.layout import COM1_PORT, EXIT_PORT


def test_a_byte_written_to_com1_goes_to_the_console_and_its_lsr_says_idle() -> None:
    devices = legacy_devices(lambda status: None)
    for byte in b"hi\n":
        devices.bus.pio_write(COM1_PORT, 1, byte)
    assert bytes(devices.console) == b"hi\n"
    assert devices.bus.pio_read(COM1_PORT + 5, 1) == LSR_THR_EMPTY


def test_the_exit_port_ends_the_vm_with_the_byte_written() -> None:
    exits: list[int] = []
    devices = legacy_devices(exits.append)
    devices.bus.pio_write(EXIT_PORT, 1, 0x1FF)
    assert exits == [0xFF]


def test_a_port_no_device_decodes_floats_high_and_ignores_writes() -> None:
    devices = legacy_devices(lambda status: pytest.fail("no exit expected"))
    devices.bus.pio_write(0x80, 1, 0x12)
    assert [devices.bus.pio_read(0x80, size) for size in (1, 2, 4)] == [0xFF, 0xFFFF, 0xFFFF_FFFF]
    assert bytes(devices.console) == b""


def test_two_devices_cannot_decode_the_same_port() -> None:
    bus = PortBus()
    bus.insert(0x3F8, 8, Serial(Console()))
    with pytest.raises(ValueError, match="overlap"):
        bus.insert(0x3FF, 1, Serial(Console()))


def test_every_port_of_a_range_reaches_its_device_at_its_offset_and_the_ports_around_it_none() -> None:
    seen: list[tuple[int, int]] = []

    class Recorder:
        def read(self, offset: int, size: int) -> int:
            return offset

        def write(self, offset: int, size: int, value: int) -> None:
            seen.append((offset, value))

    bus = PortBus()
    bus.insert(0x2F8, 8, Recorder())
    for port in range(0x2F0, 0x308):
        bus.pio_write(port, 1, port & 0xFF)
    assert seen == [(port - 0x2F8, port & 0xFF) for port in range(0x2F8, 0x300)]
    assert [bus.pio_read(port, 1) for port in (0x2F7, 0x2F8, 0x2FF, 0x300)] == [0xFF, 0, 7, 0xFF]
