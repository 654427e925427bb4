# The LLMHub application image: web, worker and beat in compose.yaml run from it.
#
# PYTHON_IMAGE is the base: the public `python:3.11-slim` by default; on a machine that cannot pull,
# `llmhub/platform-base:<hash>` (workers/images/platform-base: Debian's Python with requirements.lock
# already installed, built by `python -m llmhub.fleet.images --recipe platform-base`), with which the
# `pip install` below has nothing to do and needs no network.
# No secret is copied in (.dockerignore keeps out .env, .llmhub/ and the virtual environment): they
# come from the environment at run time.
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONPATH=/app \
    LLMHUB_STATE_DIR=/tmp/llmhub
WORKDIR /app
COPY requirements.lock pyproject.toml ./
RUN pip install -q -r requirements.lock
COPY . .
# Bytecode compiled now: web runs as nobody and cannot write it, so each process would compile its imports again.
RUN python -m compileall -q llmhub workers manage.py
EXPOSE 8000
CMD ["python", "-m", "llmhub.web", "--host", "127.0.0.1", "--port", "8000"]
