from django.urls import path

from . import views

app_name = "billing"
urlpatterns = [
    path("", views.overview, name="overview"),
    path("settings/", views.billing_settings, name="settings"),
    path("invoices/", views.invoice_list, name="invoices"),
    path("invoices/<str:number>/", views.invoice_detail, name="invoice"),
    path("invoices/<str:number>/print", views.invoice_print, name="invoice-print"),
    path("stripe/webhook", views.stripe_webhook, name="stripe-webhook"),
]
