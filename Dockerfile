FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 TOKENWARDEN_HOME=/var/lib/tokenwarden
WORKDIR /app

COPY pyproject.toml README.md ./
COPY config ./config
COPY worker ./worker
COPY tasks ./tasks
COPY producer ./producer
COPY migrations ./migrations
COPY tokenwarden ./tokenwarden
RUN pip install --no-cache-dir . \
    && useradd --system --home-dir /var/lib/tokenwarden --create-home tokenwarden

USER tokenwarden
EXPOSE 8000
CMD ["tokenwarden", "api"]
