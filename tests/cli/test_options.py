"""Options are honoured or refused, never silently dropped (issue #9, items 7 and the smaller ones)."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from hypervisor.cli import main
from hypervisor.costs import cost_names
from hypervisor.errors import GuestError, GuestTimeout
from hypervisor.options import TRACEPOINTS
from hypervisor.sim import GUEST_IMAGES, SimConfig, Simulation

HELLO = str(GUEST_IMAGES / "hello.bin")


def invoke(*args: str | bytes) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))  # type: ignore[arg-type]
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("option", [["--kernel", "4.19"], ["--profile", "3.7"], ["--no-change-pte"], ["--ksm"],
                                    ["--perf-kvm-stat"], ["--exit-cost", "exit=5"], ["--cpu-mhz", "3000"]])
def test_run_without_an_image_refuses_the_options_the_demo_cannot_honour(option: list[str]) -> None:
    code, out, err = invoke("run", *option)
    assert code == 2 and out == ""
    assert err.startswith(f"hvsim: {option[0]} cannot be given without IMAGE") and err.count("\n") == 1


def test_run_without_an_image_honours_the_compare_options() -> None:
    code, out, err = invoke("run", "--vms", "2", "--cmdline", "pages=4 passes=2 spin=2000", "--ksm-sleep-ms", "1",
                            "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["config"]["vms"] == 2 and doc["config"]["cmdline"] == "pages=4 passes=2 spin=2000"
    assert doc["config"]["ksm"]["sleep_millisecs"] == 1 and len(doc["runs"]) >= 5


KSM_KNOBS = [["--ksm-pages-to-scan", "100"], ["--ksm-sleep-ms", "0"], ["--ksm-max-page-sharing", "256"],
             ["--ksm-use-zero-pages"], ["--ksm-smart-scan"], ["--ksm-run", "1"], ["--ksm-run-at", "5:2"]]


@pytest.mark.parametrize("knob", KSM_KNOBS, ids=[k[0] for k in KSM_KNOBS])
def test_every_ksm_knob_without_ksm_is_refused_naming_the_flag(knob: list[str]) -> None:
    code, _, err = invoke("run", HELLO, *knob)  # even at its default value: the user asked for KSM behaviour
    assert code == 2
    assert err == f"hvsim: {knob[0]} given without --ksm: add --ksm to turn KSM on.\n"


def test_ksm_knobs_without_ksm_are_refused_by_the_simulation_too() -> None:
    from dataclasses import replace

    from hypervisor.errors import ConfigError
    from hypervisor.sim import KsmConfig

    with pytest.raises(ConfigError, match="--ksm-sleep-ms given without --ksm"):
        Simulation(SimConfig(image=HELLO, ksm=replace(KsmConfig(), sleep_millisecs=0)))


def test_unknown_exit_cost_name_is_refused_and_the_names_are_in_help() -> None:
    code, _, err = invoke("run", HELLO, "--perf-kvm-stat", "--exit-cost", "NOPE=5")
    assert code == 2 and "unknown name 'NOPE'" in err and "EPT_VIOLATION.cow" in err
    _, help_text, _ = invoke("run", "--help")
    flat = " ".join(help_text.split())
    for name in cost_names():
        assert name in flat
    assert ".py" not in help_text  # --help points at no source file


def test_exit_cost_by_exit_reason_adds_cycles() -> None:
    _, default, _ = invoke("run", HELLO, "--perf-kvm-stat")
    code, more, err = invoke("run", HELLO, "--perf-kvm-stat", "--exit-cost", "IO_INSTRUCTION=2000")
    assert code == 0, err
    assert "6.60us" in default and "7.60us" in more


def test_cost_model_knobs_without_perf_kvm_stat_are_refused() -> None:
    code, _, err = invoke("run", HELLO, "--exit-cost", "exit=5", "--cpu-mhz", "3000")
    assert code == 2 and err.startswith("hvsim: --exit-cost, --cpu-mhz given without --perf-kvm-stat")


def test_perf_kvm_stat_and_json_are_refused_together() -> None:
    code, _, err = invoke("run", HELLO, "--perf-kvm-stat", "--json")
    assert code == 2 and "two report formats" in err


def test_trace_events_without_trace_warns() -> None:
    code, _, err = invoke("run", HELLO, "--trace-events", "kvm_exit")
    assert code == 0
    assert "hvsim: warning: --trace-events has no effect without --trace FILE." in err


def test_trace_events_matching_no_tracepoint_warns_before_the_run(tmp_path: Path) -> None:
    code, _, err = invoke("run", HELLO, "--trace", str(tmp_path / "t.txt"), "--trace-events", "kvm_exitt,kvm_*")
    assert code == 0
    assert "warning: --trace-events 'kvm_exitt' matches no event" in err
    assert "'kvm_*'" not in err


def test_trace_events_matching_nothing_in_the_run_warns(tmp_path: Path) -> None:
    code, _, err = invoke("run", HELLO, "--trace", str(tmp_path / "t.txt"), "--trace-events", "ksm_*")
    assert code == 0
    assert "warning: --trace-events matched no event of this run" in err


def test_every_traced_event_is_a_known_tracepoint(tmp_path: Path) -> None:
    out = tmp_path / "all.trace"
    code, _, err = invoke("run", str(GUEST_IMAGES / "cowstorm.bin"), "--vms", "2", "--ksm", "--ksm-sleep-ms", "0",
                          "--cmdline", "pages=4 passes=3 write_at=2 spin=2000", "--no-change-pte",
                          "--inject", "after_gfn_to_pfn:age@all", "--trace", str(out))
    assert code == 0, err
    names = {line.split(": ")[1] for line in out.read_text().splitlines() if not line.startswith("#")}
    assert names and names <= set(TRACEPOINTS)


def test_ksm_run_at_after_the_run_ended_warns() -> None:
    code, _, err = invoke("run", HELLO, "--ksm", "--ksm-run-at", "5000:2")
    assert code == 0
    assert "warning: --ksm-run-at 5000:2 was never applied: the run ended at 0.0016 simulated ms." in err


def test_ksm_run_at_within_the_run_does_not_warn() -> None:
    code, _, err = invoke("run", str(GUEST_IMAGES / "samepage.bin"), "--ksm", "--ksm-run-at", "0:2",
                          "--cmdline", "pages=2 passes=2 spin=20000")
    assert code == 0 and "warning" not in err


def test_injection_that_never_fires_warns() -> None:
    code, _, err = invoke("run", HELLO, "--inject", "after_gfn_to_pfn:cow@1000")
    assert code == 0
    assert "warning: --inject after_gfn_to_pfn:cow@1000 never fired" in err


def test_max_insns_timeout_is_classified_by_its_error_type_not_its_text(tmp_path: Path) -> None:
    img = tmp_path / "loop.bin"
    img.write_bytes(b"\xeb\xfe")
    result = Simulation(SimConfig(image=str(img), max_insns=5000, quantum=1000)).run()
    assert result.vms[0].error_kind is GuestTimeout
    code, out, _ = invoke("run", str(img), "--max-insns", "5000", "--json")
    assert code == GuestTimeout.exit_code
    assert json.loads(out)["vms"][0]["error_type"] == "GuestTimeout"  # for scripts: the type, not the text
    crash = tmp_path / "ud2.bin"
    crash.write_bytes(b"\x0f\x0b")
    result = Simulation(SimConfig(image=str(crash))).run()
    assert result.vms[0].error_kind is GuestError


@pytest.mark.parametrize(("memory", "message"), [
    ("10T", "--memory 10T is larger than the 1 GiB the boot page tables map"),
    ("2G", "--memory 2G is larger than the 1 GiB"),
    ("64K", "--memory 64K is too small"),
    ("1M", "--memory 1M is too small"),
    ("4097", "--memory 4097 is not a positive multiple of 4096 bytes"),
    ("lots", "--memory 'lots' is not a size"),
])
def test_memory_messages_echo_the_size_as_written(memory: str, message: str) -> None:
    code, _, err = invoke("run", HELLO, "--memory", memory)
    assert code == 2 and message in err


def test_over_long_cmdline_is_an_option_error() -> None:
    code, _, err = invoke("run", HELLO, "--cmdline", "x" * 5000)
    assert code == 2 and "--cmdline is 5000 bytes" in err


def test_non_utf8_cmdline_is_a_clear_option_error() -> None:
    code, _, err = invoke("run", HELLO, "--cmdline", "pages=\udcff")
    assert code == 2
    assert err == ("hvsim: --cmdline is not valid UTF-8 (byte 0xff at offset 6); guests read their command line "
                   "as UTF-8 text.\n")


def test_a_directory_as_the_image_gets_the_same_one_liner_as_a_missing_file(tmp_path: Path) -> None:
    code, out, err = invoke("run", str(tmp_path))
    assert code == 3 and out == ""
    assert err.startswith(f"hvsim: guest image '{tmp_path}' is a directory") and err.count("\n") == 1
    assert "Usage" not in err


def test_inject_help_lists_all_points_events_and_at_all() -> None:
    from hypervisor.races import EVENTS, FAULT_POINTS, KSM_POINTS

    _, out, _ = invoke("run", "--help")
    flat = " ".join(out.split())
    assert "@all" in flat
    for word in FAULT_POINTS + KSM_POINTS + EVENTS:
        assert word in flat


@pytest.mark.parametrize("args", [["run", HELLO, "--vms", "abc"], ["run", HELLO, "--profile", "2.4"], ["--bogus"],
                                  ["nosuch"], ["run", HELLO, "--bogus"], ["run", HELLO, "extra"],
                                  ["compare", HELLO, "--ksm-run", "7"]])
def test_click_usage_errors_are_one_hvsim_line_like_every_other_refusal(args: list[str]) -> None:
    code, out, err = invoke(*args)
    assert code == 2 and out == ""
    assert err.startswith("hvsim: ") and err.count("\n") == 1 and "Usage:" not in err
    assert err.rstrip().endswith("--help`.")


def test_ksm_run_at_before_time_zero_is_refused() -> None:
    code, _, err = invoke("run", HELLO, "--ksm", "--ksm-run-at", "-5:2")
    assert code == 2 and err == "hvsim: --ksm-run-at '-5:2': MS is a simulated time, from 0 on.\n"


def test_cmdline_tokens_a_bundled_guest_would_ignore_warn() -> None:
    code, _, err = invoke("run", "samepage", "--cmdline", "page=4 pages=4k passes=0x2 spin=2000 junk")
    assert code == 0
    assert err.splitlines() == [
        "hvsim: warning: --cmdline 'page=4': samepage has no parameter 'page' (it has pages, pattern, passes, spin) "
        "and ignores it.",
        "hvsim: warning: --cmdline 'pages=4k': samepage reads decimal or 0x-hex values only and ignores this one.",
        "hvsim: warning: --cmdline 'junk' is not KEY=VALUE; samepage ignores it.",
    ]
    code, _, err = invoke("run", "hello", "--cmdline", "x=1")
    assert "hello takes no parameters and ignores it" in err
    code, _, err = invoke("run", "samepage", "--cmdline", "pages=4 pattern=0XfF passes=2 spin=2000")
    assert code == 0 and err == ""
