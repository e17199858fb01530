"""Every registered trainable passes the shared suite in ``trainable_suite.py``."""

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


@pytest.mark.parametrize("name", NAMES)
def test_interface(name):
    suite.check_interface(get_trainable(name))


@pytest.mark.parametrize("name", NAMES)
def test_rejects_unknown_params(name):
    suite.check_rejects_unknown_params(get_trainable(name))


@pytest.mark.parametrize("name", NAMES)
def test_trains_reports_and_serves(name, tmp_path, tiny):
    t = get_trainable(name)
    suite.check_trains_reports_and_serves(t, tmp_path, tiny if name == "mtl_aug" else {})


def test_mtl_aug_model_files_load_as_a_predictor(tmp_path, tiny):
    from trainables.mtl_aug.config import MTLAugConfig
    from trainables.mtl_aug.export import save_model
    from trainables.mtl_aug.model import MTLAugModel

    cfg = MTLAugConfig.from_dict(tiny)
    save_model(
        tmp_path,
        MTLAugModel(cfg.model, cfg.features.n_mels),
        cfg,
        ("angry", "happy", "neutral", "sad"),
    )
    suite.check_load_predictor(get_trainable("mtl_aug"), tmp_path)


def test_unknown_trainable_names_the_known_ones():
    from sertune.trainable import UnknownTrainable

    with pytest.raises(UnknownTrainable, match="mtl_aug"):
        get_trainable("nope")
