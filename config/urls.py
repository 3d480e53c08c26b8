from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.http import HttpRequest, HttpResponse
from django.urls import include, path
from django.views.decorators.cache import cache_control

from config import health
from sessions_app.forms import AdminSignInForm, SignInForm

admin.site.login_form = AdminSignInForm


@cache_control(max_age=86400, public=True)
def no_favicon(request: HttpRequest) -> HttpResponse:
    """Browsers ask every site for /favicon.ico; the admin's pages name no icon (ours say `data:,`).
    A 204 instead of a 404 keeps "Not Found" warnings out of the log and errors out of the console."""
    return HttpResponse(status=204)

urlpatterns = [
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("favicon.ico", no_favicon),
    path("accounts/login/", auth_views.LoginView.as_view(redirect_authenticated_user=True, form_class=SignInForm), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("api/v1/", include("snapshots_app.api.urls")),
    path("", include("snapshots_app.urls")),
    path("", include("sessions_app.urls")),
]
