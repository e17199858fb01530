"""Speaker folds that represent the corpus: the balanced dealing gives every part (test, validation,
each cross-validation fold) both genders and every class; ``sorted`` keeps the old round-robin; a
K above the groups there are is refused before anything starts; ``sertune data split`` shows it."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from trainables.common.corpus_hooks import CorpusHooks
from trainables.data.cache import build_cache, load_cache, speaker_independent_split, split_lines
from trainables.data.corpora import scan_corpus
from trainables.data.folds import deal

EMODB_SPEAKERS = ["03", "08", "09", "10", "11", "12", "13", "14", "15", "16"]
EMODB_MALE = {"03", "10", "11", "12", "15"}


def noise(path: Path, seconds: float = 0.5, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(seed).normal(size=int(seconds * 16000)) * 0.05
    sf.write(path, x.astype(np.float32), 16000, subtype="PCM_16")


def fake_emodb(root: Path) -> Path:
    """10 speakers x 4 classes x 2-3 clips, named as distributed (03a01Wa.wav)."""
    for i, spk in enumerate(EMODB_SPEAKERS):
        for j, emo in enumerate("WFNT"):  # angry, happy, neutral, sad
            for k in range(2 + (i + j) % 2):
                noise(root / "wav" / f"{spk}a0{k + 1}{emo}a.wav", seed=i * 100 + j * 10 + k)
    return root


def fake_ravdess(root: Path, actors: int = 12) -> Path:
    """``actors`` actors (odd numbers male) x 4 classes x 2 clips."""
    for a in range(1, actors + 1):
        for emo in ("01", "03", "04", "05"):  # neutral, happy, sad, angry
            for rep in ("01", "02"):
                name = f"03-01-{emo}-01-01-{rep}-{a:02d}.wav"
                noise(root / f"Actor_{a:02d}" / name, seconds=0.3, seed=a * 7 + int(emo))
    return root


def fake_iemocap(root: Path) -> Path:
    """5 sessions, a female and a male speaker each, every class."""
    for s in range(1, 6):
        sess = root / f"Session{s}"
        dialog = f"Ses0{s}F_impro01"
        lines = []
        for i, (who, emo) in enumerate(
            [("F", "ang"), ("M", "hap"), ("F", "neu"), ("M", "sad"), ("M", "ang"), ("F", "sad")]
        ):
            utt = f"{dialog}_{who}{i:03d}"
            noise(sess / "sentences" / "wav" / dialog / f"{utt}.wav", seconds=0.3, seed=s * 10 + i)
            lines.append(f"[{i}.0000 - {i}.9000]\t{utt}\t{emo}\t[2.5000, 2.5000, 2.5000]")
        (sess / "dialog" / "EmoEvaluation").mkdir(parents=True)
        (sess / "dialog" / "EmoEvaluation" / f"{dialog}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def emodb(tmp_path_factory):
    root = tmp_path_factory.mktemp("emodb")
    fake_emodb(root / "corpus")
    return load_cache(build_cache("emodb", root / "corpus", root / "cache", progress=print))


@pytest.fixture(scope="module")
def ravdess(tmp_path_factory):
    root = tmp_path_factory.mktemp("ravdess")
    fake_ravdess(root / "corpus")
    return load_cache(build_cache("ravdess", root / "corpus", root / "cache", progress=print))


def parts(corpus, cv_folds: int | None = None, fold: int = 0, dealing: str = "balanced"):
    """name -> indices: test, val, train, and (with ``cv_folds``) every CV fold's validation."""
    s = speaker_independent_split(corpus, fold, dealing=dealing)
    out = {"test": s["test"], "val": s["val"], "train": s["train"]}
    for k in range(cv_folds or 0):
        cv = {"fold": k, "folds": cv_folds}
        out[f"cv{k}"] = speaker_independent_split(corpus, fold, cv=cv, dealing=dealing)["val"]
    return out


def assert_representative(corpus, named: dict[str, np.ndarray]) -> None:
    classes = set(range(len(corpus.label_names)))
    for name, idx in named.items():
        genders = {corpus.genders[i] for i in idx}
        assert genders == {"female", "male"}, (name, sorted({corpus.speakers[i] for i in idx}))
        assert {int(corpus.labels[i]) for i in idx} == classes, name


def old_round_robin(corpus, idx: np.ndarray, n: int) -> np.ndarray:
    """The dealing before balancing: groups sorted, dealt round-robin."""
    fold_of = {g: i % n for i, g in enumerate(sorted({corpus.groups[i] for i in idx}))}
    return np.array([fold_of[corpus.groups[i]] for i in idx])


# -- genders come from what each corpus says ---------------------------------------------------


def test_adapters_know_each_speakers_gender(tmp_path, emodb, ravdess):
    assert {s: g for s, g in zip(emodb.speakers, emodb.genders, strict=True)} == {
        s: "male" if s in EMODB_MALE else "female" for s in EMODB_SPEAKERS
    }
    for spk, g in zip(ravdess.speakers, ravdess.genders, strict=True):
        assert g == ("male" if int(spk[-2:]) % 2 else "female")
    items, _, _ = scan_corpus("iemocap", fake_iemocap(tmp_path / "iemocap"))
    assert {(i.speaker, i.gender) for i in items if i.group == "Session1"} == {
        ("Ses01F", "female"),
        ("Ses01M", "male"),
    }
    # CREMA-D: VideoDemographics.csv in the root when there; else unknown
    for actor in ("1001", "1002"):
        noise(tmp_path / "crema" / "AudioWAV" / f"{actor}_DFA_ANG_XX.wav", seconds=0.2)
    items, _, _ = scan_corpus("crema_d", tmp_path / "crema")
    assert {i.gender for i in items} == {None}
    (tmp_path / "crema" / "VideoDemographics.csv").write_text(
        "ActorID,Age,Sex,Race,Ethnicity\n1001,51,Male,Caucasian,Not Hispanic\n"
        "1002,21,Female,Caucasian,Not Hispanic\n"
    )
    items, _, _ = scan_corpus("crema_d", tmp_path / "crema")
    assert {(i.speaker, i.gender) for i in items} == {("1001", "male"), ("1002", "female")}
    # a manifest's optional gender column
    noise(tmp_path / "m" / "a.wav", seconds=0.2)
    noise(tmp_path / "m" / "b.wav", seconds=0.2)
    (tmp_path / "m" / "manifest.csv").write_text(
        "path,label,speaker,gender\na.wav,angry,s1,F\nb.wav,sad,s2,\n"
    )
    items, _, _ = scan_corpus("manifest", tmp_path / "m")
    assert [i.gender for i in items] == ["female", None]


def test_the_synthetic_corpus_writes_each_speakers_gender(synth_corpus):
    c = load_cache(synth_corpus["cache"])
    assert "gender" in synth_corpus["manifest"].read_text().splitlines()[0].split(",")
    for spk, g in zip(c.speakers, c.genders, strict=True):
        assert g == ("female" if spk.endswith("F") else "male")


def test_a_cache_built_before_genders_were_kept_still_loads(tmp_path, emodb, synth_corpus):
    for src, corpus in ((emodb.path, "emodb"), (Path(synth_corpus["cache"]), "manifest")):
        old = tmp_path / corpus
        old.mkdir()
        for f in src.iterdir():
            (old / f.name).symlink_to(f)
        (old / "index.json").unlink()
        index = json.loads((src / "index.json").read_text())
        for r in index["utterances"]:
            del r["gender"]
        (old / "index.json").write_text(json.dumps(index))
        c = load_cache(old)
        if corpus == "emodb":  # what the speaker id says
            assert c.genders == emodb.genders
        else:  # a manifest's speakers say nothing: unknown, and the split still works
            assert set(c.genders) == {None}
            assert len(speaker_independent_split(c, 0)["test"])


# -- the balanced dealing ----------------------------------------------------------------------


def test_synthetic_folds_hold_both_genders_and_every_class(synth_corpus):
    c = load_cache(synth_corpus["cache"])  # 8 speakers: 5 folds of 2, 2, 2, 1, 1
    assert set(c.genders) == {"female", "male"}
    assert_representative(c, parts(c, cv_folds=3))  # 6 speakers outside the test set: 2 a fold


def test_emodb_test_val_and_every_cv_fold_hold_both_genders_and_every_class(emodb):
    for fold in range(5):
        assert_representative(emodb, parts(emodb, fold=fold))
    named = parts(emodb, cv_folds=4)  # the 8 speakers outside the test set, 2 per fold
    assert_representative(emodb, named)
    assert sum(len(named[f"cv{k}"]) for k in range(4)) == len(named["val"]) + len(named["train"])


def test_ravdess_test_val_and_every_cv_fold_hold_both_genders_and_every_class(ravdess):
    for fold in range(5):
        assert_representative(ravdess, parts(ravdess, fold=fold))
    for k in (3, 4):
        assert_representative(ravdess, parts(ravdess, cv_folds=k))


def test_the_dealing_is_deterministic_and_keeps_the_round_robins_fold_sizes(ravdess):
    idx = np.nonzero(ravdess.labels >= 0)[0]
    args = (
        [ravdess.groups[i] for i in idx],
        [ravdess.speakers[i] for i in idx],
        [ravdess.genders[i] for i in idx],
        ravdess.labels[idx],
    )
    first, again = deal(*args, 5), deal(*args, 5)
    assert (first == again).all()

    def sizes(f):
        return sorted(len({args[0][i] for i in np.nonzero(f == k)[0]}) for k in range(5))

    assert sizes(first) == sizes(old_round_robin(ravdess, idx, 5)) == [2, 2, 2, 3, 3]


def test_sorted_dealing_reproduces_the_old_round_robin(emodb, ravdess):
    s = speaker_independent_split(emodb, 0, dealing="sorted")
    speakers = {k: sorted({emodb.speakers[i] for i in v}) for k, v in s.items() if len(v)}
    assert speakers["test"] == ["03", "12"] and speakers["val"] == ["08", "13"]  # the issue's
    for c, n in ((emodb, 5), (ravdess, 4), (ravdess, 6)):
        lab = np.nonzero(c.labels >= 0)[0]
        old = old_round_robin(c, lab, n)
        for fold in range(n):
            s = speaker_independent_split(c, fold, n, dealing="sorted")
            assert list(s["test"]) == list(lab[old == fold])
            assert list(s["val"]) == list(lab[old == (fold + 1) % n])
    # RAVDESS under the old dealing: every fold one gender; balanced: both in each
    lab = np.nonzero(ravdess.labels >= 0)[0]
    old = old_round_robin(ravdess, lab, 4)
    assert all(len({ravdess.genders[i] for i in lab[old == k]}) == 1 for k in range(4))
    s = speaker_independent_split(ravdess, 0, 4)
    assert {ravdess.genders[i] for i in s["test"]} == {"female", "male"}
    with pytest.raises(ValueError, match="data.dealing"):
        speaker_independent_split(emodb, 0, dealing="shuffled")


def test_one_group_per_fold_keeps_the_sorted_order(tmp_path):
    root = fake_iemocap(tmp_path / "iemocap")
    c = load_cache(build_cache("iemocap", root, tmp_path / "cache", progress=print))
    for fold in range(5):
        s = speaker_independent_split(c, fold)
        assert {c.groups[i] for i in s["test"]} == {f"Session{fold + 1}"}
        assert_representative(c, {"test": s["test"], "val": s["val"]})


# -- K above the groups there are is refused ---------------------------------------------------


def test_k_above_the_groups_outside_the_test_set_is_refused(tmp_path):
    from sertune.trainable import TooFewSpeakerGroups

    root = fake_iemocap(tmp_path / "iemocap")
    cache = build_cache("iemocap", root, tmp_path / "cache", progress=print)
    data = {"cache": str(cache), "corpus": "iemocap", "fold": 0, "dealing": "balanced"}
    assert len(CorpusHooks().split_report(data, 4)) == 6  # head, test, 4 folds
    with pytest.raises(TooFewSpeakerGroups, match=r"5-fold .* corpus iemocap has 4 \(Session2"):
        CorpusHooks().split_report(data, 5)


def test_a_search_whose_cv_folds_exceed_the_groups_is_refused_before_it_starts(home, tmp_path):
    import yaml

    from sertune import records
    from sertune.search import _new_record
    from sertune.spec import SpecError, load_spec
    from tests.linear_trainable import linear_spec

    objective = {"metric": "val_uar", "mode": "max", "cv": {"folds": 5}}  # 5 speakers: 4 left
    raw = linear_spec(home, "k5", objective=objective)
    raw["budget"]["concurrency"] = 5
    (tmp_path / "k5.yaml").write_text(yaml.safe_dump(raw))
    spec = load_spec(tmp_path / "k5.yaml")
    lines: list[str] = []
    with pytest.raises(SpecError) as e:
        _new_record(spec, "k5", "file:///nowhere", lines.append)
    assert e.value.field == "objective.cv.folds"
    assert "corpus synthetic has 4" in str(e.value) and "k5.yaml" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(records.NotFound):
        records.load_record("k5")  # nothing recorded, nothing started
    raw["objective"]["cv"]["folds"] = 4
    (tmp_path / "k4.yaml").write_text(yaml.safe_dump({**raw, "name": "k4"}))
    _new_record(load_spec(tmp_path / "k4.yaml"), "k4", "file:///nowhere", lines.append)
    shown = [x for x in lines if x.startswith("[sertune] data: ")]
    assert shown[0].startswith("[sertune] data: split: balanced dealing, 5 folds")
    assert [x.split(":")[1].strip() for x in shown[1:]] == [
        "test",
        *(f"cv fold {k} val" for k in range(4)),
    ]
    assert records.load_record("k4").data["dealing"] == "balanced"


# -- a resumed search keeps its own split ------------------------------------------------------


def test_a_record_made_before_data_dealing_resumes_sorted(home, tmp_path):
    import yaml

    from sertune.records import SearchRecord
    from sertune.spec import load_spec
    from tests.linear_trainable import linear_spec

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(linear_spec(home, "r")))
    spec = load_spec(tmp_path / "r.yaml")
    assert spec.data.dealing == "balanced"  # a new search: balanced
    new = SearchRecord(name="r", spec=spec, path="/x", data={"cache": "c", "dealing": "balanced"})
    again = SearchRecord.model_validate(json.loads(new.to_json()))
    assert again.spec.data.dealing == "balanced" and again.data["dealing"] == "balanced"
    old = json.loads(new.to_json())
    del old["spec"]["data"]["dealing"], old["data"]["dealing"]  # as written before the field
    resumed = SearchRecord.model_validate(old)
    assert resumed.spec.data.dealing == "sorted" and resumed.data["dealing"] == "sorted"
    sorted_spec = load_spec(tmp_path / "r.yaml", sets=["data.dealing=sorted"])
    assert sorted_spec.data.dealing == "sorted"


# -- sertune data split ------------------------------------------------------------------------


def test_data_split_names_speakers_genders_and_class_counts_per_part(tmp_path, home, capsys):
    from sertune.cli import main

    root = fake_emodb(tmp_path / "emodb")
    assert main(["data", "split", "emodb", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "split: balanced dealing, 5 folds: test fold 0, val fold 1"
    assert [line.split(":")[0] for line in out[1:]] == ["test", "val", "train"]
    for line in out[1:]:
        assert "(1 female, 1 male)" in line or "(3 female, 3 male)" in line, line
        assert " clips: angry=" in line and " happy=" in line and " sad=" in line
    test = out[1].split(" (")[0].split()[2:]
    assert len(test) == 2 and {s in EMODB_MALE for s in test} == {True, False}

    assert main(["data", "split", "emodb", str(root), "--cv", "4"]) == 0
    cv = capsys.readouterr().out.splitlines()
    assert cv[1] == out[1] and [x.split(":")[0] for x in cv[2:]] == [
        f"cv fold {k} val" for k in range(4)
    ]
    assert all("(1 female, 1 male)" in x for x in cv[1:])

    assert main(["data", "split", "emodb", str(root), "--dealing", "sorted"]) == 0
    old = capsys.readouterr().out.splitlines()
    assert old[1].startswith("test: speakers 03 12 (2 male), ")
    assert old[2].startswith("val: speakers 08 13 (2 female), ")

    assert main(["data", "split", "emodb", str(root), "--cv", "9"]) == 2
    err = capsys.readouterr().err
    assert "9-fold cross-validation" in err and "corpus emodb has 8" in err


def test_split_lines_count_every_clip_once(emodb):
    lines = split_lines(emodb)
    clips = [int(line.split(" clips: ")[0].rsplit(", ", 1)[1]) for line in lines[1:]]
    assert sum(clips) == len(emodb)
