# Session Rewind. The two commands a newcomer needs: `make run` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
# The real services `make test`, `make serve` and `make bench` use (override to point elsewhere).
PG_URL ?= postgres://postgres@127.0.0.1:5432/session_rewind
REDIS ?= redis://127.0.0.1:6379/0
SERVICES_ENV := DATABASE_URL=$(PG_URL) REDIS_URL=$(REDIS) SECRET_KEY=local-services-only-not-secret
STATIC_STAMP := var/static/staticfiles.json
# `make run` (and collecting static files, which needs no database) use the embedded default whatever
# the shell exports: the demo login's password is published, and a DATABASE_URL left set (a
# deployment's) would otherwise get it as a superuser.
EMBEDDED_ENV := env -u DATABASE_URL -u REDIS_URL -u CELERY_BROKER_URL

.PHONY: help install run serve worker beat test bench lint services clean

help:
	@echo "make run     install, migrate, load demo data, serve http://$(HOST):$(PORT) (embedded: SQLite, no services)"
	@echo "make test    install and run the whole suite against PostgreSQL + Redis on 127.0.0.1"
	@echo "make serve   web + Celery worker + beat against PostgreSQL + Redis (production shape, one machine)"
	@echo "make worker | make beat   run one Celery worker / the beat scheduler (PostgreSQL + Redis)"
	@echo "make bench   state-store benchmark on PostgreSQL (prints the README table)"
	@echo "make lint    ruff + mypy"

$(VENV)/.installed: requirements.txt
	@test -n "$(PYTHON)" || { echo "error: python3 (3.11) is required" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e ./client
	@touch $@

node_modules/.installed: package.json package-lock.json
	@command -v npm >/dev/null || { echo "error: npm (Node.js) is required to install htmx" >&2; exit 1; }
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@

$(STATIC_STAMP): $(VENV)/.installed node_modules/.installed $(shell find static -type f 2>/dev/null)
	$(EMBEDDED_ENV) $(PY) manage.py collectstatic --noinput -v0
	@touch $@

install: $(VENV)/.installed node_modules/.installed $(STATIC_STAMP)

run: install
	@$(EMBEDDED_ENV) $(PY) manage.py migrate --noinput -v0
	@$(EMBEDDED_ENV) $(PY) manage.py seed_demo
	@echo "Session Rewind is at http://$(HOST):$(PORT)/  (log in as operator / rewind-demo; Ctrl-C stops)"
	@$(EMBEDDED_ENV) $(VENV)/bin/uvicorn config.asgi:application --host $(HOST) --port $(PORT) --log-level warning

services:
	@.ci/ensure-services

serve: install services
	@$(SERVICES_ENV) $(PY) manage.py ensure_database
	@$(SERVICES_ENV) $(PY) manage.py migrate --noinput -v0
	@echo "Session Rewind (web + worker + beat) is at http://$(HOST):$(PORT)/"
	@$(SERVICES_ENV) HOST=$(HOST) PORT=$(PORT) $(VENV)/bin/honcho -f config/Procfile start

worker: install
	@$(SERVICES_ENV) $(PY) manage.py ensure_database
	$(SERVICES_ENV) $(VENV)/bin/celery -A config worker --loglevel=info

beat: install
	@mkdir -p var
	@$(SERVICES_ENV) $(PY) manage.py ensure_database
	$(SERVICES_ENV) $(VENV)/bin/celery -A config beat --loglevel=info --schedule=var/celerybeat-schedule

test: install services
	@command -v chromium >/dev/null || .ci/ensure-chromium
	$(SERVICES_ENV) $(PY) -m pytest $(ARGS)

bench: install services
	$(SERVICES_ENV) $(PY) -m tests.bench.run

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) node_modules var
