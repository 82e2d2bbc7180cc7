import os
import sys
from pathlib import Path

import pytest

# Tests run on CPU with few threads; keep torch from oversubscribing the 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# gloo's default interface may not route to this host; loopback serves single-host tests.
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def digits_data(tmp_path_factory):
    """A small copy of the shipped real-image dataset (digit mosaics), made once per session."""
    from open_clip_sigrel.data import make_digits_dataset

    return make_digits_dataset(tmp_path_factory.mktemp("digits") / "data", n_train=512, n_val=128, shard_size=128)


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable
