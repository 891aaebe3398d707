"""A minimal Django project on disk whose only app has the migrations a test gives it, and
`manage.py migrate` run as a subprocess (Django's settings are process-global).

The database settings are what a Django user writes to reach the broker: the postgresql
backend (psycopg 3) with libpq's TLS options pointing at the workload's SVID.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

APP = "compatapp"
CREATE_ORDERS = """
from django.db import migrations, models

class Migration(migrations.Migration):
    initial = True
    dependencies = []
    operations = [
        migrations.CreateModel(
            name="Order",
            fields=[
                ("id", models.BigAutoField(primary_key=True)),
                ("item", models.CharField(max_length=40)),
            ],
        ),
    ]
"""
ADD_NOTE = """
from django.db import migrations, models

class Migration(migrations.Migration):
    dependencies = [("compatapp", "0001_initial")]
    operations = [
        migrations.AddField("Order", "note", models.TextField(default="")),
        migrations.AlterField("Order", "item", models.CharField(max_length=80)),
    ]
"""
MIGRATIONS = {"0001_initial": CREATE_ORDERS, "0002_note": ADD_NOTE}
# One migrate of two small migrations takes about a second; a hang fails the test instead.
MIGRATE_TIMEOUT = 120.0


def database_settings(
    host: str, port: int, *, bundle: Path, cert: Path, key: Path, schema: str | None = None
) -> dict[str, Any]:
    """settings.DATABASES["default"] for the broker: the SVID is the only credential."""
    options: dict[str, Any] = {
        "sslmode": "verify-full",
        "sslrootcert": str(bundle),
        "sslcert": str(cert),
        "sslkey": str(key),
    }
    if schema is not None:
        options["options"] = f"-c search_path={schema}"
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "appdb",
        "USER": "ignored",
        "HOST": host,
        "PORT": str(port),
        "OPTIONS": options,
    }


def write_project(root: Path, database: dict[str, Any], migrations: list[str]) -> None:
    """The project under `root` with `migrations` (names of MIGRATIONS) in its app."""
    app = root / APP
    (app / "migrations").mkdir(parents=True, exist_ok=True)
    (app / "__init__.py").write_text("")
    (app / "models.py").write_text("")
    (app / "migrations" / "__init__.py").write_text("")
    for name in migrations:
        (app / "migrations" / f"{name}.py").write_text(MIGRATIONS[name])
    (root / "compat_settings.py").write_text(
        f"SECRET_KEY = 'compat-only'\nINSTALLED_APPS = [{APP!r}]\nUSE_TZ = True\n"
        f"DEFAULT_AUTO_FIELD = 'django.db.models.BigAutoField'\n"
        f"DATABASES = {{'default': {database!r}}}\n"
    )


async def migrate(root: Path) -> tuple[int, str]:
    """`django-admin migrate` in the project; (exit code, stdout and stderr)."""
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "compat_settings", "PYTHONPATH": str(root)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "django", "migrate", "--no-input", "-v", "1",
        cwd=root, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), MIGRATE_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode()
