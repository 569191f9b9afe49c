"""The demos' data, all available offline: scikit-learn's handwritten digits (1,797 8x8 images,
10 classes; the optional dependency ``genkernels[demo]``) and the Python standard library's own
source code as a character-level corpus. Each comes with a fixed held-out split."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

HELD_OUT = 0.2  # share of the digits kept for evaluation
SPLIT_SEED = 0


def _sklearn():
    try:
        import sklearn  # noqa: F401  (imported here: only the demos and their checks need it)
    except ImportError:
        raise ImportError(
            "the image demos use scikit-learn's digits and classifier: pip install 'genkernels[demo]'"
        ) from None
    import sklearn.datasets
    import sklearn.linear_model

    return sklearn


@dataclass
class Digits:
    """Images ``(N, 1, 8, 8)`` in [0, 1] and labels ``(N,)``, split into train and test."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor


def load_digits() -> Digits:
    """scikit-learn's digits scaled from 0..16 to [0, 1], with a fixed 80/20 split."""
    digits = _sklearn().datasets.load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    order = torch.from_numpy(np.random.default_rng(SPLIT_SEED).permutation(len(labels)))
    n_test = round(HELD_OUT * len(labels))
    test, train = order[:n_test], order[n_test:]
    return Digits(images[train], labels[train], images[test], labels[test])


class DigitClassifier:
    """Logistic regression trained on all the real 8x8 digits: the judge of generated images."""

    def __init__(self) -> None:
        sklearn = _sklearn()
        digits = sklearn.datasets.load_digits()
        self.model = sklearn.linear_model.LogisticRegression(max_iter=2000).fit(digits.data / 16.0, digits.target)

    def predict(self, images: Tensor) -> Tensor:
        """Classes of images ``(N, 1, S, S)`` in [0, 1], S a multiple of 8 (average-pooled to 8x8)."""
        pooled = torch.nn.functional.adaptive_avg_pool2d(images.float().cpu(), 8)
        return torch.from_numpy(self.model.predict(pooled.flatten(1).clamp(0, 1).numpy()))


# Characters: newline and printable ASCII; a tab becomes four spaces, anything else "?".
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
_TABLE = np.full(256, VOCAB.index("?"), dtype=np.int64)
_TABLE[[ord(c) for c in VOCAB]] = np.arange(len(VOCAB))


def encode(text: str) -> Tensor:
    """Token ids of ``text`` in `VOCAB`."""
    raw = text.replace("\t", "    ").encode("ascii", errors="replace")
    return torch.from_numpy(_TABLE[np.frombuffer(raw, dtype=np.uint8)])


def decode(ids: Tensor) -> str:
    """The text of token ids."""
    return "".join(VOCAB[i] for i in ids.tolist())


@dataclass
class Corpus:
    """Token ids of the training and held-out text, and the files each came from."""

    train: Tensor
    test: Tensor
    train_files: list[str]
    test_files: list[str]


def python_source_corpus(held_out_every: int = 10) -> Corpus:
    """The ``*.py`` files at the top of the standard library (``os.path.dirname(os.__file__)``),
    in sorted order; every ``held_out_every``-th file is held out. Files are joined with a blank
    line between them."""
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
    if len(files) < held_out_every:
        raise FileNotFoundError(f"found only {len(files)} Python files in {os.path.dirname(os.__file__)}")
    test_files = files[held_out_every - 1 :: held_out_every]
    train_files = [f for f in files if f not in set(test_files)]

    def read(paths: list[str]) -> Tensor:
        texts = []
        for path in paths:
            with open(path, encoding="utf-8", errors="replace") as f:
                texts.append(f.read())
        return encode("\n\n".join(texts))

    return Corpus(read(train_files), read(test_files), train_files, test_files)


def bigram_bits_per_char(train: Tensor, inputs: Tensor, targets: Tensor, vocab_size: int = len(VOCAB)) -> float:
    """Bits per character of ``targets`` given the preceding ``inputs`` under the bigram model of
    ``train`` (add-one smoothing): the baseline a language model must beat."""
    counts = torch.bincount(train[:-1] * vocab_size + train[1:], minlength=vocab_size**2).view(vocab_size, vocab_size)
    log_probs = torch.log2((counts + 1.0) / (counts.sum(dim=1, keepdim=True) + vocab_size))
    return float(-log_probs[inputs.flatten(), targets.flatten()].mean())
