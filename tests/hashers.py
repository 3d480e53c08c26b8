"""A cheap password hash for the test process, readable by the servers the tests start.

Django's default PBKDF2 runs a million SHA-256 rounds per hash: a third of a second or more on a
busy two-core machine, paid for every test user made and every password checked, which made that
most of the time of the dashboard tests. The suite proves nothing about the cost of a hash, so the
test process hashes with 1,000 rounds. The algorithm and the format stay PBKDF2's ("pbkdf2_sha256$
rounds$salt$hash"), so a uvicorn or Celery process on the production settings verifies these hashes
as they are (PBKDF2 reads the rounds from the hash) and, as after any raise of the round count,
re-hashes the password at the production cost on its next successful sign-in."""

from __future__ import annotations

from django.contrib.auth.hashers import PBKDF2PasswordHasher


class FastPBKDF2PasswordHasher(PBKDF2PasswordHasher):
    iterations = 1_000
