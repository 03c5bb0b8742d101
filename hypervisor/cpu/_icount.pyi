def hook_address() -> int: ...
def emu_start(uc_emu_start: int, uc: int, begin: int, until: int, /) -> int: ...
def ctl(uc_ctl: int, uc: int, control: int, /) -> int: ...

class ICount:
    """One vCPU's struct icount (_icount.c): the block hook's counter, limits and block-count cache."""

    def __init__(self, stop: int, miss: int) -> None: ...
    @property
    def address(self) -> int: ...
    def start_run(self, limit: int, period: int, hard: int, /) -> None: ...
    counter: int
    limit: int
    stopped: int
    block_pc: int
    block_size: int
    block_count: int
    generation: int
    misses: int
    failed: int
    period: int
    hard: int
    turn_start: int
    turns: int
    stop_pc: int
