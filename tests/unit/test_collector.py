"""harness.collector: the cyclic collector is off inside, and back as it was after."""

from __future__ import annotations

import gc

import pytest

from harness.collector import collector_held_off, held_off


def test_held_off_inside_and_back_after_even_on_an_error() -> None:
    assert gc.isenabled()
    with pytest.raises(ValueError), held_off():
        assert not gc.isenabled()
        raise ValueError("out")
    assert gc.isenabled()


def test_a_nested_use_leaves_the_outer_one_in_charge() -> None:
    with held_off():
        with held_off():
            pass
        assert not gc.isenabled()  # the inner one did not turn it back on
    assert gc.isenabled()


def test_a_collector_turned_off_before_stays_off() -> None:
    gc.disable()
    try:
        with held_off():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_decorator_holds_it_off_for_the_call_only() -> None:
    @collector_held_off
    def during() -> bool:
        return gc.isenabled()

    assert during() is False
    assert gc.isenabled()
