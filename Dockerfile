FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 TOKENWARDEN_HOME=/var/lib/tokenwarden
WORKDIR /app

# constraints.txt pins every dependency (`make constraints` refreshes it): the image installs
# the versions CI tested, not whatever is newest on the day it is built.
COPY pyproject.toml README.md constraints.txt ./
COPY config ./config
COPY worker ./worker
COPY tasks ./tasks
COPY producer ./producer
COPY migrations ./migrations
COPY tokenwarden ./tokenwarden
RUN pip install --no-cache-dir -c constraints.txt . \
    && useradd --system --home-dir /var/lib/tokenwarden --create-home tokenwarden

USER tokenwarden
EXPOSE 8000
CMD ["tokenwarden", "api"]
