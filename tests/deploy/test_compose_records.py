"""docker-compose.yml: the PostgreSQL service of the inspection records, checked statically."""

from __future__ import annotations

from sqlalchemy.engine import make_url

from tests.deploy.test_compose import API, COMPOSE, SERVICES, env_example


def test_postgres_service_with_volume_and_healthcheck() -> None:
    pg = SERVICES["postgres"]
    assert "profiles" not in pg  # always on, like redis
    assert pg["image"].startswith("postgres:")  # the official image
    hc = pg["healthcheck"]
    assert hc["test"][0] == "CMD-SHELL" and "pg_isready" in hc["test"][1]
    assert "-U zsi" in hc["test"][1] and "-d zsi" in hc["test"][1]
    assert "pg-data:/var/lib/postgresql/data" in pg["volumes"]
    assert "pg-data" in COMPOSE["volumes"]
    assert "ports" not in pg  # only the API talks to it
    assert pg["restart"] == "unless-stopped"
    env = pg["environment"]
    assert env["POSTGRES_USER"] == "zsi" and env["POSTGRES_DB"] == "zsi"
    assert env["POSTGRES_PASSWORD"] == "${ZSI_POSTGRES_PASSWORD:-zsi}"


def test_api_records_go_to_the_compose_postgres() -> None:
    pg_env = SERVICES["postgres"]["environment"]
    for name in API:
        s = SERVICES[name]
        assert s["depends_on"]["postgres"]["condition"] == "service_healthy"
        value = s["environment"]["ZSI_DATABASE_URL"]
        assert value.startswith("${ZSI_DATABASE_URL:-") and value.endswith("}")
        url = make_url(value[len("${ZSI_DATABASE_URL:-") : -1])
        assert url.get_backend_name() == "postgresql" and url.host == "postgres" and url.port == 5432
        assert url.username == pg_env["POSTGRES_USER"] and url.database == pg_env["POSTGRES_DB"]
        assert url.password == "zsi"  # the POSTGRES_PASSWORD default
        assert "data:/data" in s["volumes"]  # the local journal and kept images live in ZSI_DATA_DIR


def test_env_example_documents_the_records_settings() -> None:
    documented = env_example()
    assert documented["ZSI_POSTGRES_PASSWORD"] == "zsi"
    assert make_url(documented["ZSI_DATABASE_URL"]).host == "postgres"
