from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path
from django.views.generic import RedirectView

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="deployments:list", permanent=False)),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("deploy/", include("llmhub.deployments.api_urls")),
    path("deployments/", include("llmhub.deployments.urls")),
    path("v1/openai/", include("llmhub.gateway.urls")),
]
