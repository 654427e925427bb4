"""Encryption at rest for secrets LLMHub must give back to an engine (Hugging Face tokens).

Fernet (AES-128-CBC + HMAC-SHA256, from `cryptography`) keyed by settings.ENCRYPTION_KEY.
"""

from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings


def _fernet() -> Fernet:
    return Fernet(settings.ENCRYPTION_KEY.encode())


def encrypt(plaintext: str) -> str:
    """Fernet token (urlsafe base64 text) for `plaintext`; '' for ''."""
    return _fernet().encrypt(plaintext.encode()).decode() if plaintext else ""


def decrypt(ciphertext: str) -> str:
    """The plaintext of `encrypt`'s output; '' for ''. Raises ValueError when the key does not match."""
    if not ciphertext:
        return ""
    try:
        return _fernet().decrypt(ciphertext.encode()).decode()
    except InvalidToken as exc:
        raise ValueError("secret cannot be decrypted with LLMHUB_ENCRYPTION_KEY") from exc
