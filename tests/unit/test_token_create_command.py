import io

import pytest
from django.core.management import CommandError, call_command

from llmhub.accounts.services import api_token_authenticate
from tests.factories import UserFactory


def run(*args) -> str:
    out = io.StringIO()
    call_command("token_create", *args, stdout=out)
    return out.getvalue().strip()


@pytest.mark.django_db
def test_prints_a_secret_that_authenticates_the_user_and_nothing_else():
    user = UserFactory(username="carol")
    secret = run("carol", "--name", "compose")
    assert secret.startswith("lh-") and "\n" not in secret
    assert api_token_authenticate(secret) == user
    assert user.api_tokens.get().name == "compose"


@pytest.mark.django_db
@pytest.mark.parametrize(
    "args, message",
    [
        (("nobody",), "No user 'nobody'"),
        (("dave", "--name", "x" * 101), "--name"),
        (("eve",), "inactive"),
    ],
)
def test_refuses_with_a_message(args, message):
    UserFactory(username="dave")
    UserFactory(username="eve", is_active=False)
    with pytest.raises(CommandError, match=message):
        run(*args)
