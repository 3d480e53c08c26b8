from tests.client.conftest import live_api, rewind  # noqa: F401  (the same live server and key)
