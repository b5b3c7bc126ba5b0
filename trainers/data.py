"""Dataset readers for the trainers: standard on-disk formats, no pickle, no download (SPEC §5).

Readers (CIFAR-10 binary, MNIST IDX, text, log-mel ``.npy``) take the user's path and return NumPy
arrays, raising ``DataError`` with the path and the expected format. ``digits_images``,
``synthetic_sequences`` and ``synthetic_speech`` need no download, for tests and demos.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """A dataset path is missing or not in the expected format; the message names both."""


def _existing(path: Path | str, expected: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (expected {expected})")
    return path


# --- CIFAR-10 -----------------------------------------------------------------------------------

_CIFAR_RECORD = 1 + 3 * 32 * 32  # one label byte, then 3072 pixel bytes (R, G, B planes)
_CIFAR_FILES = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
_CIFAR_FORMAT = (
    "CIFAR-10 binary batches data_batch_1.bin … data_batch_5.bin, test_batch.bin "
    "from cifar-10-binary.tar.gz"
)


def read_cifar10(root: Path | str, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Read the CIFAR-10 binary version.

    Parameters
    ----------
    root
        The ``cifar-10-batches-bin`` folder or its parent.
    split
        ``"train"`` (batches 1–5) or ``"test"``.

    Returns
    -------
    images, labels
        uint8 [N, 3, 32, 32] (CHW) and int64 [N].
    """
    if split not in _CIFAR_FILES:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    root = _existing(root, f"a folder of {_CIFAR_FORMAT}")
    names = _CIFAR_FILES[split]
    folder = root
    if not any((root / n).is_file() for n in names) and (root / "cifar-10-batches-bin").is_dir():
        folder = root / "cifar-10-batches-bin"
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        what = "no CIFAR-10 binary batches found" if len(missing) == len(names) else "incomplete"
        raise DataError(f"{folder}: {what}, missing {', '.join(missing)} ({_CIFAR_FORMAT})")
    images, labels = [], []
    for name in names:
        raw = np.fromfile(folder / name, dtype=np.uint8)
        if raw.size == 0 or raw.size % _CIFAR_RECORD:
            raise DataError(
                f"{folder / name}: {raw.size} bytes is not a positive multiple of {_CIFAR_RECORD} "
                f"(expected {_CIFAR_FORMAT}: 1 label byte + 3072 pixel bytes per record)"
            )
        records = raw.reshape(-1, _CIFAR_RECORD)
        if records[:, 0].max() > 9:
            raise DataError(f"{folder / name}: label byte above 9 (expected {_CIFAR_FORMAT})")
        labels.append(records[:, 0].astype(np.int64))
        images.append(records[:, 1:].reshape(-1, 3, 32, 32))
    return np.concatenate(images), np.concatenate(labels)


# --- MNIST --------------------------------------------------------------------------------------

_MNIST_FILES = {"train": "train", "test": "t10k"}
_MNIST_FORMAT = (
    "MNIST IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
    "t10k-labels-idx1-ubyte, optionally .gz"
)


def _find_idx(root: Path, prefix: str, kind: str) -> Path:
    folders = [root, root / "raw", root / "MNIST" / "raw"]  # the last: torchvision's layout
    for folder in folders:
        for sep in ("-", "."):
            for suffix in ("", ".gz"):
                path = folder / f"{prefix}{sep}{kind}{suffix}"
                if path.is_file():
                    return path
    raise DataError(f"{root}: no {prefix}-{kind}[.gz] found (expected {_MNIST_FORMAT})")


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e}); expected {_MNIST_FORMAT}") from e
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header, {len(data)} bytes ({_MNIST_FORMAT})")
    (found,) = struct.unpack(">I", data[:4])
    if found != magic:
        raise DataError(f"{path}: bad IDX magic 0x{found:08x}, expected 0x{magic:08x}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    count = int(np.prod(dims))
    if len(data) - header != count:
        raise DataError(
            f"{path}: {len(data) - header} data bytes after the header, dims {dims} need {count} "
            f"(truncated or not {_MNIST_FORMAT})"
        )
    return np.frombuffer(data, dtype=np.uint8, count=count, offset=header).reshape(dims).copy()


def read_mnist(root: Path | str, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Read MNIST IDX files (plain or ``.gz``; ``-idx3-ubyte`` or ``.idx3-ubyte`` names).

    Parameters
    ----------
    root
        The folder holding the four files (also ``root/raw`` or ``root/MNIST/raw``).
    split
        ``"train"`` or ``"test"`` (the ``t10k`` files).

    Returns
    -------
    images, labels
        uint8 [N, rows, cols] (28×28 for MNIST) and int64 [N].
    """
    if split not in _MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    root = _existing(root, f"a folder of {_MNIST_FORMAT}")
    prefix = _MNIST_FILES[split]
    image_path = _find_idx(root, f"{prefix}-images", "idx3-ubyte")
    label_path = _find_idx(root, f"{prefix}-labels", "idx1-ubyte")
    images = _read_idx(image_path, 0x00000803, 3)
    labels = _read_idx(label_path, 0x00000801, 1).astype(np.int64)
    if len(images) != len(labels):
        raise DataError(
            f"{image_path}: {len(images)} images but {label_path} has {len(labels)} labels"
        )
    return images, labels


# --- text ---------------------------------------------------------------------------------------


def read_text(path: Path | str) -> bytes:
    """Read a UTF-8 text corpus: one file, or a folder of ``*.txt`` files joined in name order.

    Returns
    -------
    bytes
        The raw UTF-8 bytes (checked to decode), for ``ByteTokenizer``.
    """
    path = _existing(path, "a UTF-8 text file or a folder of *.txt files")
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: no *.txt files (expected a UTF-8 text file or a folder of them)")
    parts = []
    for file in files:
        raw = file.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{file}: not UTF-8 text (bad byte at offset {e.start})") from e
        parts.append(raw)
    return b"".join(parts)


class ByteTokenizer:
    """Byte-level tokenizer: token ids are the UTF-8 bytes, vocabulary 256."""

    vocab_size = 256

    def encode(self, text: str | bytes) -> np.ndarray:
        """Return int64 token ids, one per UTF-8 byte."""
        raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(raw, dtype=np.uint8).astype(np.int64)

    def decode(self, ids: np.ndarray | list[int]) -> str:
        """Return the text; byte sequences that are not valid UTF-8 become U+FFFD."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() > 255):
            raise ValueError("byte token ids must lie in 0..255")
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


# --- speech -------------------------------------------------------------------------------------

CHARS = " 'abcdefghijklmnopqrstuvwxyz"
BLANK = 0  # CTC blank; CHARS[i] is token i + 1
N_TOKENS = len(CHARS) + 1  # 29
N_MELS = 40
_SPEECH_FORMAT = "a folder of *.npy float log-mel arrays [T, 40], each with a same-stem .txt"


def encode_transcript(text: str) -> np.ndarray:
    """Map a transcript to int64 CTC targets in 1..28 (case is ignored)."""
    bad = sorted(set(text.lower()) - set(CHARS))
    if bad:
        raise ValueError(f"characters outside {CHARS!r}: {bad}")
    return np.array([CHARS.index(c) + 1 for c in text.lower()], dtype=np.int64)


def decode_transcript(ids: np.ndarray | list[int]) -> str:
    """Map token ids back to text, dropping blanks (no collapsing of repeats)."""
    return "".join(CHARS[i - 1] for i in np.asarray(ids, dtype=np.int64).tolist() if i != BLANK)


def read_speech_features(root: Path | str) -> list[tuple[np.ndarray, str]]:
    """Read per-utterance features and transcripts, searching ``root`` recursively.

    Returns
    -------
    list of (features, transcript)
        float32 [T, 40] and the stripped, lower-cased transcript, in path order.
    """
    root = _existing(root, _SPEECH_FORMAT)
    files = sorted(root.rglob("*.npy")) if root.is_dir() else []
    if not files:
        raise DataError(f"{root}: no .npy files (expected {_SPEECH_FORMAT})")
    out = []
    for file in files:
        try:
            feats = np.load(file, allow_pickle=False)
        except ValueError as e:  # object arrays, bad headers
            raise DataError(
                f"{file}: not a plain .npy array ({e}); expected {_SPEECH_FORMAT}"
            ) from e
        if feats.ndim != 2 or feats.shape[1] != N_MELS or feats.dtype.kind not in "fiu":
            raise DataError(
                f"{file}: {feats.dtype} array of shape {feats.shape}; expected {_SPEECH_FORMAT}"
            )
        txt = file.with_suffix(".txt")
        if not txt.is_file():
            raise DataError(f"{txt}: transcript missing (expected {_SPEECH_FORMAT})")
        text = txt.read_text(encoding="utf-8").strip().lower()
        try:
            encode_transcript(text)
        except ValueError as e:
            raise DataError(f"{txt}: {e}") from e
        out.append((feats.astype(np.float32), text))
    return out


# --- built-in sets ------------------------------------------------------------------------------


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of linear resizing, half-pixel centres (align_corners=False)."""
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    weights = np.zeros((n_out, n_in))
    np.add.at(weights, (np.arange(n_out), lo), 1 - frac)
    np.add.at(weights, (np.arange(n_out), hi), frac)
    return weights


def digits_images(
    size: int = 28, channels: int = 1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8×8 digits (1797), bilinearly upsampled; no download.

    Parameters
    ----------
    size
        Output height and width (28 for MNIST-shaped models, 32 for CIFAR-shaped).
    channels
        Copies of the grey channel (3 for CIFAR-shaped models).
    seed
        Seeds the order of the examples.

    Returns
    -------
    images, labels
        uint8 [N, channels, size, size] in 0..255 and int64 [N].
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("digits_images needs scikit-learn: pip install scikit-learn") from e
    if size < 1 or channels < 1:
        raise ValueError(f"size and channels must be positive, got {size} and {channels}")
    digits = load_digits()
    weights = _bilinear_matrix(8, size)
    grey = weights @ (digits.images / 16.0) @ weights.T  # [N, size, size] in 0..1
    images = np.clip(np.rint(grey * 255), 0, 255).astype(np.uint8)
    images = np.repeat(images[:, None], channels, axis=1)
    order = np.random.default_rng(seed).permutation(len(images))
    return images[order], digits.target.astype(np.int64)[order]


def synthetic_sequences(n: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    """Seeded token sequences from an order-2 Markov chain, int64 [n, length].

    With probability 0.9 the next token is ``(start[b] + shift[a]) % vocab`` for the previous two
    tokens ``a, b`` (``shift`` in 0..3, so a bigram model narrows it to 4 candidates and a trigram
    model pins it), otherwise uniform. The first two tokens are uniform.
    """
    if n < 0 or length < 0 or vocab < 1:
        raise ValueError(f"need n, length >= 0 and vocab >= 1, got {n}, {length}, {vocab}")
    rng = np.random.default_rng(seed)
    start = rng.permutation(vocab)
    shift = rng.integers(0, min(4, vocab), size=vocab)
    seqs = rng.integers(0, vocab, size=(n, length), dtype=np.int64)  # the uniform draws
    follow = rng.random((n, length)) < 0.9
    for t in range(2, length):
        rule = (start[seqs[:, t - 1]] + shift[seqs[:, t - 2]]) % vocab
        seqs[:, t] = np.where(follow[:, t], rule, seqs[:, t])
    return seqs


_WORDS = ["yes", "no", "up", "down", "left", "right", "on", "out", "stop", "go", "it's", "zero"]


def synthetic_speech(n: int, seed: int = 0) -> list[tuple[np.ndarray, str]]:
    """Seeded fake utterances for LSTM+CTC: float32 [T, 40] features and a transcript.

    Each transcript is 1–3 words from a small list; each character lasts 2–4 frames of a fixed
    random 40-dim template (the same for every seed, so train and validation sets agree) plus
    N(0, 0.3²) noise, with 1–3 noise-only frames before and after. No word list entry repeats a
    letter, so no transcript needs a blank between identical frames.
    """
    templates = np.random.default_rng(20240).normal(size=(len(CHARS), N_MELS))
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        text = " ".join(rng.choice(_WORDS, size=rng.integers(1, 4)))
        frames = [np.zeros((rng.integers(1, 4), N_MELS))]
        for char in text:
            frames.append(np.repeat(templates[CHARS.index(char)][None], rng.integers(2, 5), axis=0))
        frames.append(np.zeros((rng.integers(1, 4), N_MELS)))
        feats = np.concatenate(frames)
        feats = feats + rng.normal(scale=0.3, size=feats.shape)
        out.append((feats.astype(np.float32), text))
    return out


# --- splits -------------------------------------------------------------------------------------


def split_validation(
    n: int, fraction: float = 0.1, seed: int = 42
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``round(fraction * n)`` of ``range(n)`` by a fixed permutation (SPEC: VGG).

    Returns
    -------
    train_idx, val_idx
        Disjoint sorted int64 index arrays that together cover ``range(n)``.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must lie in [0, 1), got {fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(fraction * n))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def random_labels(labels: np.ndarray, seed: int = 12345) -> np.ndarray:
    """One fixed permutation of the labels (SPEC: random-labels run, applied before the split)."""
    labels = np.asarray(labels)
    return labels[np.random.default_rng(seed).permutation(len(labels))]


# The usual CIFAR-10 per-channel statistics, used to standardise its pixels.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def cifar_split(
    path: Path | str,
    *,
    val_frac: float = 0.1,
    limit_train: int = 0,
    permute_labels: bool = False,
) -> dict:
    """CIFAR-10's training set (or the built-in digits at 32x32x3 when ``path`` is empty) as
    standardised float tensors, split into training and held-out validation (seed 42).

    ``permute_labels`` applies the fixed random-label permutation (seed 12345) before the split,
    as the paper does; ``limit_train`` > 0 keeps that many training examples (for tests).
    Returns torch tensors ``x_train, y_train, x_val, y_val``.
    """
    import torch

    if path:
        images, labels = read_cifar10(path, "train")
    else:
        images, labels = digits_images(size=32, channels=3)
    if permute_labels:
        labels = random_labels(labels, seed=12345)
    train, val = split_validation(len(labels), val_frac, seed=42)
    if limit_train > 0:
        train = train[:limit_train]
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)

    def pixels(x: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(x.astype(np.float32) / 255.0) - mean) / std

    return {
        "x_train": pixels(images[train]),
        "y_train": torch.from_numpy(labels[train]),
        "x_val": pixels(images[val]),
        "y_val": torch.from_numpy(labels[val]),
    }
