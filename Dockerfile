# A first image: CPU torch, the bundled models, loopback-free bind inside the container.
# The production image (multi-stage, non-root, healthcheck, store volume) is its own issue.
FROM python:3.11-slim
WORKDIR /srv/modelport
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md modelport.toml ./
COPY app ./app
COPY models ./models
COPY weights ./weights
RUN pip install --no-cache-dir .
ENV MODELPORT_HOST=0.0.0.0 MODELPORT_CONFIG=/srv/modelport/modelport.toml
EXPOSE 8000
CMD ["python", "-m", "app"]
