"""Tests for trainers/data.py: exact round trips through tiny fake files, and clear errors."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from specan_trainers import data
from specan_trainers.data import DataError

# --- CIFAR-10 -----------------------------------------------------------------------------------


def _write_cifar(folder, name, n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    records = np.concatenate([labels[:, None], images.reshape(n, -1)], axis=1)
    records.tofile(folder / name)
    return images, labels


@pytest.fixture
def cifar_root(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    train = [_write_cifar(folder, f"data_batch_{i}.bin", 3, i) for i in range(1, 6)]
    test = _write_cifar(folder, "test_batch.bin", 4, 99)
    return tmp_path, train, test


def test_cifar_round_trip_from_folder_or_parent(cifar_root):
    root, train, test = cifar_root
    for where in (root, root / "cifar-10-batches-bin"):
        images, labels = data.read_cifar10(where)
        assert images.dtype == np.uint8 and images.shape == (15, 3, 32, 32)
        assert labels.dtype == np.int64
        np.testing.assert_array_equal(images, np.concatenate([im for im, _ in train]))
        np.testing.assert_array_equal(labels, np.concatenate([lb for _, lb in train]))
    images, labels = data.read_cifar10(str(root), split="test")
    np.testing.assert_array_equal(images, test[0])
    np.testing.assert_array_equal(labels, test[1])


def test_cifar_errors(cifar_root, tmp_path):
    root, _, _ = cifar_root
    folder = root / "cifar-10-batches-bin"
    with pytest.raises(DataError, match="nowhere.*CIFAR-10 binary"):
        data.read_cifar10(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty: no CIFAR-10 binary batches found"):
        data.read_cifar10(empty)
    (folder / "data_batch_3.bin").unlink()
    with pytest.raises(DataError, match="missing data_batch_3.bin"):
        data.read_cifar10(root)
    (folder / "test_batch.bin").write_bytes(b"\x00" * 3000)
    with pytest.raises(DataError, match="test_batch.bin: 3000 bytes.*3073"):
        data.read_cifar10(root, split="test")
    with pytest.raises(ValueError, match="split"):
        data.read_cifar10(root, split="val")


# --- MNIST --------------------------------------------------------------------------------------


def _idx(array, magic):
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_mnist(folder, prefix, n, seed, gz, sep="-"):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    for kind, array, magic in (("images", images, 0x803), ("labels", labels, 0x801)):
        name = f"{prefix}-{kind}{sep}idx{array.ndim}-ubyte"
        raw = _idx(array, magic)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return images, labels


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("sep", ["-", "."])
def test_mnist_round_trip(tmp_path, gz, sep):
    train = _write_mnist(tmp_path, "train", 5, 0, gz, sep)
    test = _write_mnist(tmp_path, "t10k", 3, 1, gz, sep)
    for split, (want_images, want_labels) in (("train", train), ("test", test)):
        images, labels = data.read_mnist(tmp_path, split)
        assert images.dtype == np.uint8 and images.shape == (len(want_labels), 28, 28)
        assert labels.dtype == np.int64
        np.testing.assert_array_equal(images, want_images)
        np.testing.assert_array_equal(labels, want_labels)


def test_mnist_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images, labels = _write_mnist(raw, "train", 2, 0, gz=True)
    got = data.read_mnist(tmp_path)
    np.testing.assert_array_equal(got[0], images)
    np.testing.assert_array_equal(got[1], labels)


def test_mnist_errors(tmp_path):
    with pytest.raises(DataError, match="nowhere.*MNIST IDX"):
        data.read_mnist(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no train-images-idx3-ubyte"):
        data.read_mnist(tmp_path)
    _write_mnist(tmp_path, "train", 2, 0, gz=False)
    labels_path = tmp_path / "train-labels-idx1-ubyte"
    images_path = tmp_path / "train-images-idx3-ubyte"
    good = labels_path.read_bytes()
    labels_path.write_bytes(struct.pack(">I", 0x803) + good[4:])
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: bad IDX magic 0x00000803"):
        data.read_mnist(tmp_path)
    labels_path.write_bytes(good)
    images_path.write_bytes(images_path.read_bytes()[:-10])
    with pytest.raises(DataError, match="train-images-idx3-ubyte: .*truncated"):
        data.read_mnist(tmp_path)
    images_path.write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match="truncated IDX header"):
        data.read_mnist(tmp_path)
    images_path.unlink()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: cannot read"):
        data.read_mnist(tmp_path)


def test_mnist_count_mismatch(tmp_path):
    _write_mnist(tmp_path, "train", 3, 0, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(np.zeros(2), 0x801))
    with pytest.raises(DataError, match="3 images but .* 2 labels"):
        data.read_mnist(tmp_path)


# --- text ---------------------------------------------------------------------------------------


def test_read_text_file_and_folder(tmp_path):
    (tmp_path / "b.txt").write_text("second – ü\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first\n", encoding="utf-8")
    (tmp_path / "skip.md").write_text("not read", encoding="utf-8")
    assert data.read_text(tmp_path / "a.txt") == b"first\n"
    assert data.read_text(tmp_path) == "first\nsecond – ü\n".encode()


def test_read_text_errors(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        data.read_text(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no \\*.txt files"):
        data.read_text(tmp_path)
    (tmp_path / "latin.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match="latin.txt: not UTF-8"):
        data.read_text(tmp_path)


def test_byte_tokenizer_round_trip():
    tok = data.ByteTokenizer()
    text = "héllo, wörld — 日本語 🙂"
    ids = tok.encode(text)
    assert tok.vocab_size == 256
    assert ids.dtype == np.int64 and len(ids) == len(text.encode("utf-8"))
    assert ids.min() >= 0 and ids.max() < 256
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text
    np.testing.assert_array_equal(tok.encode(text.encode("utf-8")), ids)
    assert tok.decode([]) == ""
    with pytest.raises(ValueError):
        tok.decode([256])


# --- speech -------------------------------------------------------------------------------------


def test_transcript_tokens():
    assert data.N_TOKENS == 29 and len(data.CHARS) == 28 and data.BLANK == 0
    ids = data.encode_transcript("It's A b")
    assert ids.dtype == np.int64 and ids.min() >= 1 and ids.max() <= 28
    assert data.decode_transcript(np.insert(ids, 2, 0)) == "it's a b"
    with pytest.raises(ValueError, match="3"):
        data.encode_transcript("route 3")


def test_read_speech_features(tmp_path):
    rng = np.random.default_rng(0)
    want = {}
    for i, text in enumerate(["HELLO WORLD", "it's ok"]):
        sub = tmp_path / f"spk{i}"
        sub.mkdir()
        feats = rng.normal(size=(5 + i, 40))
        np.save(sub / f"utt{i}.npy", feats)
        (sub / f"utt{i}.txt").write_text(text + "\n", encoding="utf-8")
        want[text.lower()] = feats
    got = data.read_speech_features(tmp_path)
    assert [t for _, t in got] == ["hello world", "it's ok"]
    for feats, text in got:
        assert feats.dtype == np.float32
        np.testing.assert_array_equal(feats, want[text].astype(np.float32))


def test_read_speech_errors(tmp_path):
    with pytest.raises(DataError, match="nowhere.*log-mel"):
        data.read_speech_features(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no .npy files"):
        data.read_speech_features(tmp_path)
    np.save(tmp_path / "a.npy", np.zeros((3, 40)))
    with pytest.raises(DataError, match="a.txt: transcript missing"):
        data.read_speech_features(tmp_path)
    (tmp_path / "a.txt").write_text("fine", encoding="utf-8")
    np.save(tmp_path / "b.npy", np.zeros((3, 13)))
    (tmp_path / "b.txt").write_text("fine", encoding="utf-8")
    with pytest.raises(DataError, match=r"b.npy: .*\(3, 13\)"):
        data.read_speech_features(tmp_path)
    np.save(tmp_path / "b.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="b.npy: not a plain .npy"):
        data.read_speech_features(tmp_path)
    np.save(tmp_path / "b.npy", np.zeros((3, 40)))
    (tmp_path / "b.txt").write_text("no digits 9", encoding="utf-8")
    with pytest.raises(DataError, match="b.txt: characters outside"):
        data.read_speech_features(tmp_path)


def test_synthetic_speech():
    a = data.synthetic_speech(6, seed=1)
    b = data.synthetic_speech(6, seed=1)
    assert len(a) == 6
    for (fa, ta), (fb, tb) in zip(a, b, strict=True):
        assert fa.dtype == np.float32 and fa.ndim == 2 and fa.shape[1] == 40
        np.testing.assert_array_equal(fa, fb)
        assert ta == tb and 1 <= len(ta.split()) <= 3
        assert len(fa) >= 2 * len(ta) + 2  # room for CTC: at least 2 frames per character
        data.encode_transcript(ta)
        assert all(x != y for x, y in zip(ta, ta[1:], strict=False))  # no blank needed
    assert [t for _, t in data.synthetic_speech(6, seed=2)] != [t for _, t in a]


# --- built-in sets ------------------------------------------------------------------------------


def test_digits_images_shape_range_determinism():
    pytest.importorskip("sklearn")
    images, labels = data.digits_images()
    assert images.shape == (1797, 1, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (1797,) and labels.dtype == np.int64
    assert images.min() == 0 and images.max() == 255
    assert set(labels.tolist()) == set(range(10))
    again, again_labels = data.digits_images()
    np.testing.assert_array_equal(images, again)
    np.testing.assert_array_equal(labels, again_labels)
    rgb, rgb_labels = data.digits_images(size=32, channels=3, seed=1)
    assert rgb.shape == (1797, 3, 32, 32)
    np.testing.assert_array_equal(rgb[:, 0], rgb[:, 2])
    assert not np.array_equal(rgb_labels, labels)
    assert np.bincount(rgb_labels).tolist() == np.bincount(labels).tolist()


def test_bilinear_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).random((2, 8, 8))
    for size in (5, 8, 28, 32):
        w = data._bilinear_matrix(8, size)
        ours = w @ x @ w.T
        ref = torch.nn.functional.interpolate(
            torch.from_numpy(x)[:, None], size=(size, size), mode="bilinear", align_corners=False
        )[:, 0].numpy()
        np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_synthetic_sequences():
    seqs = data.synthetic_sequences(50, 40, 16, seed=3)
    assert seqs.shape == (50, 40) and seqs.dtype == np.int64
    assert seqs.min() >= 0 and seqs.max() < 16
    np.testing.assert_array_equal(seqs, data.synthetic_sequences(50, 40, 16, seed=3))
    assert not np.array_equal(seqs, data.synthetic_sequences(50, 40, 16, seed=4))
    # learnable: the previous two tokens predict the next far better than chance
    ctx = seqs[:, :-2] * 16 + seqs[:, 1:-1]
    nxt = seqs[:, 2:]
    hits = sum(np.bincount(nxt[ctx == c]).max() for c in np.unique(ctx))
    assert hits / nxt.size > 0.8
    assert data.synthetic_sequences(2, 1, 1).tolist() == [[0], [0]]


# --- splits -------------------------------------------------------------------------------------


def test_split_validation():
    train, val = data.split_validation(1000)
    assert len(val) == 100 and len(train) == 900
    assert np.intersect1d(train, val).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(1000))
    again = data.split_validation(1000)
    np.testing.assert_array_equal(val, again[1])
    assert not np.array_equal(val, data.split_validation(1000, seed=0)[1])
    assert len(data.split_validation(10, fraction=0.0)[1]) == 0
    with pytest.raises(ValueError):
        data.split_validation(10, fraction=1.0)


def test_random_labels():
    labels = np.random.default_rng(0).integers(0, 10, size=500)
    shuffled = data.random_labels(labels)
    assert shuffled.dtype == labels.dtype
    np.testing.assert_array_equal(np.sort(shuffled), np.sort(labels))
    np.testing.assert_array_equal(shuffled, data.random_labels(labels))
    assert (shuffled != labels).mean() > 0.5
    assert not np.array_equal(shuffled, data.random_labels(labels, seed=1))
