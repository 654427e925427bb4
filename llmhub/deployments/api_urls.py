from django.urls import path

from . import api

app_name = "deploy-api"
urlpatterns = [
    path("llm", api.deploy_create, name="create"),
    path("list", api.deploy_list, name="list"),
    path("<str:deploy_id>", api.deploy_detail, name="detail"),
]
