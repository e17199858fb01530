"""Corpus adapters: read each corpus in the layout its distributor ships, nothing re-packed.

Every adapter turns a root folder into :class:`Utterance` rows (path, emotion label, speaker, the
speaker-independent group used for folds). Labels outside the 4-class set (angry, happy, neutral,
sad) are counted in the data report and left out; happy and excited merge for IEMOCAP as usual.

| corpus      | layout read                                                                    | group   |
|-------------|--------------------------------------------------------------------------------|---------|
| iemocap     | Session{1-5}/sentences/wav/<dialog>/<utt>.wav + dialog/EmoEvaluation/*.txt      | session |
| msp_improv  | Audio/session{n}/<sentence>/<scenario>/MSP-IMPROV-*.wav + Evalution.txt         | session |
| emodb       | wav/<spk><text><E><v>.wav  (e.g. 03a01Fa.wav)                                  | speaker |
| ravdess     | Actor_NN/MM-VV-EE-II-SS-RR-NN.wav                                              | speaker |
| crema_d     | AudioWAV/<actor>_<sentence>_<EMO>_<level>.wav                                  | speaker |
| manifest    | a CSV ``path,label,speaker[,split][,gender]``; empty label = unlabelled         | speaker |

Each utterance also carries its speaker's gender where the corpus says (EMODB's speaker list,
RAVDESS's odd actors male, IEMOCAP's ``Ses01F``, MSP-IMPROV's ``F01``, CREMA-D's
``VideoDemographics.csv``, a manifest's ``gender`` column): speaker folds are balanced on it.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from sertune.errors import DataError

EMOTIONS_4: tuple[str, ...] = ("angry", "happy", "neutral", "sad")
OUTSIDE_ROOT = "outside_corpus_root"  # data-report reason for a manifest path that leaves its root


class CorpusError(DataError):
    """The corpus root or its metadata is not what the adapter expects; names the path."""


@dataclass(frozen=True)
class Utterance:
    path: str
    label: str | None  # None = unlabelled (only the auxiliary tasks learn from it)
    speaker: str
    group: str  # speaker-independent fold unit (session or speaker)
    utt_id: str
    split: str | None = None  # only when the corpus itself fixes the split (manifest column)
    gender: str | None = None  # "female" / "male" where the corpus says; folds balance on it


class Scan(NamedTuple):
    """What an adapter found: usable utterances, labels left out, files refused (reason -> paths)."""

    items: list[Utterance]
    excluded: dict[str, int]
    rejected: dict[str, list[str]]


# -- IEMOCAP -----------------------------------------------------------------------------------

_IEMOCAP_MAP = {"ang": "angry", "hap": "happy", "exc": "happy", "neu": "neutral", "sad": "sad"}
_IEMOCAP_LINE = re.compile(r"^\[[\d.]+ - [\d.]+\]\t(\S+)\t(\w+)\t")


def _iemocap(root: Path) -> tuple[list[Utterance], dict[str, int]]:
    if (root / "IEMOCAP_full_release").is_dir():
        root = root / "IEMOCAP_full_release"
    sessions = sorted(p for p in root.glob("Session[1-5]") if p.is_dir())
    if not sessions:
        raise CorpusError(f"{root}: no Session1..Session5 folders (IEMOCAP_full_release layout)")
    items, excluded = [], {}
    for sess in sessions:
        labels: dict[str, str] = {}
        for txt in sorted((sess / "dialog" / "EmoEvaluation").glob("*.txt")):
            for line in txt.read_text(errors="replace").splitlines():
                m = _IEMOCAP_LINE.match(line)
                if m:
                    labels[m.group(1)] = m.group(2)
        for wav in sorted((sess / "sentences" / "wav").glob("*/*.wav")):
            utt = wav.stem
            raw = labels.get(utt)
            if raw is None:
                excluded["<no label>"] = excluded.get("<no label>", 0) + 1
                continue
            if raw not in _IEMOCAP_MAP:
                excluded[raw] = excluded.get(raw, 0) + 1
                continue
            # Ses01F_impro01_F000: the speaker is the session plus the gender of the last token
            speaker = f"{utt[:5]}{utt.rsplit('_', 1)[-1][0]}"
            gender = speaker_gender("iemocap", speaker)
            items.append(
                Utterance(str(wav), _IEMOCAP_MAP[raw], speaker, sess.name, utt, None, gender)
            )
    return items, excluded


# -- MSP-IMPROV --------------------------------------------------------------------------------

_MSP_MAP = {"A": "angry", "H": "happy", "N": "neutral", "S": "sad"}


def _msp_improv(root: Path) -> tuple[list[Utterance], dict[str, int]]:
    label_file = next(
        (p for p in (root / "Evalution.txt", root / "Evaluation.txt") if p.exists()), None
    )
    if label_file is None:
        raise CorpusError(f"{root}: no Evalution.txt (the MSP-IMPROV label file)")
    labels: dict[str, str] = {}
    for line in label_file.read_text(errors="replace").splitlines():
        # UTD-IMPROV-S01A-F01-P-FM01.avi; A; A:4.0; V:2.0; D:3.0; N:5
        parts = [p.strip() for p in line.split(";")]
        if len(parts) >= 2 and parts[0].startswith(("UTD-IMPROV-", "MSP-IMPROV-")):
            stem = parts[0].rsplit(".", 1)[0].replace("UTD-IMPROV-", "MSP-IMPROV-")
            labels[stem] = parts[1]
    audio = root / "Audio" if (root / "Audio").is_dir() else root
    items, excluded = [], {}
    for wav in sorted(audio.rglob("MSP-IMPROV-*.wav")):
        raw = labels.get(wav.stem)
        if raw is None or raw not in _MSP_MAP:
            key = raw or "<no label>"
            excluded[key] = excluded.get(key, 0) + 1
            continue
        # MSP-IMPROV-S01A-F01-P-FM01: speaker F01, session 01
        speaker = wav.stem.split("-")[3]
        session, gender = f"session{int(speaker[1:])}", speaker_gender("msp_improv", speaker)
        items.append(Utterance(str(wav), _MSP_MAP[raw], speaker, session, wav.stem, None, gender))
    return items, excluded


# -- EMODB -------------------------------------------------------------------------------------

_EMODB_MAP = {
    "W": "angry",
    "F": "happy",
    "N": "neutral",
    "T": "sad",
}  # Wut, Freude, Neutral, Trauer
_EMODB_NAME = re.compile(r"^(\d\d)([ab]\d\d)([WLEAFTN])([a-z])$")


def _emodb(root: Path) -> tuple[list[Utterance], dict[str, int]]:
    wav_dir = root / "wav" if (root / "wav").is_dir() else root
    wavs = sorted(wav_dir.glob("*.wav"))
    if not wavs:
        raise CorpusError(f"{root}: no wav/*.wav files (EMODB layout, e.g. wav/03a01Fa.wav)")
    items, excluded = [], {}
    for wav in wavs:
        m = _EMODB_NAME.match(wav.stem)
        if not m:
            excluded["<bad name>"] = excluded.get("<bad name>", 0) + 1
            continue
        spk, _, emo, _ = m.groups()
        if emo not in _EMODB_MAP:
            excluded[emo] = excluded.get(emo, 0) + 1
            continue
        items.append(
            Utterance(
                str(wav), _EMODB_MAP[emo], spk, spk, wav.stem, gender=speaker_gender("emodb", spk)
            )
        )
    return items, excluded


# -- RAVDESS -----------------------------------------------------------------------------------

_RAVDESS_MAP = {"01": "neutral", "03": "happy", "04": "sad", "05": "angry"}
_RAVDESS_NAME = re.compile(r"^(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)$")


def _ravdess(root: Path) -> tuple[list[Utterance], dict[str, int]]:
    actors = sorted(p for p in root.rglob("Actor_*") if p.is_dir())
    if not actors:
        raise CorpusError(f"{root}: no Actor_NN folders (RAVDESS layout)")
    items, excluded = [], {}
    for actor in actors:
        for wav in sorted(actor.glob("*.wav")):
            m = _RAVDESS_NAME.match(wav.stem)
            if not m:
                excluded["<bad name>"] = excluded.get("<bad name>", 0) + 1
                continue
            modality, channel, emo, *_rest, spk = m.groups()
            if modality != "03" or channel != "01":  # audio-only speech; song is another task
                excluded[f"modality{modality}-channel{channel}"] = (
                    excluded.get(f"modality{modality}-channel{channel}", 0) + 1
                )
                continue
            if emo not in _RAVDESS_MAP:
                excluded[emo] = excluded.get(emo, 0) + 1
                continue
            actor = f"Actor_{spk}"
            gender = speaker_gender("ravdess", actor)
            items.append(
                Utterance(str(wav), _RAVDESS_MAP[emo], actor, actor, wav.stem, None, gender)
            )
    return items, excluded


# -- CREMA-D -----------------------------------------------------------------------------------

_CREMA_MAP = {"ANG": "angry", "HAP": "happy", "NEU": "neutral", "SAD": "sad"}


def _crema_d(root: Path) -> tuple[list[Utterance], dict[str, int]]:
    wav_dir = root / "AudioWAV" if (root / "AudioWAV").is_dir() else root
    wavs = sorted(wav_dir.glob("*.wav"))
    if not wavs:
        raise CorpusError(f"{root}: no AudioWAV/*.wav files (CREMA-D layout)")
    items, excluded = [], {}
    sex = _crema_d_sex(root)
    for wav in wavs:
        parts = wav.stem.split("_")  # 1001_DFA_ANG_XX
        if len(parts) != 4:
            excluded["<bad name>"] = excluded.get("<bad name>", 0) + 1
            continue
        actor, _, emo, _ = parts
        if emo not in _CREMA_MAP:
            excluded[emo] = excluded.get(emo, 0) + 1
            continue
        items.append(
            Utterance(str(wav), _CREMA_MAP[emo], actor, actor, wav.stem, gender=sex.get(actor))
        )
    return items, excluded


def _crema_d_sex(root: Path) -> dict[str, str]:
    """Actor -> gender from ``VideoDemographics.csv`` (``ActorID,...,Sex``) in the root, if there."""
    path = root / "VideoDemographics.csv"
    if not path.is_file():
        return {}
    out = {}
    with path.open(newline="", errors="replace") as fh:
        for row in csv.DictReader(fh):
            actor = (row.get("ActorID") or "").strip()
            gender = _gender(row.get("Sex"))
            if actor and gender:
                out[actor] = gender
    return out


# -- generic manifest --------------------------------------------------------------------------


def _manifest(root: Path, allow_absolute_paths: bool = False) -> Scan:
    """A CSV ``path,label,speaker[,split][,gender]``. Paths are relative to the manifest's folder; one that
    leaves it (``../x.wav``, an absolute path, a symlink pointing out) is refused with the reason
    ``outside_corpus_root`` unless the spec sets ``data.allow_absolute_paths``."""
    path = root / "manifest.csv" if root.is_dir() else root
    if not path.is_file():
        raise CorpusError(
            f"{path}: manifest not found (a CSV with columns path,label,speaker[,split])"
        )
    items, excluded, rejected = [], {}, {}
    base = path.parent.resolve()
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"path", "label", "speaker"} - set(reader.fieldnames or [])
        if missing:
            raise CorpusError(
                f"{path}: missing column(s) {sorted(missing)}; need path,label,speaker[,split]"
            )
        for line, row in enumerate(reader, start=2):
            label = (row.get("label") or "").strip() or None
            if label is not None and label not in EMOTIONS_4:
                excluded[label] = excluded.get(label, 0) + 1
                continue
            split = (row.get("split") or "").strip() or None
            if split not in (None, "train", "val", "test"):
                raise CorpusError(
                    f"{path}:{line}: split must be train, val or test, got {split!r}"
                )
            wav = Path(row["path"])
            wav = wav if wav.is_absolute() else path.parent / wav
            if not allow_absolute_paths and not wav.resolve().is_relative_to(base):
                rejected.setdefault(OUTSIDE_ROOT, []).append(row["path"])
                continue
            spk = row["speaker"].strip()
            items.append(
                Utterance(str(wav), label, spk, spk, wav.stem, split, _gender(row.get("gender")))
            )
    return Scan(items, excluded, rejected)


# -- speakers' gender --------------------------------------------------------------------------

_EMODB_GENDER = {
    **dict.fromkeys(("03", "10", "11", "12", "15"), "male"),
    **dict.fromkeys(("08", "09", "13", "14", "16"), "female"),
}


def _gender(value: str | None) -> str | None:
    """A metadata value as ``female`` / ``male`` (``f``, ``M``, ``Female``...); other values are
    kept lower-cased, an empty one is unknown (None)."""
    v = (value or "").strip().lower()
    return {"f": "female", "m": "male", "w": "female"}.get(v, v) or None


def speaker_gender(corpus: str, speaker: str) -> str | None:
    """The gender a corpus's speaker id says (EMODB's speaker list, RAVDESS's odd actors male,
    IEMOCAP's ``Ses01F``, MSP-IMPROV's ``F01``); None where the id does not say (CREMA-D and
    manifests carry it in their metadata instead)."""
    try:
        if corpus == "emodb":
            return _EMODB_GENDER.get(speaker)
        if corpus == "ravdess":
            return "male" if int(speaker.rsplit("_", 1)[-1]) % 2 else "female"
        if corpus == "iemocap":
            return _gender(speaker[-1:]) if speaker[-1:] in ("F", "M") else None
        if corpus == "msp_improv":
            return _gender(speaker[:1]) if speaker[:1] in ("F", "M") else None
    except ValueError:
        return None
    return None


ADAPTERS: dict[str, Callable[..., tuple[list[Utterance], dict[str, int]] | Scan]] = {
    "iemocap": _iemocap,
    "msp_improv": _msp_improv,
    "emodb": _emodb,
    "ravdess": _ravdess,
    "crema_d": _crema_d,
    "manifest": _manifest,
}


def scan_corpus(corpus: str, root: str | Path, allow_absolute_paths: bool = False) -> Scan:
    """List a corpus's utterances, the labels left out (label -> count) and refused files."""
    if corpus not in ADAPTERS:
        raise CorpusError(f"unknown corpus {corpus!r}; known: {', '.join(sorted(ADAPTERS))}")
    root = Path(root).expanduser()
    if not root.exists():
        raise CorpusError(f"{root}: data root does not exist")
    if corpus == "manifest":
        return _manifest(root, allow_absolute_paths)
    items, excluded = ADAPTERS[corpus](root)
    return Scan(items, excluded, {})
