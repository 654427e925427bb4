"""Settings for the test suite: the project's settings (llmhub/settings.py) with a fast password hasher.

PBKDF2 (Django's default, about a million iterations) costs a noticeable fraction of a second per hash on
these machines, and the suite creates hundreds of users. MD5 is unfit for real passwords and fine for test
passwords. The platform processes the tests start (web, worker, beat; `manage.py up`) inherit
DJANGO_SETTINGS_MODULE from pytest, so they check these hashes with the same hasher.
"""

from llmhub.settings import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
