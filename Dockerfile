# Callgate on Fly.io (or anywhere with Docker). Production uses DATABASE_URL; without it the
# embedded PostgreSQL from requirements.txt starts inside the container (data in /app/.callgate).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PORT=8081

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY . .
# Not root: PostgreSQL (when embedded) refuses root, and the server needs no privilege.
RUN useradd --system --uid 10001 --home-dir /app callgate && chown -R callgate /app
USER callgate

EXPOSE 8081
# SIGTERM drains live calls (SHUTDOWN_DRAIN_MS) before the process exits.
STOPSIGNAL SIGTERM
CMD ["python", "server.py"]
