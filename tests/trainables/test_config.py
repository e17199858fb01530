import json

import pytest

from trainables.mtl_aug.config import AUG_TYPES, ConfigError, MTLAugConfig


def test_dotted_and_nested_keys_agree():
    a = MTLAugConfig.from_dict({"loss.w_aug": 0.5, "optim": {"lr": 0.01}})
    assert a.loss.w_aug == 0.5 and a.optim.lr == 0.01
    assert MTLAugConfig.from_dict(a.to_flat()) == a
    assert MTLAugConfig.from_json(a.to_json()) == a


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"loss.w_agu": 1.0}, "loss.w_agu"),
        ({"nope.x": 1}, "nope"),
        ({"epochs": 3}, "epochs"),
        ({"aug.snr_db_low": 30.0}, "aug.snr_db_low"),
        ({"loss.w_aug": -1.0}, "loss.w_aug"),
        ({"optim.batch_size": 2.5}, "optim.batch_size"),
    ],
)
def test_unknown_or_bad_keys_name_the_field(bad, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        MTLAugConfig.from_dict(bad)


def test_mix_is_normalised_in_aug_type_order():
    mix = MTLAugConfig.from_dict({f"aug.p_{t}": 1.0 for t in AUG_TYPES}).aug.mix()
    assert list(mix) == list(AUG_TYPES)
    assert abs(sum(mix.values()) - 1) < 1e-9 and len(set(mix.values())) == 1


def test_all_zero_mix_is_refused():
    with pytest.raises(ConfigError, match="p_clean"):
        MTLAugConfig.from_dict({f"aug.p_{t}": 0.0 for t in AUG_TYPES})


def test_config_is_json_serialisable_for_mlflow():
    flat = MTLAugConfig().to_flat()
    assert "loss.w_rec" in flat and json.dumps(flat)
