"""The REST API's edge for projects, sessions, API keys and the audit log (DRF, under /api/v1/)."""
