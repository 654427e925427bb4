"""The tests' own flush between transactional tests (`tests.conftest.quick_flush`): DELETE in place of
TRUNCATE, still safe against processes outside the test that write meanwhile."""

import psycopg
import pytest
from django.core.management.color import no_style
from django.db import connection, transaction

from tests.factories import UserFactory

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_process_outside_the_test_cannot_write_while_the_flush_runs():
    # The shared web processes write usage records up to a second after an answer; one committed between the
    # flush's DELETEs would reference a user already deleted and fail the flush's commit (seen in CI).
    UserFactory()
    db = connection.settings_dict
    outside = psycopg.connect(dbname=db["NAME"], user=db["USER"], password=db["PASSWORD"], host=db["HOST"],
                              port=db["PORT"], autocommit=True)  # fmt: skip
    tables = connection.introspection.django_table_names(only_existing=True, include_views=False)
    try:
        outside.execute("SET lock_timeout = '300ms'")
        with transaction.atomic():
            with connection.cursor() as cursor:
                for statement in connection.ops.sql_flush(no_style(), tables):
                    cursor.execute(statement)
            with pytest.raises(psycopg.errors.LockNotAvailable):
                outside.execute("SELECT count(*) FROM gateway_usagerecord")
        assert outside.execute("SELECT count(*) FROM accounts_user").fetchone() == (0,)
    finally:
        outside.close()
