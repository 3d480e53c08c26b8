from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from config import health
from sessions_app.forms import AdminSignInForm, SignInForm

admin.site.login_form = AdminSignInForm

urlpatterns = [
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("accounts/login/", auth_views.LoginView.as_view(redirect_authenticated_user=True, form_class=SignInForm), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("api/v1/", include("snapshots_app.api.urls")),
    path("", include("snapshots_app.urls")),
    path("", include("sessions_app.urls")),
]
