"""Python client for the Session Rewind API."""

__version__ = "0.1.0"
