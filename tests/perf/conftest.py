import pytest


@pytest.fixture(autouse=True)
def _private_activation_cache(tmp_path_factory, monkeypatch):
    """The planner's on-disk activation cache goes to a folder of this test session, never ~/.cache."""
    monkeypatch.setenv("FLOWTOK_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "activation_cache"))
