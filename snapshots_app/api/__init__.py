"""The REST API's edge for versions: record, list, read, head, diff, rewind, fork, pin/label, batch,
and the root URLconf of /api/v1/ (this app may import sessions_app; the reverse is not allowed)."""
