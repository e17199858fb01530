"""Define-by-run conditional parameters for Optuna (referenced by mtl_aug.yaml).

sertune first suggests every ``space`` entry of the spec, then calls ``space(trial)``; whatever
this suggests is searched too. ``trial.params`` holds what was suggested so far. Return a dict of
constants to add to the configuration, or None. Only plain Python here (no torch).
"""


def space(trial):
    # Babble strength only matters when babble noise is a real part of the mix.
    if trial.params.get("aug.p_babble_noise", 0.0) > 0.05:
        trial.suggest_int("aug.babble_speakers", 2, 6)
    # Reconstruction on: also search how hard SpecAugment masks (it changes what is rebuilt).
    if (
        trial.params.get("loss.w_rec", 0.0) > 0.1
        and trial.params.get("aug.p_specaugment", 0.0) > 0.05
    ):
        trial.suggest_int("aug.specaug_time_width", 5, 40)
    return None
