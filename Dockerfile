# scale-chat server image: `docker build -t scalechat .`
# BASE is any image with Python 3.11, pip and useradd; test_swarm.py builds on a
# stand-in made from Debian where no registry is reachable.
ARG BASE=python:3.11-slim
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /app

# Only the server's runtime dependency goes into the image. numpy and matplotlib
# process and draw load-test results on a workstation; left out, the image is
# some 170 MB smaller, and that is what every node pulls when the service scales
# out. The version still comes from requirements.txt, the one place it is pinned;
# the build fails if the line is missing.
COPY requirements.txt ./
RUN grep -iE '^prometheus[-_]client' requirements.txt > requirements-server.txt \
 && pip install --no-cache-dir -r requirements-server.txt \
 && rm requirements-server.txt

RUN useradd --system --uid 10001 --no-create-home --home-dir /app --shell /usr/sbin/nologin scalechat

COPY scalechat.py ./
COPY static/ static/

# Root owns the code, so the server's user can read it but not change it.
USER scalechat

# Listen on every interface of the container: the load balancer and Prometheus
# reach each replica over the stack's network.
ENV SCALECHAT_HOST=0.0.0.0 \
    SCALECHAT_PORT=8080 \
    SCALECHAT_METRICS_HOST=0.0.0.0 \
    SCALECHAT_METRICS_PORT=8081
EXPOSE 8080 8081

# No curl in the slim image; Python asks /healthz, which answers 503 while the
# server drains, so the orchestrator stops sending it clients at once.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('SCALECHAT_PORT', '8080') + '/healthz', timeout=2)"]

# Exec form: the server is PID 1 and gets the SIGTERM of `docker stop` or a
# rolling update itself, so it drains (close 1001, clients come back with
# `since`) instead of being killed after the grace period.
STOPSIGNAL SIGTERM
CMD ["python", "scalechat.py"]
