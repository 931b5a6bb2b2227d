# The service's processes (`meter run metering`, `meter run ops`); see docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Only what the package is built from, so a change to the tests or the docs does not rebuild.
COPY pyproject.toml ./
COPY contracts ./contracts
COPY infra ./infra
COPY rating ./rating
COPY balance ./balance
COPY metering ./metering
COPY enforcement ./enforcement
COPY recharge ./recharge
COPY ops ./ops
COPY bridge ./bridge
COPY portal ./portal
COPY meter ./meter
RUN pip install . \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin meter

# The service keeps no state of its own: Kafka, Redis and PostgreSQL hold it.
USER meter
EXPOSE 9464
CMD ["meter", "run", "metering"]
