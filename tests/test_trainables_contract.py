"""Every registered trainable passes the shared suite in ``trainable_suite.py`` - the project's
``mtl_aug`` and the test-only ``linear`` (registered in conftest through SERTUNE_TRAINABLES)."""

import importlib.util
from pathlib import Path

import pytest

from sertune.trainable import available, get_trainable

_spec = importlib.util.spec_from_file_location(
    "trainable_suite", Path(__file__).with_name("trainable_suite.py")
)
suite = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(suite)

NAMES = sorted(available())


def test_both_trainables_are_registered():
    assert {"mtl_aug", "linear"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_interface(name):
    suite.check_interface(get_trainable(name))


@pytest.mark.parametrize("name", NAMES)
def test_rejects_unknown_params(name):
    suite.check_rejects_unknown_params(get_trainable(name))


@pytest.mark.parametrize("name", NAMES)
def test_trains_reports_and_serves(name, tmp_path):
    t = get_trainable(name)
    suite.check_trains_reports_and_serves(t, tmp_path, t.smoke_params())


@pytest.mark.parametrize("name", NAMES)
def test_bench_train(name):
    suite.check_bench_train(get_trainable(name))


def test_unknown_trainable_names_the_known_ones():
    from sertune.trainable import UnknownTrainable

    with pytest.raises(UnknownTrainable, match="mtl_aug"):
        get_trainable("nope")
