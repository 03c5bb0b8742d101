"""Kernel-era profiles (profiles.py): the flags each era sets, per the reference's era table."""

import pytest

from hypervisor.errors import ConfigError
from hypervisor.profiles import DEFAULT_PROFILE, PROFILES, get_profile


@pytest.mark.parametrize(
    ("name", "wrap", "notifier_change_pte", "invalidate_page", "kvm_change_pte", "gup_write", "kpage"),
    [
        ("2.6.32", False, True, True, True, True, True),
        ("3.7", True, True, True, True, False, False),
        ("6.10", True, False, False, False, False, False),
    ],
)
def test_each_era_sets_the_flags_of_the_reference_table(
    name: str,
    wrap: bool,
    notifier_change_pte: bool,
    invalidate_page: bool,
    kvm_change_pte: bool,
    gup_write: bool,
    kpage: bool,
) -> None:
    p = get_profile(name)
    assert p.name == name
    assert p.wrap_pte_updates_in_range is wrap
    assert p.notifier_has_change_pte is notifier_change_pte
    assert p.notifier_has_invalidate_page is invalidate_page
    assert p.kvm_change_pte is kvm_change_pte
    assert p.kvm_gup_always_write is gup_write
    assert p.ksm_merge_allocates_kpage is kpage
    assert p.uses_change_pte is (notifier_change_pte and kvm_change_pte)


def test_the_profiles_are_exactly_the_three_eras_and_2_6_32_is_the_default() -> None:
    assert list(PROFILES) == ["2.6.32", "3.7", "6.10"]
    assert DEFAULT_PROFILE == "2.6.32"


@pytest.mark.parametrize("name", ["2.6.32", "3.7", "6.10"])
def test_without_change_pte_only_drops_kvms_change_pte(name: str) -> None:
    base, bare = get_profile(name), get_profile(name, change_pte=False)
    assert bare.name == f"{name}-no-change-pte"
    assert not bare.kvm_change_pte and not bare.uses_change_pte
    assert bare.notifier_has_change_pte == base.notifier_has_change_pte
    assert bare.wrap_pte_updates_in_range == base.wrap_pte_updates_in_range
    assert bare.kvm_gup_always_write == base.kvm_gup_always_write
    assert bare.ksm_merge_allocates_kpage == base.ksm_merge_allocates_kpage


def test_an_unknown_profile_is_a_config_error_naming_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"2\.6\.32, 3\.7, 6\.10") as info:
        get_profile("4.13")
    assert info.value.exit_code == 2
