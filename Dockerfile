# The buildq worker image (also runs flower and the `buildq submit` CLI in the compose stack).
# No `# syntax=` line on purpose: the built-in Dockerfile frontend is enough, so building this
# image pulls nothing but the base image.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src

# Dependencies first, in their own layer: it is rebuilt only when pyproject.toml changes.
# README.md* is a glob so the build works while the README is absent (setuptools only warns).
COPY pyproject.toml README.md* ./
RUN mkdir buildq && touch buildq/__init__.py \
    && pip install ".[flower]" \
    && pip uninstall -y buildq \
    && rm -rf buildq build *.egg-info

# Then the package itself, without touching the dependency layer.
COPY buildq ./buildq
RUN pip install --no-deps . && rm -rf build *.egg-info

# Runs as root: the docker launcher talks to the host's /var/run/docker.sock, which is
# root-equivalent anyway (see deploy/README.md).
CMD ["buildq", "worker"]
