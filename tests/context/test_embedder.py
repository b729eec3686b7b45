"""The bundled embedder: one text (a lookup's question) takes a shorter path through
the model than a batch; both give the same vectors, for any text."""

from __future__ import annotations

import numpy as np
import pytest

from tokenguard.context.embedder import as_embedder

pytest.importorskip("sentence_transformers")

MINILM = as_embedder(None)
TEXTS = ["What is the capital of France, and why?", "上海飞纽约要多久？", "word " * 600, "a\ud800b", "", "🙂"]


def test_one_text_at_a_time_gives_the_vectors_of_a_batch():
    batch = MINILM(TEXTS)
    assert batch.shape == (len(TEXTS), 384) and batch.dtype == np.float32
    one_by_one = np.vstack([MINILM([text]) for text in TEXTS])
    np.testing.assert_allclose(one_by_one, batch, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(one_by_one, axis=1), 1.0, atol=1e-5)
