import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory):
    """Built-in datasets are packed once per test session, away from the user's cache."""
    old = os.environ.get("HPCACCEL_DATA")
    os.environ["HPCACCEL_DATA"] = str(tmp_path_factory.getbasetemp() / "data-cache")
    yield
    if old is None:
        del os.environ["HPCACCEL_DATA"]
    else:
        os.environ["HPCACCEL_DATA"] = old
