# The LLMHub application image (web, worker and beat run from it; see compose.yaml).
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY requirements.lock pyproject.toml ./
RUN pip install -r requirements.lock
COPY . .
RUN pip install --no-deps -e .
EXPOSE 8000
CMD ["uvicorn", "llmhub.asgi:application", "--host", "0.0.0.0", "--port", "8000"]
