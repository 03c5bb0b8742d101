"""Kernel profiles computed from the table of kernel changes (kernels.py, profiles.py)."""

import re
from pathlib import Path

import pytest

from hypervisor.config import KsmKnobs
from hypervisor.errors import ConfigError
from hypervisor.kernels import BASELINE, CHANGES, MAINLINE, behaviour_of, render_kernels, version_key
from hypervisor.profiles import (
    BEHAVIOUR_FIELDS,
    DEFAULT_PROFILE,
    PROFILE_ALIASES,
    check_ksm_knobs,
    get_profile,
)

MODEL = Path(__file__).resolve().parents[2] / "hypervisor"


@pytest.mark.parametrize(
    ("name", "bracket", "notifier_change_pte", "invalidate_page", "kvm_change_pte", "gup_write", "kpage"),
    [
        ("2.6.32", False, True, True, True, True, True),
        ("3.7", True, True, True, True, False, False),
        ("6.10", True, False, False, False, False, False),
    ],
)
def test_the_three_named_eras_keep_the_flags_of_the_reference_table(
    name: str, bracket: bool, notifier_change_pte: bool, invalidate_page: bool, kvm_change_pte: bool,
    gup_write: bool, kpage: bool,
) -> None:
    p = get_profile(name)
    assert p.name == p.version == name
    assert p.ksm_pte_updates_in_invalidate_range is bracket
    assert p.do_wp_page_copy_in_invalidate_range is bracket
    assert p.notifier_has_change_pte is notifier_change_pte
    assert p.notifier_has_invalidate_page is invalidate_page
    assert p.kvm_change_pte is kvm_change_pte
    assert p.kvm_gup_always_write is gup_write
    assert p.ksm_merge_allocates_kpage is kpage
    assert p.uses_change_pte is (notifier_change_pte and kvm_change_pte)


def test_the_old_profile_names_are_kernel_versions_and_2_6_32_is_the_default() -> None:
    assert PROFILE_ALIASES == ("2.6.32", "3.7", "6.10")
    assert all(a in MAINLINE for a in PROFILE_ALIASES)
    assert DEFAULT_PROFILE == "2.6.32"


def test_every_mainline_release_from_2_6_32_to_6_12_has_a_profile() -> None:
    assert MAINLINE[0] == "2.6.32" and MAINLINE[-1] == "6.12"
    assert {"2.6.38", "3.19", "4.20", "5.19", "6.8"} <= set(MAINLINE)
    for v in MAINLINE:
        assert get_profile(v).version == v


def test_2_6_38_pins_read_faults_read_only_but_keeps_2_6_32s_notifier() -> None:
    p = get_profile("2.6.38")
    assert not p.kvm_gup_always_write
    assert p.uses_change_pte and not p.ksm_pte_updates_in_invalidate_range
    assert p.change_pte_falls_back_to_invalidate_page and not p.set_pte_at_notify_change_pte_first


def test_a_profile_is_the_baseline_with_every_row_up_to_its_version_applied() -> None:
    assert behaviour_of("2.6.32") == BASELINE
    assert behaviour_of("6.12") == {**BASELINE, **{c.field: c.value for c in CHANGES}}
    for c in CHANGES:
        assert behaviour_of(c.version)[c.field] == c.value
        before = MAINLINE[version_key(c.version) - 1]
        assert behaviour_of(before)[c.field] != c.value


def test_the_table_names_only_profile_fields_in_release_order_with_a_commit_each() -> None:
    assert set(BASELINE) == set(BEHAVIOUR_FIELDS)
    keys = [version_key(c.version) for c in CHANGES]
    assert keys == sorted(keys)
    for c in CHANGES:
        assert c.field in BEHAVIOUR_FIELDS
        assert c.commit == "-" or re.fullmatch(r"[0-9a-f]{12}", c.commit)
        assert c.verified is False or c.commit != "-"


def test_every_profile_field_is_read_by_the_model() -> None:
    # The model (host/, kvm/, the KSM knob check) must read each behaviour field; a field
    # nothing reads would be a row of the table that changes nothing.
    sources = "\n".join(p.read_text() for p in MODEL.rglob("*.py")
                        if p.name not in ("kernels.py", "profiles.py"))
    sources += (MODEL / "profiles.py").read_text().split("def check_ksm_knobs", 1)[1]
    for name in BEHAVIOUR_FIELDS:
        assert re.search(rf"profile\.{name}\b|\"{name}\"", sources), f"no model code reads Profile.{name}"


def test_host_reads_only_host_side_profile_fields() -> None:
    host = "\n".join(p.read_text() for p in (MODEL / "host").glob("*.py"))
    assert not re.search(r"profile\.kvm_", host)


@pytest.mark.parametrize("name", ["2.6.32", "2.6.38", "3.7", "6.10"])
def test_without_change_pte_only_drops_kvms_change_pte(name: str) -> None:
    base, bare = get_profile(name), get_profile(name, change_pte=False)
    assert bare.name == f"{name}-no-change-pte"
    assert not bare.kvm_change_pte and not bare.uses_change_pte
    for field in BEHAVIOUR_FIELDS:
        if field != "kvm_change_pte":
            assert getattr(bare, field) == getattr(base, field)


@pytest.mark.parametrize("bad", ["4.21", "2.6.31", "7.0", "3.7.2", "latest", ""])
def test_an_unknown_kernel_is_a_config_error_saying_what_is_accepted(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"2\.6\.32 to 6\.12") as info:
        get_profile(bad)
    assert info.value.exit_code == 2


@pytest.mark.parametrize(("kernel", "knobs", "named"), [
    ("4.12", {"max_page_sharing": 128}, r"max_page_sharing; it appeared in 4\.13 \(commit 2c653d0ee2ae"),
    ("4.10", {"use_zero_pages": True}, r"use_zero_pages; it appeared in 4\.11"),
    ("6.6", {"smart_scan": True}, r"smart_scan; it appeared in 6\.7"),
    ("6.6", {"smart_scan": False}, r"smart_scan; it appeared in 6\.7"),
])
def test_a_ksm_knob_the_kernel_lacked_is_an_error_naming_the_release_that_added_it(
        kernel: str, knobs: dict[str, object], named: str) -> None:
    given = KsmKnobs(enabled=True, **knobs).release_gated()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=named):
        check_ksm_knobs(get_profile(kernel), given)
    check_ksm_knobs(get_profile("6.12"), given)


def test_hvsim_kernels_prints_every_row_with_version_commit_and_verification() -> None:
    text = render_kernels()
    for c in CHANGES:
        assert re.search(rf"^{re.escape(c.version)}\s+{c.field} = {c.value}\s+{c.commit}\s", text, re.M)
    assert "unverified" in text
