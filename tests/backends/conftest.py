from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from openai_server import OpenAIServer


@pytest.fixture
def openai_server():
    with OpenAIServer() as server:
        yield server
