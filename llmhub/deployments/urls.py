from django.urls import path

from . import views

app_name = "deployments"
urlpatterns = [
    path("", views.deployment_list, name="list"),
    path("new", views.deployment_create, name="create"),
    path("new/estimate", views.deployment_estimate, name="estimate"),
    path("<str:deploy_id>/", views.deployment_detail, name="detail"),
    path("<str:deploy_id>/status", views.deployment_status, name="status"),
    path("<str:deploy_id>/live", views.deployment_live, name="live"),
    path("<str:deploy_id>/charts", views.deployment_charts, name="charts"),
    path("<str:deploy_id>/scale", views.deployment_scale, name="scale"),
    path("<str:deploy_id>/adapters", views.deployment_adapters, name="adapters"),
    path("<str:deploy_id>/scale-to-zero", views.deployment_scale_to_zero, name="scale-to-zero"),
    path("<str:deploy_id>/instances/<int:instance_id>/logs", views.instance_logs, name="instance-logs"),
    path("<str:deploy_id>/delete", views.deployment_delete, name="delete"),
    path("<str:deploy_id>/chat", views.deployment_chat, name="chat"),
]
