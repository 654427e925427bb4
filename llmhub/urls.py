from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path
from django.views.generic import RedirectView

from llmhub.deployments import views as deployment_views
from llmhub.deployments.api import api as deploy_api
from llmhub.gateway import pages as gateway_pages
from llmhub.gateway import views as gateway_views

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="deployments:list", permanent=False)),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("deploy/", deploy_api.urls),
    # The deployment page's request log: the gateway's records, on a deployments URL.
    path("deployments/<str:deploy_id>/requests/", gateway_pages.request_logs, name="request-logs"),
    path(
        "deployments/<str:deploy_id>/requests.jsonl", gateway_pages.request_logs_download, name="request-logs-download"
    ),
    path("deployments/", include("llmhub.deployments.urls")),
    path("tokens/", include("llmhub.accounts.urls")),
    path("billing/", include("llmhub.billing.urls")),
    path("v1/openai/", include("llmhub.gateway.urls")),
    path("metrics", gateway_views.metrics_view, name="metrics"),
    # Model pages last: `/<username>/<model_name>` would otherwise shadow the paths above.
    path("<str:username>/<str:model_name>", deployment_views.model_page, name="model"),
    path("<str:username>/<str:model_name>/api", deployment_views.model_page, {"tab": "api"}, name="model-api"),
]
handler500 = "llmhub.unavailable.server_error"  # a database outage: 503 (llmhub/unavailable.py)
