"""Admin support for rows that carry billable history (users, instances, deployments): no bulk delete,
and no delete at all of a row whose instances ran (invoices are built from them)."""

from django.contrib import admin


class KeepsHistoryAdmin(admin.ModelAdmin):
    """A ModelAdmin without "delete selected"; `has_history(obj)` True also refuses the single delete."""

    def has_history(self, obj) -> bool:
        """True when `obj` has billable history (subclasses say what that is). Default: never."""
        return False

    def has_delete_permission(self, request, obj=None):
        if obj is not None and self.has_history(obj):
            return False
        return super().has_delete_permission(request, obj)

    def get_actions(self, request):
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # a bulk delete would take the history with it
        return actions
