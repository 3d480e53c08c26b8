"""Sign-in (dashboard and admin) against password guessing: counted in the real cache (Redis)."""

from __future__ import annotations

import time

import pytest

from tests.factories import make_user

pytestmark = pytest.mark.django_db

LOGIN = "/accounts/login/"
REFUSED = "Too many failed sign-ins"


@pytest.fixture
def limits(settings):
    settings.LOGIN_FAILURES_MAX = 3
    settings.LOGIN_LOCKOUT_SECONDS = 3  # ten times what the few (cheaply hashed) sign-ins before the check take on a busy machine
    return settings


def sign_in(client, username, password, url=LOGIN):
    response = client.post(url, {"username": username, "password": password})
    return response, "_auth_user_id" in client.session


def test_repeated_failures_lock_that_username_from_that_address_until_the_window_passes(client, limits):
    make_user("olga", password="right-pw-1")
    make_user("victor", password="right-pw-2")
    for attempt in range(3):
        response, signed_in = sign_in(client, "olga", "guess")
        assert response.status_code == 200 and not signed_in and REFUSED not in response.content.decode()
        if attempt == 0:
            first_failure = time.monotonic()  # counted: the window runs from here
    response, signed_in = sign_in(client, "OLGA ", "right-pw-1")  # even the right password, however typed
    assert response.status_code == 200 and not signed_in
    assert "Too many failed sign-ins; try again in 1 minute." in response.content.decode()
    assert sign_in(client, "victor", "right-pw-2")[1]  # another account from the same address is not locked
    client.logout()
    time.sleep(max(0.0, first_failure + limits.LOGIN_LOCKOUT_SECONDS + 0.2 - time.monotonic()))
    assert sign_in(client, "olga", "right-pw-1")[1]


def test_a_successful_sign_in_clears_its_failures(client, limits):
    make_user("olga", password="right-pw-1")
    for _ in range(2):
        sign_in(client, "olga", "guess")
    assert sign_in(client, "olga", "right-pw-1")[1]
    client.logout()
    for _ in range(2):
        sign_in(client, "olga", "guess")
    assert sign_in(client, "olga", "right-pw-1")[1]


def test_an_address_guessing_many_usernames_is_stopped_too(client, limits):
    limits.LOGIN_LOCKOUT_SECONDS = 60  # fifteen sign-ins on a busy machine may take longer than 3 s
    make_user("olga", password="right-pw-1")
    for n in range(15):  # five times the per-username limit, each name below it
        sign_in(client, f"user-{n}", "guess")
    response, signed_in = sign_in(client, "olga", "right-pw-1")
    assert not signed_in and REFUSED in response.content.decode()


def test_the_admin_sign_in_is_throttled_as_well(client, limits):
    make_user("root", password="right-pw-1", staff=True)
    for _ in range(3):
        sign_in(client, "root", "guess", url="/admin/login/")
    response, signed_in = sign_in(client, "root", "right-pw-1", url="/admin/login/")
    assert not signed_in and REFUSED in response.content.decode()


def test_zero_turns_the_limit_off(client, limits):
    limits.LOGIN_FAILURES_MAX = 0
    make_user("olga", password="right-pw-1")
    for _ in range(5):
        sign_in(client, "olga", "guess")
    assert sign_in(client, "olga", "right-pw-1")[1]


def test_a_post_without_a_password_does_not_clear_the_failures(client, limits):
    """Only a sign-in that succeeded clears its username's count: a form that never checked a
    password (an empty one) used to, so a guesser reset the lock with every few guesses."""
    make_user("olga", password="right-pw-1")
    for _ in range(2):
        sign_in(client, "olga", "guess")
    sign_in(client, "olga", "")  # below the limit, so it gets past the throttle to the form
    sign_in(client, "olga", "guess")
    response, signed_in = sign_in(client, "olga", "right-pw-1")
    assert not signed_in and REFUSED in response.content.decode()


def test_the_same_username_in_another_unicode_form_is_counted_with_it(client, limits):
    """The form signs in the username NFKC-normalized (fullwidth letters are plain ones): counting each
    spelling apart gave a guesser a fresh allowance per spelling."""
    make_user("olga", password="right-pw-1")
    for _ in range(3):
        sign_in(client, "olga", "guess")
    response, signed_in = sign_in(client, "\uff4f\uff4c\uff47\uff41", "right-pw-1")  # fullwidth "olga"
    assert not signed_in and REFUSED in response.content.decode()


def test_attempts_running_at_once_cannot_check_more_passwords_than_the_limit(client, limits, monkeypatch):
    """Each attempt is counted before its password is checked: counted after, attempts sent in parallel
    all saw the count of before any of them failed, and each checked a password."""
    from django.contrib.auth import forms as auth_forms
    from django.test import Client

    # This test waits for no window to pass: a long one, so six sign-ins on a busy machine all fall in it
    # (with the fixture's 3 s the window could end mid-test and a seventh check be allowed).
    limits.LOGIN_LOCKOUT_SECONDS = 120
    make_user("olga", password="right-pw-1")
    real_authenticate, checked = auth_forms.authenticate, []

    def authenticate(*args, **kwargs):
        checked.append(kwargs["username"])
        if len(checked) == 1:  # while the first password is being checked, five more attempts arrive
            for _ in range(5):
                sign_in(Client(), "olga", "guess")
        return real_authenticate(*args, **kwargs)

    monkeypatch.setattr(auth_forms, "authenticate", authenticate)
    sign_in(client, "olga", "guess")
    assert len(checked) == limits.LOGIN_FAILURES_MAX


def test_with_the_cache_unreachable_a_wrong_password_is_refused_as_usual(client, limits, settings):
    from config.cache import FailSoftRedisCache

    settings.CACHES = {"default": {"BACKEND": "config.cache.FailSoftRedisCache", "LOCATION": "redis://127.0.0.1:1/0",
                                   "OPTIONS": {"socket_connect_timeout": 1, "socket_timeout": 1}}}
    make_user("olga", password="right-pw-1")
    try:
        for _ in range(2):
            response, signed_in = sign_in(client, "olga", "guess")
            assert response.status_code == 200 and not signed_in
            assert "Please enter a correct username and password" in response.content.decode()
        assert sign_in(client, "olga", "right-pw-1")[1]
    finally:
        FailSoftRedisCache._down_until = 0.0  # the next tests' cache is reachable: ask it at once


def test_ipv6_addresses_of_one_network_count_as_one_address(client, limits):
    """An IPv6 host usually holds a whole /64 (2^64 addresses): counted per address, a guesser took a
    fresh one for each few guesses, and no limit applied at all."""
    make_user("olga", password="right-pw-1")
    for n in range(3):
        client.post(LOGIN, {"username": "olga", "password": "guess"}, REMOTE_ADDR=f"2001:db8:0:1::{n + 1:x}")
    client.post(LOGIN, {"username": "olga", "password": "right-pw-1"}, REMOTE_ADDR="2001:db8:0:1:ffff::9")
    assert "_auth_user_id" not in client.session
    client.post(LOGIN, {"username": "olga", "password": "right-pw-1"}, REMOTE_ADDR="2001:db8:0:2::1")
    assert "_auth_user_id" in client.session  # another network is not locked


def test_the_right_password_of_a_non_staff_account_on_the_admin_sign_in_is_no_failure(client, limits):
    """The admin refuses non-staff accounts with the same code as a wrong password: counted, an
    operator trying the admin a few times locked their own dashboard sign-in."""
    make_user("olga", password="right-pw-1")
    for _ in range(4):
        response, signed_in = sign_in(client, "olga", "right-pw-1", url="/admin/login/")
        assert not signed_in and REFUSED not in response.content.decode()
    assert sign_in(client, "olga", "right-pw-1")[1]


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/", "/\\evil.example", "javascript:alert(1)"])
def test_signing_in_or_out_never_redirects_off_the_site(client, target):
    make_user("olga")
    signed_in = client.post("/accounts/login/", {"username": "olga", "password": "pw-for-tests-1", "next": target})
    assert signed_in.status_code == 302 and signed_in["Location"] == "/"
    assert target not in client.get("/accounts/login/", {"next": target}).content.decode()
    signed_out = client.post("/accounts/logout/", {"next": target})
    assert signed_out.status_code == 302 and signed_out["Location"] == "/accounts/login/?signed_out=1"


# -- signed out mid-action -----------------------------------------------------------------------------


def test_an_action_whose_sign_in_ended_signs_in_again_and_returns_to_the_page_it_was_made_on(client, operator, story):
    """The browser session ended while the timeline was open (expired, or signed out in another tab)."""
    from django.contrib.auth.views import redirect_to_login
    from django.urls import reverse

    page = reverse("snapshots:session", kwargs={"session_id": story.pk}) + "?pinned=1"
    mark = reverse("snapshots:mark", kwargs={"session_id": story.pk, "number": 2})
    login = redirect_to_login(page)["Location"]
    assert login.startswith(f"{LOGIN}?next=")

    # htmx (pin, label): a full page load of the sign-in page, not the page swapped into the row.
    response = client.post(mark, {"pinned": "1"}, headers={"HX-Request": "true", "HX-Current-URL": f"http://testserver{page}"})
    assert response.status_code == 200 and response.content == b"" and response["HX-Redirect"] == login
    # A form without JavaScript: after signing in, back to the page, not a GET of the POST-only address (405).
    response = client.post(mark, {"pinned": "1"}, headers={"Referer": f"http://testserver{page}"})
    assert response.status_code == 302 and response["Location"] == login
    client.force_login(operator)
    assert client.get(page).status_code == 200
    assert not story.versions.filter(pinned=True).exists()  # nothing was done while signed out

    # Another site's address is never where signing in leads; without one it is as before.
    client.logout()
    response = client.post(mark, {"pinned": "1"}, headers={"Referer": "https://elsewhere.example/x"})
    assert response["Location"] == redirect_to_login(mark)["Location"]
    response = client.post(mark, {"pinned": "1"}, headers={"HX-Request": "true", "HX-Current-URL": "https://elsewhere.example/x"})
    assert response.status_code == 302 and "HX-Redirect" not in response
    # A page asked for while signed out still returns to itself.
    assert client.get(page)["Location"] == login


def test_a_page_that_sent_you_to_sign_in_is_named_and_the_plain_sign_in_page_is_not(client, story):
    """Signed out in another tab, the next click landed on a bare sign-in page, saying nothing of why."""
    sent = client.get(f"/sessions/{story.pk}/", follow=True)
    page = sent.content.decode()
    assert sent.redirect_chain[-1][0].startswith("/accounts/login/?next=")
    assert "Sign in to continue to that page: it needs a signed-in user" in page
    assert "Sign in to continue" not in client.get("/accounts/login/").content.decode()
    assert "Sign in to continue" not in client.get("/accounts/login/?next=/").content.decode()
